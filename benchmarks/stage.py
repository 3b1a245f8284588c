"""One training stage of a learning benchmark, shared by `learning_pretrained.py` and `learning_smollm2.py`: a run
key, a pause file, and `train_stage`, which trains a model for one stage with `HPTTrainer` and returns its per-step
curves."""

from __future__ import annotations

import os
import resource
import time

# Per-step curves read from the trainer's log history: name -> log key
CURVE_KEYS = {"reward": "reward", "sft_fraction": "hpt/sft_fraction", "mean_length": "completions/mean_length",
              "clipped_ratio": "completions/clipped_ratio"}  # fmt: skip


def wait_while_paused(pause_file: str | None) -> None:
    """Sleep while `pause_file` exists (another benchmark that needs the machine to itself is running)."""
    while pause_file and os.path.exists(pause_file):
        time.sleep(5)


def run_key(method: str, stages: list[dict], seed: int) -> str:
    """The key of a run in a results file: method, learning rates, seed and steps."""
    lrs = "+".join(f"{s['learning_rate']:g}" for s in stages)
    return f"{method}|lr={lrs}|seed={seed}|steps={sum(s['steps'] for s in stages)}"


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def train_stage(model, tokenizer, dataset, reward_func, stage: dict, seed: int, args, work_dir: str,
                label: str | None = None, **config_options):  # fmt: skip
    """
    Train `model` for one stage with `HPTTrainer` and return the trained model and its per-step curves.

    Args:
        stage (`dict`):
            `learning_rate`, `steps` and [`~hpt_trl.HPTConfig`] options (`algorithm`, `gamma`, ...).
        args (`argparse.Namespace`):
            The benchmark's options: `rollouts`, `prompts_per_step`, `max_completion_length`, `pause_file` (waited
            on before each step).
        label (`str`, *optional*):
            If given, one progress line per step, prefixed `[label]`, and the step times (a pause not counted) in the
            curves as `step_seconds`.
        **config_options:
            Further `quickstart_config` options (`temperature`, `gradient_checkpointing`, ...).

    Returns:
        `tuple`: the model and `{name: per-step values}` for each of `CURVE_KEYS` (and `step_seconds` with a label).
    """
    from transformers import PrinterCallback, TrainerCallback

    from hpt_trl import HPTTrainer
    from hpt_trl.quickstart import quickstart_config

    step_seconds = []

    class Pause(TrainerCallback):  # first in the list, so a wait comes before the step's timer starts
        def on_step_begin(self, *unused, **kwargs):
            wait_while_paused(args.pause_file)

    class Progress(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            self.start = time.time()

        def on_step_end(self, *unused, **kwargs):
            step_seconds.append(round(time.time() - self.start, 2))

        def on_log(self, unused_args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                print(f"[{label}] step {state.global_step}/{state.max_steps} {step_seconds[-1]:.0f} s, reward "
                      f"{logs['reward']:.3f}, SFT share {logs.get('hpt/sft_fraction', float('nan')):.2f}, length "
                      f"{logs.get('completions/mean_length', float('nan')):.1f}, clipped "
                      f"{logs.get('completions/clipped_ratio', float('nan')):.2f}, peak RSS {peak_rss_mb():.0f} MB",
                      flush=True)  # fmt: skip

    options = {k: v for k, v in stage.items() if k not in ("learning_rate", "steps")}
    config = quickstart_config(
        work_dir, stage["steps"], stage["learning_rate"], seed, num_generations=args.rollouts,
        per_device_train_batch_size=args.prompts_per_step * args.rollouts,
        max_completion_length=args.max_completion_length, **config_options, **options,
    )  # fmt: skip
    callbacks = [Pause()] if label is None else [Pause(), Progress()]
    trainer = HPTTrainer(model=model, reward_funcs=reward_func, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=callbacks)  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    history = trainer.state.log_history
    curves = {name: [e[key] for e in history if key in e] for name, key in CURVE_KEYS.items()}
    return trainer.model, curves if label is None else {"step_seconds": step_seconds, **curves}

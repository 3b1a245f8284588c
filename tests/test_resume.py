"""`resume_from_checkpoint`: a run interrupted at step k and resumed ends exactly where an uninterrupted run does.

The rewards depend on the sampled completions (`mixed_reward`), so the RL term trains too and the test also checks that
the resumed run samples the same rollouts (the Trainer restores the RNG states saved in the checkpoint).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import RESUME_TRAIN_OPTIONS, crash_after_checkpoint_2, mixed_reward, tiny_args
from safetensors.torch import load_file
from transformers import TrainerCallback

from hpt_trl import HPTTrainer
from hpt_trl.cli import main as cli_main
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer
from hpt_trl.toy_task import build_toy_math_dataset


class StopAt(TrainerCallback):
    """Interrupt training after optimizer step `step` (the checkpoint of that step is saved first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def make_trainer(output_dir, dataset, max_steps, save_steps, callbacks=None):
    tokenizer = build_tiny_tokenizer()
    args = tiny_args(
        output_dir,
        per_device_train_batch_size=16,  # 8 prompts x 2 rollouts per step
        num_generations=2,
        max_completion_length=12,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
        gamma=0.0,
    )
    return HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=mixed_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize(
    "num_prompts, k, n",
    [
        (64, 2, 4),  # 8 steps per epoch: interrupted and resumed inside the first epoch
        (16, 2, 4),  # 2 steps per epoch: resumed at the start of the second epoch
        (24, 4, 6),  # 3 steps per epoch: resumed inside the second epoch
    ],
    ids=["first-epoch", "epoch-boundary", "later-epoch"],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, num_prompts, k, n):
    dataset = build_toy_math_dataset()["train"].select(range(num_prompts))
    full = make_trainer(tmp_path / "full", dataset, n, k)
    full.train()

    interrupted = make_trainer(tmp_path / "run", dataset, n, k, callbacks=[StopAt(k)])
    interrupted.train()
    assert interrupted.state.global_step == k
    resumed = make_trainer(tmp_path / "run", dataset, n, k)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{k}"))
    assert resumed.state.global_step == full.state.global_step == n

    # Same prompts, same gate decisions, same sampled rollouts (hence same losses), same parameters
    assert interrupted.gate_history + resumed.gate_history == full.gate_history
    assert (tmp_path / "run" / "hpt_gate.jsonl").read_text() == (tmp_path / "full" / "hpt_gate.jsonl").read_text()
    assert logged(resumed, "loss") == logged(full, "loss")  # the resumed state keeps the first k steps' logs
    # both terms train: some prompts are gated (SFT), some rollouts carry a non-zero advantage (RL)
    assert min(logged(full, "frac_reward_zero_std")) < 1.0 and max(logged(full, "hpt/sft_fraction")) > 0.0
    for (name, p_full), p_resumed in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p_resumed, p_full, atol=1e-6, rtol=0, msg=name)


def test_resume_from_the_command_line(tmp_path):
    """`hpt-trl train --resume_from_checkpoint true` continues from the last checkpoint in output_dir."""
    out = tmp_path / "run"
    options = ["train", *RESUME_TRAIN_OPTIONS, "--output_dir", str(out)]
    assert cli_main(options) == 0
    uninterrupted = load_file(out / "model.safetensors")
    gate_log = crash_after_checkpoint_2(out)  # then resume from the last checkpoint
    assert len(gate_log) == 4

    assert cli_main(options + ["--resume_from_checkpoint", "true"]) == 0
    resumed = load_file(out / "model.safetensors")
    assert (out / "hpt_gate.jsonl").read_text().splitlines() == gate_log
    assert [json.loads(line)["step"] for line in gate_log] == [0, 1, 2, 3]
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    options = ["train", "--config", "recipes/tiny_cpu.yaml", "--output_dir", str(tmp_path), "--max_steps", "1"]
    with pytest.raises(ValueError, match="has no checkpoint"):
        cli_main(options + ["--resume_from_checkpoint", "true"])


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_gives_the_uninterrupted_gate_log(tmp_path):
    """A real SIGKILL in the middle of step 6 (after checkpoint-4, with records of steps 4 and later on disk), then a
    resume: the gate log is byte-identical to an uninterrupted run's, with no trimming by hand."""
    tests_dir = Path(__file__).parent

    def train(output_dir, *extra, kill_at=None):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")])}
        env.pop("HPT_KILL_AT_CALL", None)
        if kill_at is not None:
            env["HPT_KILL_AT_CALL"] = str(kill_at)
        options = [*RESUME_TRAIN_OPTIONS, "--max_steps", "8", "--reward_funcs", "killing_reward.reward"]
        command = [sys.executable, "-m", "hpt_trl.cli", "train", *options, "--output_dir", str(output_dir), *extra]
        return subprocess.run(command, env=env, cwd=tests_dir.parent, capture_output=True, text=True, timeout=600)

    reference = train(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = train(tmp_path / "run", kill_at=5)  # the 6th generation batch: step 5's record is never written
    assert killed.returncode == -signal.SIGKILL
    run_log = tmp_path / "run" / "hpt_gate.jsonl"
    assert [json.loads(line)["step"] for line in run_log.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoint-4").is_dir() and not (tmp_path / "run" / "checkpoint-6").exists()

    resumed = train(tmp_path / "run", "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_log.read_bytes() == (tmp_path / "reference" / "hpt_gate.jsonl").read_bytes()
    assert [json.loads(line)["step"] for line in run_log.read_text().splitlines()] == list(range(8))

"""Several optimizer steps per generation batch (`steps_per_generation > gradient_accumulation_steps`, or
`num_iterations > 1`): what each optimizer step trains, against a hand-computed update, and an exact resume from a
checkpoint written inside a generation buffer."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# 2. Resume inside a generation buffer

# `hpt-trl train` options: 6 steps of the tiny recipe, a checkpoint after step 3, i.e. inside the generation batch of
# steps 2 and 3 (generations at steps 0, 2 and 4)
BUFFER_RESUME_OPTIONS = [
    "--config",
    "recipes/tiny_cpu.yaml",
    "--max_steps",
    "6",
    "--save_strategy",
    "steps",
    "--save_steps",
    "3",
    "--lr_scheduler_type",
    "linear",
    "--reward_funcs",
    "killing_reward.reward",
]
TIMING_KEYS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _train(output_dir, *extra, kill_at=None):
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    env.pop("HPT_KILL_AT_CALL", None)
    if kill_at is not None:
        env["HPT_KILL_AT_CALL"] = str(kill_at)
    command = [sys.executable, "-m", "hpt_trl.cli", "train", *BUFFER_RESUME_OPTIONS, "--output_dir", str(output_dir)]
    return subprocess.run(
        [*command, *extra], env=env, cwd=tests_dir.parent, capture_output=True, text=True, timeout=600
    )


def _log_history(output_dir):
    """Per-step logs of `checkpoint-6` (the resumed run's state carries the logs of steps before its checkpoint)."""
    history = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    return [{key: value for key, value in entry.items() if key not in TIMING_KEYS} for entry in history]


@pytest.mark.slow
@pytest.mark.parametrize(
    "buffer_options",
    [["--steps_per_generation", "2"], ["--num_iterations", "2"]],
    ids=["steps_per_generation", "num_iterations"],
)
def test_sigkill_inside_a_generation_buffer_then_resume_is_exact(tmp_path, buffer_options):
    """2 optimizer steps per generation batch, checkpoint-3 written between the 2 steps of the second batch, a real
    SIGKILL in the generation of step 4, then a resume: the remaining step 3 trains on the checkpoint's rollouts, the
    next generation is at step 4, and the gate log, the logged metrics and the model equal an uninterrupted run's."""
    reference = _train(tmp_path / "reference", *buffer_options)
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference_log = (tmp_path / "reference" / "hpt_gate.jsonl").read_text()
    assert [json.loads(line)["step"] for line in reference_log.splitlines()] == [0, 2, 4]

    killed = _train(tmp_path / "run", *buffer_options, kill_at=2)  # the third generation batch, step 4's
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_log = tmp_path / "run" / "hpt_gate.jsonl"
    assert [json.loads(line)["step"] for line in run_log.read_text().splitlines()] == [0, 2]
    assert (tmp_path / "run" / "checkpoint-3").is_dir() and not (tmp_path / "run" / "checkpoint-6").exists()

    resumed = _train(tmp_path / "run", *buffer_options, "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["step"] for line in run_log.read_text().splitlines()] == [0, 2, 4]
    assert run_log.read_text() == reference_log
    # Step 3 logs the loss of the buffered rollouts and no generation metrics, as in the uninterrupted run
    assert _log_history(tmp_path / "run") == _log_history(tmp_path / "reference")
    expected, actual = load_file(tmp_path / "reference" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0, msg=name)

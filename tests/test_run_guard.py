"""Resume and preemption (issue 21): nothing silently wrong when a run is killed, resumed, restarted or doubled.

Each test reproduces a case that ended with exit code 0 and a wrong model or log before `hpt_trl.run_guard` and
`hpt_trl.reward_checks`; the `slow` ones SIGKILL a real `hpt-trl train` subprocess (`tests/killing_save.py`,
`tests/killing_reward.py`).
"""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RESUME_TRAIN_OPTIONS, mixed_reward, tiny_args
from safetensors.torch import load_file

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.cli import main as cli_main
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer
from hpt_trl.toy_task import build_toy_math_dataset, toy_answer_reward

TESTS = Path(__file__).parent


def toy_rows(count):
    return build_toy_math_dataset()["train"].select(range(count))


def make_trainer(output_dir, dataset=None, reward=mixed_reward, **overrides):
    tokenizer = build_tiny_tokenizer()
    settings = dict(per_device_train_batch_size=4, num_generations=2, max_steps=2, gamma=0.0)
    settings.update(overrides)
    return HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=reward,
        args=tiny_args(output_dir, **settings),
        train_dataset=toy_rows(8) if dataset is None else dataset,
        processing_class=tokenizer,
    )


def gate_steps(output_dir):
    return [json.loads(line)["step"] for line in (Path(output_dir) / "hpt_gate.jsonl").read_text().splitlines()]


def checkpoints(output_dir):
    return sorted(path.name for path in Path(output_dir).glob("checkpoint-*"))


def run_cli(output_dir, *options, env=None, module="hpt_trl.cli", timeout=600):
    """`hpt-trl train` in a subprocess (`module`: `killing_save` to inject a kill) with the resume tests' options."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    environment.update(env or {})
    command = [sys.executable, "-m", module, "train", *RESUME_TRAIN_OPTIONS, "--output_dir", str(output_dir), *options]
    return subprocess.run(command, env=environment, cwd=TESTS.parent, capture_output=True, text=True, timeout=timeout)


# 1. A run already at max_steps


def test_resuming_the_checkpoint_at_max_steps_trains_nothing(tmp_path, caplog):
    """8 rows, per_device_train_batch_size=4, num_generations=2, max_steps=2, save_steps=2: resuming checkpoint-2 used
    to train a third step, write checkpoint-3 and add a gate record."""
    first = make_trainer(tmp_path, save_strategy="steps", save_steps=2)
    first.train()
    log_before = (tmp_path / "hpt_gate.jsonl").read_text()
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")

    again = make_trainer(tmp_path, save_strategy="steps", save_steps=2)
    with caplog.at_level(logging.WARNING):
        output = again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert again.state.global_step == output.global_step == 2
    assert checkpoints(tmp_path) == ["checkpoint-2"]
    assert (tmp_path / "hpt_gate.jsonl").read_text() == log_before
    assert "already finished" in caplog.text
    for name, parameter in again.model.state_dict().items():  # the checkpoint's weights, for the final save
        if name in weights:
            torch.testing.assert_close(parameter, weights[name], msg=name)


# 2. Another run's checkpoints in output_dir


def test_a_fresh_run_into_a_directory_with_checkpoints_stops(tmp_path):
    make_trainer(tmp_path, save_strategy="steps", save_steps=1).train()
    with pytest.raises(
        ValueError, match=r"already holds checkpoints .*checkpoint-2, checkpoint-1.*overwrite_output_dir"
    ):
        make_trainer(tmp_path, save_strategy="steps", save_steps=1, learning_rate=1e-3).train()

    # overwrite_output_dir: the old checkpoints go, the new run's replace them
    fresh = make_trainer(tmp_path, save_strategy="steps", save_steps=2, learning_rate=1e-3, overwrite_output_dir=True)
    fresh.train()
    assert checkpoints(tmp_path) == ["checkpoint-2"]
    assert json.loads((tmp_path / "checkpoint-2" / "hpt_run.json").read_text())["settings"]["learning_rate"] == 1e-3


def test_resume_never_mixes_two_runs(tmp_path):
    """A checkpoint of run A resumed into an output_dir holding run B's checkpoints is refused; into one holding only
    run C's gate log, that log is moved aside (before, the resumed run kept C's records before its step)."""
    make_trainer(tmp_path / "a", save_strategy="steps", save_steps=1, max_steps=1).train()
    make_trainer(tmp_path / "b", save_strategy="steps", save_steps=1, max_steps=1).train()
    resumed = make_trainer(tmp_path / "b", save_strategy="steps", save_steps=1, max_steps=2)
    with pytest.raises(ValueError, match="would mix two runs: checkpoint-1 there belong to another run"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))

    # An output_dir with another run's gate log but no checkpoint: that log is moved aside, not continued
    make_trainer(tmp_path / "c", max_steps=1).train()
    continued = make_trainer(tmp_path / "c", save_strategy="steps", save_steps=1, max_steps=2)
    continued.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert gate_steps(tmp_path / "c") == [1]
    assert (tmp_path / "c" / "hpt_gate.jsonl.old").exists()


@pytest.mark.slow
def test_a_killed_second_run_resumes_its_own_checkpoint_not_the_first_runs(tmp_path):
    """The issue's case: run 1 to checkpoint-4; a fresh run 2 (another learning rate) into the same directory stops
    unless overwrite_output_dir; with it, killed (SIGKILL) after step 3, `resume last` continues run 2 (checkpoint-2),
    and the gate log reads 0, 1, 2, 3 (it read 0, 1, 2, 6 before: run 1's checkpoint was resumed)."""
    out = tmp_path / "run"
    assert run_cli(out).returncode == 0
    refused = run_cli(out, "--learning_rate", "1e-3")
    assert refused.returncode != 0 and "already holds checkpoints" in refused.stderr
    killed = run_cli(out, "--learning_rate", "1e-3", "--overwrite_output_dir", "true", module="killing_save",
                     env={"HPT_KILL_AT_STEP": "3"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoints(out) == ["checkpoint-2"]
    resumed = run_cli(out, "--learning_rate", "1e-3", "--resume_from_checkpoint", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert gate_steps(out) == [0, 1, 2, 3]
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]


# 3. Two runs into one output_dir at once


LOCK_HOLDER = """
import sys, time
from hpt_trl.run_guard import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_into_a_locked_output_dir_stops_and_a_killed_holder_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"Another run is training into output_dir .*pid {holder.pid}"):
            make_trainer(tmp_path).train()
        assert not (tmp_path / "hpt_gate.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    make_trainer(tmp_path, max_steps=1).train()  # the OS released the killed holder's lock
    assert gate_steps(tmp_path) == [0]


@pytest.mark.slow
def test_two_runs_into_one_output_dir_at_once(tmp_path):
    """Before: both exited 0 with an interleaved gate log. Now the second stops at once with a clear error. The first
    run's reward waits (from step 1 on) until the second has ended, so that both really run at once."""
    out, go = tmp_path / "run", tmp_path / "go"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    environment.update(HPT_WAIT_FOR=str(go), HPT_WAIT_AT_CALL="1")
    command = [sys.executable, "-m", "hpt_trl.cli", "train", *RESUME_TRAIN_OPTIONS, "--output_dir", str(out)]
    command += ["--reward_funcs", "killing_reward.waiting_reward"]
    first = subprocess.Popen(command, env=environment, cwd=TESTS.parent, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / "hpt_gate.jsonl").exists() or not (out / "hpt_gate.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, "the first run ended before training"
            time.sleep(0.5)
        second = run_cli(out)
        assert second.returncode != 0 and "Another run is training into output_dir" in second.stderr
        assert first.poll() is None  # still training
        go.touch()
        assert first.wait(timeout=600) == 0
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert gate_steps(out) == [0, 1, 2, 3]


# 4. Settings changed on resume


@pytest.fixture(scope="module")
def checkpoint_2(tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2 (the resumes below are refused, so it is shared)."""
    out = tmp_path_factory.mktemp("settings")
    make_trainer(out, save_strategy="steps", save_steps=1).train()
    return out


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(gamma=0.5), "gamma (0.0 in the checkpoint, 0.5 now)"),
        (dict(num_generations=4, per_device_train_batch_size=8), "num_generations (2 in the checkpoint, 4 now)"),
        (dict(max_completion_length=12), "max_completion_length (8 in the checkpoint, 12 now)"),
        (dict(dataset=toy_rows(9).select(range(1, 9))), "training data (8 rows"),
        (
            dict(reward=constant_reward),
            "reward functions (['mixed_reward'] in the checkpoint, ['constant_reward'] now)",
        ),
        (dict(learning_rate=0.1), "learning_rate"),
    ],
    ids=["gamma", "num_generations", "max_completion_length", "dataset", "reward_funcs", "learning_rate"],
)
def test_resume_with_other_settings_stops_naming_each(checkpoint_2, change, named):
    trainer = make_trainer(checkpoint_2, save_strategy="steps", save_steps=1, max_steps=4, **change)
    with pytest.raises(ValueError, match="settings that differ") as error:
        trainer.train(resume_from_checkpoint=str(checkpoint_2 / "checkpoint-1"))
    assert named in str(error.value)
    assert "max_steps" not in str(error.value)  # a legitimate change is not refused


def test_resume_with_a_legitimate_change_warns(checkpoint_2, caplog, tmp_path):
    trainer = make_trainer(checkpoint_2, save_strategy="steps", save_steps=1, max_steps=2, logging_steps=2)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=str(checkpoint_2 / "checkpoint-1"))
    assert trainer.state.global_step == 2
    assert "changed settings: logging_steps (1 in the checkpoint, 2 now)" in caplog.text


# 5. A dataset too small for one generation batch, max_steps=0


def test_a_dataset_smaller_than_a_generation_batch_stops_before_the_model_loads(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"has 3 rows, but one generation batch needs 4 prompts"):
        HPTTrainer(
            model=tiny_model_dir, reward_funcs=toy_answer_reward, args=tiny_args(tmp_path), train_dataset=toy_rows(3)
        )


def test_the_cli_stops_on_a_dataset_too_small_before_the_model_loads(tmp_path):
    options = ["train", "--config", "recipes/tiny_cpu.yaml", "--dataset_limit", "5", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"has 5 rows, but one generation batch needs 8 prompts"):
        cli_main(options)
    assert not (tmp_path / "tiny-init").exists()  # stopped before the model was built


def test_max_steps_0_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="max_steps=0"):
        HPTConfig(output_dir=str(tmp_path), max_steps=0, use_cpu=True, bf16=False, report_to="none")


# 6. save_only_model checkpoints


def test_a_save_only_model_checkpoint_is_not_resumed_with_a_fresh_optimizer(tmp_path):
    make_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=1, save_only_model=True).train()
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, save_only_model=True)
    with pytest.raises(ValueError, match=r"checkpoint-1 has no optimizer state .*save_only_model"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# 7. No rollout ever scored


def never_scored(completions, **kwargs):
    return [None] * len(completions)


def test_training_stops_when_the_correctness_reward_scores_nothing(tmp_path, caplog):
    trainer = make_trainer(tmp_path, reward=never_scored, max_steps=8)
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(RuntimeError, match=r"'never_scored' scored no rollout .* in 5"),
    ):
        trainer.train()
    assert "At step 0, the correctness reward 'never_scored' scored no rollout" in caplog.text
    assert trainer.state.global_step == 4  # stopped at the 5th generation batch, before its update


# 8. Reward functions returning other types


def dict_reward(completions, **kwargs):
    return {index: 1.0 for index in range(len(completions))}


def scalar_types_reward(completions, **kwargs):
    values = [1, 0.5, None, True, np.float32(1.0), np.int64(0), np.bool_(True), torch.tensor(0.0)]
    return [values[index % len(values)] for index in range(len(completions))]


def test_a_reward_of_another_type_stops_with_the_functions_name(tmp_path):
    with pytest.raises(TypeError, match="The reward function 'dict_reward' returned a dict"):
        make_trainer(tmp_path, reward=dict_reward).train()


def test_rewards_of_the_types_trl_accepts_pass(tmp_path):
    trainer = make_trainer(tmp_path, reward=scalar_types_reward, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1


# 9. success_threshold above every value of the correctness reward


def zero_one_reward(completions, **kwargs):
    return [float(index % 2) for index in range(len(completions))]


def test_an_unreachable_success_threshold_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        make_trainer(tmp_path, reward=zero_one_reward, max_steps=5, success_threshold=2.0).train()
    assert "values up to 1, all below success_threshold=2" in caplog.text


def test_a_reachable_success_threshold_does_not_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        make_trainer(tmp_path, reward=zero_one_reward, max_steps=5, success_threshold=1.0).train()
    assert "success_threshold" not in caplog.text


# Torn checkpoints, full disk


def fake_checkpoint(output_dir, step, state=None):
    folder = Path(output_dir) / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


@pytest.mark.parametrize("torn_state", [None, '{"global_step": 6, "log_hi'], ids=["no-state", "half-written-state"])
def test_resume_last_skips_a_torn_newest_checkpoint(tmp_path, caplog, torn_state):
    from hpt_trl.train import parse_args, resolve_checkpoint

    fake_checkpoint(tmp_path, 4, json.dumps({"global_step": 4}))
    fake_checkpoint(tmp_path, 6, torn_state)
    _, args, _ = parse_args(["--config", "recipes/tiny_cpu.yaml", "--output_dir", str(tmp_path),
                             "--resume_from_checkpoint", "last"])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(args) == str(tmp_path / "checkpoint-4")
    assert "Skipping" in caplog.text and "checkpoint-6" in caplog.text and "torn" in caplog.text


@pytest.mark.parametrize(
    "failure",
    [RuntimeError("[enforce fail at inline_container.cc:672] basic_ios::clear: iostream error"),
     OSError(errno.ENOSPC, "No space left on device")],
    ids=["torch-iostream-error", "enospc"],
)  # fmt: skip
def test_a_full_disk_during_a_checkpoint_says_so_and_where(tmp_path, monkeypatch, failure):
    def failing_save(*args, **kwargs):
        raise failure

    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=1)
    monkeypatch.setattr(torch, "save", failing_save)  # the optimizer's state is the first torch.save of a checkpoint
    with pytest.raises(OSError, match=r"disk is (probably )?full: writing .*checkpoint-1 failed") as error:
        trainer.train()
    assert error.value.errno == errno.ENOSPC


@pytest.mark.slow
def test_a_checkpoint_torn_by_a_kill_is_skipped_by_resume_last(tmp_path):
    """SIGKILL while checkpoint-4 is being saved (its model written, no trainer_state.json): `resume last` crashed;
    now it resumes checkpoint-2, says so, and ends as the uninterrupted run."""
    out = tmp_path / "run"
    reference = run_cli(tmp_path / "reference", "--max_steps", "6")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run_cli(out, "--max_steps", "6", module="killing_save", env={"HPT_KILL_IN_SAVE": "checkpoint-4"})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    resumed = run_cli(out, "--max_steps", "6", "--resume_from_checkpoint", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping" in resumed.stderr and "checkpoint-4" in resumed.stderr
    assert (out / "hpt_gate.jsonl").read_bytes() == (tmp_path / "reference" / "hpt_gate.jsonl").read_bytes()


@pytest.mark.slow
def test_resume_last_after_a_kill_during_the_final_save_and_after_a_finished_run(tmp_path):
    """SIGKILL at the final save (after checkpoint-4 of 4 steps): `resume last` trained a fifth step. Now it trains
    nothing and writes the final model from checkpoint-4; a rerun of the finished job does nothing either."""
    out = tmp_path / "run"
    killed = run_cli(out, module="killing_save", env={"HPT_KILL_IN_SAVE": "final"})
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and not (out / "model.safetensors").exists()
    for _ in range(2):  # after the kill, then after the finished run
        resumed = run_cli(out, "--resume_from_checkpoint", "last")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "already finished" in resumed.stderr
        assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
        assert gate_steps(out) == [0, 1, 2, 3]
        final, checkpoint = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
        assert final.keys() == checkpoint.keys()
        for name in final:
            torch.testing.assert_close(final[name], checkpoint[name], msg=name)


def test_other_save_errors_and_unrecorded_settings_pass_unchanged():
    from hpt_trl.run_guard import compare_settings, explain_disk_full

    assert explain_disk_full(RuntimeError("CUDA error: device-side assert triggered"), "/x/checkpoint-1") is None
    assert explain_disk_full(OSError(errno.EACCES, "Permission denied"), "/x/checkpoint-1") is None
    saved = {"gamma": 0.0, "training data": None, "max_steps": 4}  # a streaming dataset has no fingerprint
    current = {"gamma": 0.0, "training data": {"rows": 3, "sha1": "ab"}, "max_steps": 8, "num_generations": 4}
    assert compare_settings(saved, current) == ([], ["max_steps (4 in the checkpoint, 8 now)"])

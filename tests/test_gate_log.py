"""`hpt_trl.gate_log`: the gate log survives kills and resumes, and never mixes two runs.

Each test writes the file the way the trainer did before this module (`open(path, "a")`, one `json.dumps` line per
record) where that matters, so the expected outcomes below are the ones that append-only log got wrong.
"""

import json

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from hpt_trl.gate_log import GATE_LOG_NAME, GateLog, GateLogCallback, read_gate_log


def write_run(path, steps, torn_tail=""):
    """A log as the trainer leaves it after generating `steps` (and maybe being killed mid-write: `torn_tail`)."""
    with open(path, "a") as f:
        f.writelines(json.dumps({"step": step, "gated": [step % 2 == 0]}) + "\n" for step in steps)
        f.write(torn_tail)


def steps_in(path):
    return [record["step"] for record in read_gate_log(path)]


@pytest.mark.parametrize(
    "logged, resume_step, expected",
    [
        ([0, 1, 2, 3, 4, 5], 4, [0, 1, 2, 3]),  # killed after step 5, resumed from checkpoint-4
        ([0, 1, 2, 3], 4, [0, 1, 2, 3]),  # killed right after checkpoint-4: nothing to drop
        ([0, 0, 1, 1, 2, 2], 2, [0, 0, 1, 1]),  # two generations per optimizer step
        ([0, 1, 2], 1, [0]),
    ],
    ids=["drops-later-steps", "nothing-to-drop", "several-records-per-step", "early-resume"],
)
def test_resume_keeps_exactly_the_steps_before_the_checkpoint(tmp_path, logged, resume_step, expected):
    path = tmp_path / GATE_LOG_NAME
    write_run(path, logged)
    log = GateLog(path)
    log.start(resume_step)
    assert steps_in(path) == expected
    for step in range(resume_step, 8):  # the resumed run
        log.append({"step": step, "gated": [False]})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == expected + list(range(resume_step, 8))
    assert not (tmp_path / (GATE_LOG_NAME + ".tmp")).exists()


@pytest.mark.parametrize(
    "torn_tail", ['{"step": 6, "gat', "{", '{"step": 6}'], ids=["half-a-record", "one-byte", "no-newline"]
)
def test_a_torn_last_line_is_dropped_on_resume(tmp_path, torn_tail):
    path = tmp_path / GATE_LOG_NAME
    write_run(path, range(6), torn_tail)

    # The resume repairs the file: only complete lines, each a JSON record
    GateLog(path).start(resume_step=6)
    lines = path.read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3, 4, 5]
    assert all(line.endswith("\n") for line in lines)


@pytest.mark.parametrize(
    "logged, torn_tail",
    [
        (range(6), '{"step": 6, "gat'),
        (range(6), "{"),
        (range(6), '{"step": 6}'),
        ([], '{"step": 0, "gated": [tr' * 500),  # longer than one 4 kB block, and no newline at all
    ],
    ids=["half-a-record", "one-byte", "no-newline", "only-a-long-torn-line"],
)
def test_append_drops_a_torn_last_line_instead_of_gluing_onto_it(tmp_path, logged, torn_tail):
    path = tmp_path / GATE_LOG_NAME
    write_run(path, logged, torn_tail)
    GateLog(path).append({"step": 6, "gated": [True]})  # without `start` first
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [*logged, 6]


def test_a_fresh_run_does_not_mix_with_an_old_log(tmp_path):
    path = tmp_path / GATE_LOG_NAME
    write_run(path, range(10))
    old = path.read_text()
    log = GateLog(path)
    log.start(resume_step=None)
    assert path.read_text() == ""
    assert (tmp_path / (GATE_LOG_NAME + ".old")).read_text() == old  # nothing lost: the old run's log is kept aside
    log.append({"step": 0, "gated": [True]})
    assert steps_in(path) == [0]


def test_start_without_a_log_and_on_other_processes(tmp_path):
    GateLog(tmp_path / "run" / GATE_LOG_NAME).start(resume_step=4)  # resumed, but the log was lost: start a new one
    assert (tmp_path / "run" / GATE_LOG_NAME).read_text() == ""

    other = GateLog(tmp_path / "other" / GATE_LOG_NAME, enabled=False)  # not the main process: never writes
    other.start(None)
    other.append({"step": 0})
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("global_step, expected", [(0, [7]), (4, [0, 1, 2, 3, 7])], ids=["fresh", "resume"])
def test_callback_starts_the_log_at_train_begin(tmp_path, global_step, expected):
    path = tmp_path / GATE_LOG_NAME
    write_run(path, range(6))
    log = GateLog(path)
    state = TrainerState(global_step=global_step)  # as `Trainer.train` has it once a checkpoint is loaded
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    GateLogCallback(log).on_train_begin(args, state, TrainerControl())
    log.append({"step": 7})
    assert steps_in(path) == expected

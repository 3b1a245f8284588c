"""A crash-safe gate log: `OUTPUT_DIR/hpt_gate.jsonl`, one JSON record per generation batch.

Each record carries `"step"`, the trainer's `global_step` when the batch was generated (the optimizer step it is
about to train). A run killed after checkpoint-k and resumed from it generates step k again, so on resume the log keeps
exactly the records with `step < k` and the resumed run appends from there: the log reads as an uninterrupted run's.

- **Resume** ([`GateLog.start`] with the checkpoint's step): keeps the complete records of earlier steps, drops later
  ones and any torn line (a process killed mid-write), and rewrites the file atomically (temporary file + `os.replace`).
- **Fresh run** (`start(None)`): an existing log belongs to an earlier run in the same output directory. It is moved
  aside to `hpt_gate.jsonl.old` (replacing an older one), never appended to, and the new run starts an empty log.
- **Append**: one whole line per record, flushed and `fsync`ed, so a kill leaves at most one torn last line. A torn
  last line is dropped before the next record is written, never glued to it.

Only the main process writes: build the log with `enabled=False` elsewhere. [`GateLogCallback`] calls `start` when
training begins, the first moment the Trainer knows whether (and from which step) it resumes.
"""

from __future__ import annotations

import json
import logging
import os

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

GATE_LOG_NAME = "hpt_gate.jsonl"


def _parse_line(line: str) -> dict | None:
    """A complete record, or `None` for a torn or foreign line (no newline, not a JSON object, no integer step)."""
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return None
    return record


def _drop_torn_tail(f) -> None:
    """Truncate a binary file open for reading and appending after its last newline (a torn last line goes)."""
    end = position = f.seek(0, os.SEEK_END)
    while position > 0:
        size = min(4096, position)
        position -= size
        f.seek(position)
        newline = f.read(size).rfind(b"\n")
        if newline >= 0:
            position += newline + 1
            break
    if position < end:
        logger.warning(f"Dropped a torn last line ({end - position} bytes) from the gate log {f.name}.")
        f.truncate(position)


def read_gate_log(path: str | os.PathLike) -> list[dict]:
    """Return the complete records of a gate log (torn or foreign lines skipped); `[]` when there is no file."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [record for record in map(_parse_line, f) if record is not None]


class GateLog:
    """The per-step gate decisions of a run, appended to a JSON-lines file that survives kills and resumes.

    Args:
        path (`str` or `os.PathLike`):
            The log file, normally `os.path.join(args.output_dir, GATE_LOG_NAME)`.
        enabled (`bool`, *optional*, defaults to `True`):
            Whether this process writes (`accelerator.is_main_process`); when `False`, every method does nothing.

    Example:
    ```python
    >>> log = GateLog("out/hpt_gate.jsonl")
    >>> log.start(resume_step=None)  # a fresh run: an old log is moved to out/hpt_gate.jsonl.old
    >>> log.append({"step": 0, "gated": [True, False]})
    ```
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = os.fspath(path)
        self.enabled = enabled

    def start(self, resume_step: int | None) -> None:
        """Prepare the file for a run: `None` for a fresh run, else the step the run resumes from (the checkpoint's
        `global_step`), whose records and later ones are dropped with any torn line."""
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if resume_step is None:
            if os.path.exists(self.path):
                os.replace(self.path, self.path + ".old")
                logger.warning(f"Moved the gate log of an earlier run in this output directory to {self.path}.old.")
            open(self.path, "w").close()
            return
        if not os.path.exists(self.path):
            logger.warning(f"Resuming from step {resume_step}, but there is no gate log at {self.path}: starting one.")
            open(self.path, "w").close()
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        records = [_parse_line(line) for line in lines]
        kept = [line for line, record in zip(lines, records) if record is not None and record["step"] < resume_step]
        torn = sum(record is None for record in records)
        if torn:
            logger.warning(f"Dropped {torn} torn or unreadable line(s) from the gate log {self.path}.")
        if len(kept) != len(lines):
            logger.info(f"Gate log: kept the {len(kept)} records before step {resume_step} of {len(lines)} lines.")
        self._rewrite(kept)

    def append(self, record: dict) -> None:
        """Write `record` (a dict with an integer `"step"`) as one line, flushed and synced to disk."""
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "ab+") as f:
            _drop_torn_tail(f)
            f.write((json.dumps(record) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self, lines: list[str]) -> None:
        """Replace the file by `lines` atomically: a kill leaves either the old file or the new one."""
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)


class GateLogCallback(TrainerCallback):
    """Start a [`GateLog`] when training begins: as a resume from the checkpoint's step, or as a fresh run.

    `on_train_begin` runs after `Trainer.train(resume_from_checkpoint=...)` has loaded the checkpoint's state and before
    the first step, so `state.global_step` is the step the run resumes from (`0` for a fresh run, which no checkpoint
    has).

    Args:
        gate_log (`GateLog`):
            The log the trainer appends to.
    """

    def __init__(self, gate_log: GateLog):
        self.gate_log = gate_log

    def on_train_begin(self, args, state, control, **kwargs):
        self.gate_log.start(state.global_step if state.global_step > 0 else None)

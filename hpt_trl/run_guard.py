"""Run guards for resume and preemption: one run per `output_dir`, checkpoints that belong to it, settings that
match, and a train dataset that fills one generation batch.

A run in `output_dir` is identified by `output_dir/hpt_run.json` (its *run record*: a random run id, the settings that
change the algorithm or the data, a fingerprint of the training data and the reward functions). A copy goes into every
checkpoint before the checkpoint is written, so each checkpoint says which run and which settings it belongs to.

- **Lock** ([`OutputDirLock`]): the main process holds an `flock` on `output_dir/.hpt_run.lock` while it trains; a second
  run into the same `output_dir` stops at once. The OS releases the lock when the holder dies, even by SIGKILL.
- **Fresh run** ([`check_fresh_output_dir`]): an `output_dir` that already holds checkpoints is refused, unless
  `overwrite_output_dir` (then they are deleted first), so that a later `resume last` cannot pick another run's.
- **`resume last`** ([`newest_complete_checkpoint`]): the newest checkpoint whose `trainer_state.json` (written last by
  the Trainer) is present and readable; a torn one (killed during its save) is skipped with a warning.
- **Resume** ([`compare_settings`], [`check_optimizer_state`]): refused when the checkpoint belongs to another run, was
  saved without its optimizer (`save_only_model`), or was made with other settings that change the algorithm or the
  data; a change of a legitimate setting (`max_steps`, logging, saving, ...) is only logged.
- **Already finished** ([`finished_step`]): resuming a checkpoint at `max_steps` trains nothing.
- **Full disk** ([`explain_disk_full`]): a save that fails for lack of space says so, with the path.

Pure functions decide; [`RunGuard`] wires them into `HPTTrainer.train` and `_save_checkpoint`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Any

from .gate_log import GATE_LOG_NAME

logger = logging.getLogger(__name__)

RUN_RECORD_NAME = "hpt_run.json"
LOCK_NAME = ".hpt_run.lock"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers' `TRAINER_STATE_NAME`, written last in a checkpoint
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

# Settings that change the algorithm, the optimization or the data: a resume with another value is refused
ALGORITHM_SETTINGS = (
    "algorithm",
    "gamma",
    "gate",
    "gate_linear_upper",
    "gamma_off",
    "sft_loss_coef",
    "success_threshold",
    "performance_reward",
    "demonstration_column",
    "demonstration_reward",
    "luffy_shaping_gamma",
    "max_demonstration_length",
    "allow_missing_demonstrations",
    "loss_type",
    "scale_rewards",
    "beta",
    "epsilon",
    "epsilon_high",
    "delta",
    "importance_sampling_level",
    "num_generations",
    "max_completion_length",
    "max_prompt_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "mask_truncated_completions",
    "reward_weights",
    "multi_objective_aggregation",
    "top_entropy_quantile",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "generation_batch_size",  # per_device_train_batch_size x processes x steps_per_generation: the global batch
    "steps_per_generation",
    "num_iterations",
    "shuffle_dataset",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "optim",
    "max_grad_norm",
    "seed",
    "chat_template_kwargs",
)
# Settings a resumed run may change: the difference is logged
LEGITIMATE_SETTINGS = (
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "logging_strategy",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "eval_steps",
    "eval_strategy",
    "report_to",
    "run_name",
    "log_completions",
)
DATA = "training data"
REWARDS = "reward functions"


# Run records


def settings_of(args, data: dict | None = None, reward_names: list[str] | None = None) -> dict[str, Any]:
    """The compared settings of `args` (JSON values), plus the data fingerprint and the reward function names."""
    names = ALGORITHM_SETTINGS + LEGITIMATE_SETTINGS
    settings = {name: getattr(args, name) for name in names if hasattr(args, name)}
    settings = json.loads(json.dumps(settings, default=str))
    settings[DATA] = data
    settings[REWARDS] = reward_names
    return settings


def data_fingerprint(dataset, skip_columns: tuple[str, ...] = ()) -> dict | None:
    """`{"rows", "sha1"}` of a map-style dataset's content (`None` for a streaming one, which is not compared)."""
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "iter"):
        return None
    columns = [name for name in dataset.column_names if name not in skip_columns]
    digest = hashlib.sha1()
    for batch in dataset.select_columns(columns).iter(batch_size=1000):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return {"rows": len(dataset), "sha1": digest.hexdigest()}


def new_run_record(settings: dict) -> dict:
    return {"run_id": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": settings}


def read_run_record(folder: str) -> dict | None:
    """The run record in `folder` (an output_dir or a checkpoint), `None` if there is none or it is unreadable."""
    try:
        with open(os.path.join(folder, RUN_RECORD_NAME), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def write_run_record(folder: str, record: dict) -> None:
    """Write `record` to `folder/hpt_run.json` atomically (temporary file + `os.replace`)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_RECORD_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _describe(value) -> str:
    if isinstance(value, dict) and set(value) == {"rows", "sha1"}:
        return f"{value['rows']} rows, sha1 {value['sha1'][:10]}"
    return repr(value)


def compare_settings(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """The differences between a checkpoint's settings and the current ones: `(refused, logged)`, each a list of
    `"name (X in the checkpoint, Y now)"`. A setting the checkpoint does not record, or a streaming dataset's `None`
    fingerprint, is not compared."""
    refused, logged = [], []
    for name in (*ALGORITHM_SETTINGS, DATA, REWARDS, *LEGITIMATE_SETTINGS):
        if name not in saved or name not in current or saved[name] is None or current[name] is None:
            continue
        if saved[name] != current[name]:
            difference = f"{name} ({_describe(saved[name])} in the checkpoint, {_describe(current[name])} now)"
            (logged if name in LEGITIMATE_SETTINGS else refused).append(difference)
    return refused, logged


# Checkpoints


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of the `checkpoint-N` folders in `output_dir`, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found, reverse=True)


def checkpoint_problem(checkpoint: str) -> str | None:
    """Why `checkpoint` is incomplete (torn by a kill during its save), or `None`. The Trainer writes
    `trainer_state.json` last, so a complete checkpoint has a readable one with a `global_step`."""
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return f"it has no {TRAINER_STATE_NAME}"
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        return f"its {TRAINER_STATE_NAME} is unreadable ({error})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"its {TRAINER_STATE_NAME} has no global_step"
    return None


def checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
        return json.load(f)["global_step"]


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of `output_dir` (see [`checkpoint_problem`]), each newer torn one skipped with a
    warning; `None` if there is none."""
    for _, path in list_checkpoints(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(
            f"Skipping {path}: {problem}, so it was torn (probably killed while it was being saved). Resuming from the "
            "newest complete checkpoint instead."
        )
    return None


def foreign_checkpoints(output_dir: str, run_id: str | None) -> list[str]:
    """The checkpoints of `output_dir` whose run record names another run than `run_id`."""
    foreign = []
    for _, path in list_checkpoints(output_dir):
        record = read_run_record(path)
        if record is not None and run_id is not None and record["run_id"] != run_id:
            foreign.append(path)
    return foreign


def check_fresh_output_dir(output_dir: str, overwrite: bool) -> list[str]:
    """Before a fresh run (no `resume_from_checkpoint`): the checkpoints already in `output_dir`, which `overwrite`
    allows deleting; without `overwrite` they stop the run, since a later `resume last` would pick them up."""
    existing = [path for _, path in list_checkpoints(output_dir)]
    if existing and not overwrite:
        names = ", ".join(os.path.basename(path) for path in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise ValueError(
            f"output_dir {output_dir!r} already holds checkpoints of an earlier run ({names}). A new run there would "
            "mix with them (a later `resume_from_checkpoint: last` would pick them up). Resume that run with "
            "`resume_from_checkpoint: last`, choose another output_dir, or pass `overwrite_output_dir: true` to delete "
            "them and start afresh."
        )
    return existing


def check_optimizer_state(checkpoint: str) -> None:
    """Refuse a checkpoint saved without optimizer state (`save_only_model=True`): resuming it would restart AdamW's
    moments and the learning-rate schedule silently. Recognized: `optimizer.*` (DDP, FSDP) and `global_step*`
    (DeepSpeed)."""
    names = os.listdir(checkpoint)
    if any(name.startswith(("optimizer", "global_step")) for name in names):
        return
    raise ValueError(
        f"{checkpoint} has no optimizer state (it was saved with `save_only_model: true`), so resuming from it would "
        "restart the optimizer and the learning-rate schedule and not continue the run. Resume from a checkpoint saved "
        f"without `save_only_model`, or start a new run from its weights (`model_name_or_path: {checkpoint}`)."
    )


def finished_step(checkpoint: str, max_steps: int) -> int | None:
    """The checkpoint's step if it is already at (or past) `max_steps > 0`, else `None`."""
    if max_steps is None or max_steps <= 0:
        return None
    step = checkpoint_step(checkpoint)
    return step if step >= max_steps else None


# Lock


class OutputDirLock:
    """An exclusive `flock` on `output_dir/.hpt_run.lock`, re-entrant within a process (the CLI takes it before the
    model loads, the trainer again in `train`). The OS drops it when the process exits, however it dies, so a killed
    run never leaves it stuck. Take it on the main process only."""

    _held: dict[str, list] = {}  # path -> [file descriptor, count]

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.realpath(os.path.join(output_dir, LOCK_NAME))

    def acquire(self) -> None:
        import fcntl

        if self.path in self._held:
            self._held[self.path][1] += 1
            return
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RuntimeError(
                f"Another run is training into output_dir {self.output_dir!r} ({holder}, lock {self.path}). Two runs "
                "into one output_dir would mix their checkpoints and gate logs: wait for it to end or stop it, or use "
                "another output_dir. The lock goes away when that process exits, even if it is killed."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        self._held[self.path] = [fd, 1]

    def release(self) -> None:
        import fcntl

        entry = self._held.get(self.path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])
            del self._held[self.path]


@contextmanager
def output_dir_lock(output_dir: str, enabled: bool = True):
    """Hold the [`OutputDirLock`] of `output_dir` in a `with` block (nothing when not `enabled`)."""
    lock = OutputDirLock(output_dir) if enabled else None
    if lock is not None:
        lock.acquire()
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# Full disk

DISK_FULL_MESSAGES = ("no space left", "storagefull", "iostream error", "file write failed", "disk quota")


def explain_disk_full(error: BaseException, path: str) -> OSError | None:
    """An `OSError(ENOSPC)` that names `path` and the free space, when `error` is a failed write for lack of space
    (`ENOSPC`/`EDQUOT`, or the messages of torch's and safetensors' writers, e.g. `basic_ios::clear: iostream
    error`); `None` for any other error."""
    by_errno = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not by_errno and not any(text in str(error).lower() for text in DISK_FULL_MESSAGES):
        return None
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        free = f"{shutil.disk_usage(existing or '.').free / 2**20:.0f} MiB free there now"
    except OSError:
        free = "free space unknown"
    certainty = "The disk is full" if by_errno or "space" in str(error).lower() else "The disk is probably full"
    return OSError(
        errno.ENOSPC,
        f"{certainty}: writing {path} failed ({free}; the error was: {str(error)[:200]}). The newest complete "
        "checkpoint is still usable: free some space (or set save_total_limit) and resume with "
        "`resume_from_checkpoint: last`, which skips a torn checkpoint.",
    )


@contextmanager
def disk_full_explained(path: str):
    """Re-raise a save's failure for lack of space as [`explain_disk_full`]'s error."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        explained = explain_disk_full(error, path)
        if explained is None:
            raise
        raise explained from error


# The trainer's wiring


class RunGuard:
    """What `HPTTrainer` runs around `Trainer.train` and each checkpoint save.

    Args:
        args ([`HPTConfig`]):
            The training arguments (`output_dir`, `overwrite_output_dir`, the compared settings).
        is_main_process (`bool`):
            Whether this process writes run records, deletes checkpoints and takes the lock.
    """

    def __init__(self, args, is_main_process: bool):
        self.args = args
        self.is_main_process = is_main_process
        self.record: dict | None = None
        self._lock = OutputDirLock(args.output_dir)
        self._locked = False

    def start(self, resume_from_checkpoint, settings: dict) -> str | None:
        """Take the lock, resolve and check the checkpoint (`True`/`"last"`: the newest complete one) and write the run
        record; return the checkpoint to resume from, or `None` for a fresh run."""
        output_dir = self.args.output_dir
        if self.is_main_process:
            self._lock.acquire()
            self._locked = True
        try:
            checkpoint = resolve_resume(resume_from_checkpoint, output_dir)
            if checkpoint is None:
                stale = check_fresh_output_dir(output_dir, getattr(self.args, "overwrite_output_dir", False))
                if self.is_main_process:
                    for path in stale:
                        logger.warning(f"overwrite_output_dir: deleting {path}, a checkpoint of an earlier run.")
                        shutil.rmtree(path)
                self.record = new_run_record(settings)
            else:
                self.record = self._check_resume(checkpoint, settings)
            if self.is_main_process:
                write_run_record(output_dir, self.record)
            return checkpoint
        except BaseException:
            self.stop()
            raise

    def _check_resume(self, checkpoint: str, settings: dict) -> dict:
        check_optimizer_state(checkpoint)
        saved = read_run_record(checkpoint)
        if saved is None:
            logger.warning(
                f"{checkpoint} has no {RUN_RECORD_NAME} (saved before hpt-trl recorded runs): its settings "
                "are not compared with the current ones."
            )
            return new_run_record(settings)
        foreign = foreign_checkpoints(self.args.output_dir, saved["run_id"])
        if foreign:
            raise ValueError(
                f"Resuming {checkpoint} into output_dir {self.args.output_dir!r} would mix two runs: "
                f"{', '.join(map(os.path.basename, foreign))} there belong to another run. Resume into the output_dir "
                "of the checkpoint's run, or use another output_dir."
            )
        current = read_run_record(self.args.output_dir)
        gate_log = os.path.join(self.args.output_dir, GATE_LOG_NAME)
        if current is not None and current["run_id"] != saved["run_id"] and os.path.exists(gate_log):
            if self.is_main_process:  # the gate log there is another run's: the resumed run starts its own
                os.replace(gate_log, gate_log + ".old")
            logger.warning(f"Moved {gate_log}, the gate log of another run, to {gate_log}.old.")
        refused, logged = compare_settings(saved.get("settings", {}), settings)
        if refused:
            raise ValueError(
                f"Resuming {checkpoint} with settings that differ from its run's: {'; '.join(refused)}. These change "
                "the algorithm, the optimization or the data, so the resumed run would not continue the run it "
                "belongs to. Resume with the checkpoint's settings, or start a new run from its weights "
                f"(`model_name_or_path: {checkpoint}`, another output_dir) to change them."
            )
        if logged:
            logger.warning(f"Resuming {checkpoint} with changed settings: {'; '.join(logged)}.")
        return {**saved, "settings": settings}

    def record_checkpoint(self, checkpoint: str) -> None:
        """Put the run record into `checkpoint` before the Trainer writes it (main process)."""
        if self.is_main_process and self.record is not None:
            write_run_record(checkpoint, self.record)

    def stop(self) -> None:
        if self._locked:
            self._lock.release()
            self._locked = False


def resolve_resume(value, output_dir: str) -> str | None:
    """`resume_from_checkpoint` as a checkpoint folder: `True`/`"true"`/`"last"` is the newest complete checkpoint of
    `output_dir` (an error if there is none), `None`/`False`/`"false"`/`""` a fresh run; a given folder must be
    complete."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("false", "none", "")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "last")):
        last = newest_complete_checkpoint(output_dir)
        if last is None:
            torn = [os.path.basename(path) for _, path in list_checkpoints(output_dir)]
            detail = f" complete (torn: {', '.join(torn)})" if torn else ""
            raise ValueError(f"`resume_from_checkpoint={value}` but {output_dir} has no{detail} checkpoint.")
        return last
    value = os.fspath(value)
    if not os.path.isdir(value):
        raise ValueError(f"`resume_from_checkpoint`: {value!r} is not a folder.")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise ValueError(f"Cannot resume from {value}: {problem} (it was torn by a kill during its save).")
    return value


def check_dataset_fills_a_generation_batch(num_rows: int, args) -> None:
    """Stop before the model loads when the train dataset has fewer prompts than one generation batch needs: TRL's
    sampler drops an incomplete batch, so such a run would train zero steps and report success."""
    prompts = args.generation_batch_size // args.num_generations
    if num_rows < prompts:
        raise ValueError(
            f"The train dataset has {num_rows} rows, but one generation batch needs {prompts} prompts "
            f"(generation_batch_size={args.generation_batch_size}: per_device_train_batch_size="
            f"{args.per_device_train_batch_size} x {args.world_size} process(es) x steps_per_generation="
            f"{args.steps_per_generation}, / num_generations={args.num_generations}). An incomplete batch is dropped, "
            "so nothing would be trained: use more rows (dataset_limit) or a smaller per_device_train_batch_size."
        )

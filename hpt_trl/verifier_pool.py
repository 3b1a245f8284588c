r"""math-verify checks in a small pool of worker processes, with a per-item deadline that works off the main thread.

math-verify's own timeouts use `signal.alarm`, which TRL switches off outside the main thread, so one pathological
completion could stall a training step forever. [`VerifierPool`] verifies each item in a worker process with a deadline:
an item that runs past it is unscored (`None`) and its worker is killed and replaced; a dead worker is replaced too.
The workers run this file as a script, so they import neither `hpt_trl` nor `__main__`. The reward built on it is
`hpt_trl.rewards.MathAccuracyReward`.

Why not `pebble.ProcessPool` (5.2.3, `schedule(_check, args=item, timeout=...)`, tried in place of this pool): it keeps
the deadline off the main thread, counts it from when a worker starts the item, and replaces hung and dead workers,
but each multiprocessing start method breaks something this pool guarantees. With `fork` (Linux's default) every
worker, and every replacement after a timeout, is a fork of the training process mid-run (torch's threads, a CUDA
context, vLLM), and it scored 200 items 6-8 times slower (0.71-0.94 s against 0.11-0.12 s, 2 workers, 2 shared CPU
cores). With `spawn` (or `forkserver`) each worker imports `__main__` and, to unpickle the task, `hpt_trl` with torch
and TRL: a training script without an `if __name__ == "__main__":` guard got every item back as an error (all
unscored, so nothing gated), and starting 2 workers took 7.6 s against 4.2 s (200 items: 0.13 s against 0.12 s).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque

logger = logging.getLogger(__name__)

_READY = "ready"
_UNPARSEABLE = "[unparseable]"
# Results of items the verifier could not decide: unscored (`None`), never `0.0`
_TIMEOUT = (None, "[timeout]", "[timeout]")
_ERROR = (None, "[error]", "[error]")
_CRASHED = (None, "[crashed]", "[crashed]")


class _TimeoutWatch(logging.Handler):
    """Notes math-verify's own timeouts: it logs them as warnings and then scores the item as a failed parse or a
    mismatch, which would read as a wrong answer."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.timed_out = False

    def emit(self, record: logging.LogRecord) -> None:
        self.timed_out = self.timed_out or str(record.msg).startswith("Timeout during")


def _check(completion: str, gold: str, strict: bool = False, inner_timeout: int | None = None) -> tuple:
    """Verify one item with [`_verify`]; an item on which math-verify timed out gives `(None, "[timeout]", ...)`."""
    watch, math_verify_logger = _TimeoutWatch(), logging.getLogger("math_verify")
    math_verify_logger.addHandler(watch)
    try:
        result = _verify(completion, gold, strict, inner_timeout)
    finally:
        math_verify_logger.removeHandler(watch)
    return _TIMEOUT if watch.timed_out else result


def _verify(completion: str, gold: str, strict: bool = False, inner_timeout: int | None = None) -> tuple:
    r"""Verify one item. Returns `(reward, gold_parsed, answer_parsed)`.

    With `strict=True` this is exactly `trl.rewards.accuracy_reward`. By default the answer is parsed with the same
    settings except that shorthand LaTeX such as `\frac12` or `\sqrt2` is accepted (math-verify's default
    normalization): TRL rejects it, which scores about 1% of MATH's own reference solutions 0. `inner_timeout` is
    math-verify's own (signal-based) timeout in seconds, used only on the main thread.
    """
    if strict:
        from trl.rewards import accuracy_reward

        extra = {}
        reward = accuracy_reward(
            [[{"role": "assistant", "content": completion}]],
            [gold],
            log_extra=lambda name, values: extra.__setitem__(name, values[0]),
        )[0]
        return reward, str(extra.get("gold_parsed", ""))[:200], str(extra.get("answer_parsed", ""))[:200]

    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    if threading.current_thread() is not threading.main_thread():
        inner_timeout = None  # signal.alarm only works on the main thread
    gold_parsed = parse(gold, parsing_timeout=inner_timeout)
    if not gold_parsed:
        return None, _UNPARSEABLE, "[skipped]"
    normalization = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all")
    extraction = LatexExtractionConfig(
        normalization_config=normalization, boxed_match_priority=0, try_extract_without_anchor=False
    )
    answer_parsed = parse(
        completion, extraction_config=[extraction], extraction_mode="first_match", parsing_timeout=inner_timeout
    )
    reward = float(verify(gold_parsed, answer_parsed, timeout_seconds=inner_timeout))
    return reward, str(gold_parsed)[:200], (str(answer_parsed) if answer_parsed else _UNPARSEABLE)[:200]


def _worker_main() -> None:
    """Loop of a verifier process: one JSON request `[completion, gold]` per stdin line, one JSON reply per line."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    # Timeouts log the whole (huge) input: keep math-verify's warnings (`_check` watches for timeouts), print none
    logging.getLogger("math_verify").setLevel(logging.WARNING)
    logging.getLogger("math_verify").propagate = False
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (import before saying ready, so the deadline does not count it)
    import trl.rewards  # noqa: F401

    print(_READY, flush=True)
    for line in sys.stdin:
        try:
            reply = _check(*json.loads(line))
        except Exception:  # noqa: BLE001  (an error inside the verifier leaves the item unscored, like a timeout)
            reply = _ERROR
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class _Worker:
    """One verifier process, started as `python verifier_pool.py` so that it imports neither `hpt_trl` nor `__main__`."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def wait_ready(self, timeout: float) -> bool:
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return False
        return self.proc.stdout.readline().strip() == _READY

    def send(self, item: tuple[str, str]) -> None:
        self.proc.stdin.write(json.dumps(item) + "\n")
        self.proc.stdin.flush()

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("verifier process died")
        return tuple(json.loads(line))

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=1)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _close_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.close()
    workers.clear()


class VerifierPool:
    """A few verifier processes with a per-item deadline.

    The parent hands one item at a time to each idle worker and waits on their stdout pipes until the earliest deadline.
    A reply in time is the item's result; a worker still busy at its item's deadline (or dead) is killed, the item is
    unscored (`(None, "[timeout]" or "[crashed]", ...)`), and a fresh worker takes its place. Workers start lazily, are
    reused across calls and are restarted after a `fork`. When no worker can be started (for example on Windows), items
    are verified inline, with math-verify's own timeouts on the main thread and none elsewhere.

    Args:
        num_workers (`int`):
            Number of verifier processes. `0` verifies inline.
        timeout (`float`):
            Seconds each item may take once a worker has it.
        startup_timeout (`float`, *optional*, defaults to `120.0`):
            Seconds a new worker may take to import math-verify.
    """

    def __init__(self, num_workers: int, timeout: float, startup_timeout: float = 120.0):
        self.num_workers = num_workers
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.num_timeouts = 0  # total over the pool's life
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._inline = num_workers <= 0 or os.name == "nt"
        self._finalizer = weakref.finalize(self, _close_all, self._workers)

    def _start_workers(self, count: int) -> list[_Worker]:
        """Start `count` workers at once and wait until each has imported math-verify; `[]` if any fails."""
        try:
            workers = [_Worker() for _ in range(count)]
        except OSError as error:
            logger.warning("Cannot start a verifier process (%s); verifying inline.", error)
            return []
        if all(worker.wait_ready(self.startup_timeout) for worker in workers):
            return workers
        for worker in workers:
            worker.proc.kill()
            worker.proc.wait()
        logger.warning("A verifier process did not start in %ss; verifying inline.", self.startup_timeout)
        return []

    def _ensure_workers(self) -> bool:
        if os.getpid() != self._pid:  # forked: the workers belong to the parent process
            self._workers[:] = []
            self._pid = os.getpid()
        missing = self.num_workers - len(self._workers)
        if not self._inline and missing > 0:
            started = self._start_workers(missing)
            self._workers.extend(started)
            self._inline = not started
        return not self._inline

    def map(self, items: list[tuple]) -> list[tuple[float | None, str, str]]:
        """Verify items, each the arguments of `_check`. Returns `(reward, gold_parsed, answer_parsed)` per item, the
        reward `None` for an item that timed out or whose worker died."""
        with self._lock:
            if not items:
                return []
            if not self._ensure_workers():
                return [_check(*item) for item in items]
            results: list = [None] * len(items)
            todo = deque(range(len(items)))
            idle = list(self._workers)
            busy: dict[int, tuple[_Worker, int, float]] = {}  # stdout fd -> (worker, item index, deadline)
            with selectors.DefaultSelector() as selector:
                while todo or busy:
                    while todo and idle:
                        worker, index = idle.pop(), todo.popleft()
                        try:
                            worker.send(items[index])
                        except OSError:  # died while idle
                            todo.appendleft(index)
                            idle.extend(self._replace(worker))
                            continue
                        busy[worker.proc.stdout.fileno()] = (worker, index, time.monotonic() + self.timeout)
                        selector.register(worker.proc.stdout, selectors.EVENT_READ)
                    if not busy:  # no worker left (none could be restarted): finish inline
                        for index in todo:
                            results[index] = _check(*items[index])
                        break
                    wait = min(deadline for _, _, deadline in busy.values()) - time.monotonic()
                    for key, _ in selector.select(max(wait, 0.0)):
                        worker, index, _ = busy.pop(key.fd)
                        selector.unregister(key.fileobj)
                        try:
                            results[index] = worker.receive()
                            idle.append(worker)
                        except (EOFError, OSError, ValueError):
                            results[index] = _CRASHED
                            idle.extend(self._replace(worker))
                    now = time.monotonic()
                    for fd, (worker, index, deadline) in list(busy.items()):
                        if deadline <= now:
                            del busy[fd]
                            selector.unregister(worker.proc.stdout)
                            self.num_timeouts += 1
                            results[index] = _TIMEOUT
                            idle.extend(self._replace(worker))
            return results

    def _replace(self, worker: _Worker) -> list[_Worker]:
        """Kill `worker` and start another; returns `[new_worker]`, or `[]` (and verifies inline from now on)."""
        worker.proc.kill()
        worker.proc.wait()
        self._workers.remove(worker)
        new = self._start_workers(1)
        self._workers.extend(new)
        self._inline = self._inline or not new
        return new

    def close(self) -> None:
        """Stop the worker processes (they also stop when this process exits). Not to be called during `map`."""
        _close_all(self._workers)


if __name__ == "__main__":  # a verifier worker, started by `_Worker`
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # do not let this package's modules shadow top-level ones (`data`, `evaluation`, ...)
    _worker_main()

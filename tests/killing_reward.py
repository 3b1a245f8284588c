"""Rewards for the crash tests. `reward`: the toy task's reward, but the process SIGKILLs itself at the
`HPT_KILL_AT_CALL`-th call (0-based), i.e. in the middle of a training step, after generation and before the gate
(unset: never). `waiting_reward`: it waits for a file (see there)."""

import os
import signal
import time

from hpt_trl.toy_task import toy_answer_reward

_calls = 0


def reward(completions, solution, **kwargs):
    global _calls
    if os.environ.get("HPT_KILL_AT_CALL") == str(_calls):
        os.kill(os.getpid(), signal.SIGKILL)
    _calls += 1
    return toy_answer_reward(completions, solution, **kwargs)


def waiting_reward(completions, solution, **kwargs):
    """The toy task's reward, but from the `HPT_WAIT_AT_CALL`-th call (0-based) on, it waits until the file
    `HPT_WAIT_FOR` exists (at most 10 minutes): keeps a run training while a test does something else."""
    global _calls
    if os.environ.get("HPT_WAIT_FOR") and _calls >= int(os.environ.get("HPT_WAIT_AT_CALL", "0")):
        deadline = time.time() + 600
        while not os.path.exists(os.environ["HPT_WAIT_FOR"]) and time.time() < deadline:
            time.sleep(0.2)
    _calls += 1
    return toy_answer_reward(completions, solution, **kwargs)

"""A reward for the crash tests: the toy task's reward, but the process SIGKILLs itself at the `HPT_KILL_AT_CALL`-th
call (0-based), i.e. in the middle of a training step, after generation and before the gate (unset: never)."""

import os
import signal

from hpt_trl.toy_task import toy_answer_reward

_calls = 0


def reward(completions, solution, **kwargs):
    global _calls
    if os.environ.get("HPT_KILL_AT_CALL") == str(_calls):
        os.kill(os.getpid(), signal.SIGKILL)
    _calls += 1
    return toy_answer_reward(completions, solution, **kwargs)

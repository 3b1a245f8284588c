r"""A math verifier reward (0/1) that never hangs, built on TRL's `accuracy_reward` (math-verify).

The check is `trl.rewards.accuracy_reward`'s (math-verify; the answer must be in `\boxed{}` or follow "final answer
is"), except that shorthand LaTeX like `\frac12` is accepted unless `strict=True`. What this module adds:

- **A deadline that works off the main thread.** math-verify's own timeouts use `signal.alarm`, which TRL switches off
  outside the main thread, so one pathological completion could stall a training step forever. Here every item is
  verified in a small pool of worker processes (`hpt_trl.verifier_pool`), each with a per-item deadline; an item that
  runs past it is unscored (`None`) and its worker is killed and replaced.
- **Unknown is not wrong.** An item the verifier could not decide gives `None` (the rollout is unscored), never `0.0`:
  math-verify's own timeout, the deadline, a verifier error or a dead worker. A `0.0` always means "checked and wrong",
  so a slow verifier cannot make a solved prompt look failed to HPT's gate. The other side: such a rollout carries no
  penalty either; `math_accuracy_reward/timeouts` in the training logs counts the timeouts.
- **Input guards.** Only the last `max_chars` characters of a completion are looked at (the final answer is at the
  end), and a completion whose braces nest deeper than `max_brace_depth` scores `0.0` without being parsed.
- **Bare gold answers.** Gold answers such as `\frac{1}{3}` or `\left( 3, \frac{\pi}{2} \right)` are wrapped in
  `\boxed{}` before parsing, since math-verify misreads most of them bare. A gold answer that still cannot be parsed
  (for example an empty one) gives `None`: the rollout is unscored.

**Prompts whose rollouts are all unscored.** TRL turns `None` into NaN, and a group of NaN rewards gets zero advantage.
The HPT trainer computes the prompt's success rate P over scored rollouts only; when none is scored, P is NaN and the
prompt is *not* gated: it stays on the RL branch (where those rollouts contribute no gradient) instead of switching to
SFT on the demonstration. See `docs/evaluation.md`.
"""

from __future__ import annotations

import os
import threading

from .verifier_pool import _TIMEOUT, _UNPARSEABLE, VerifierPool


def _completion_text(completion) -> str:
    """Text of a completion given as a string or as a conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)) and completion:
        assistant = [m for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        message = (assistant or list(completion))[-1]
        return str(message.get("content") or "") if isinstance(message, dict) else str(message)
    return ""


def normalize_gold(solution) -> str | None:
    r"""Return the gold answer as a string math-verify can parse, or `None` when there is none.

    A full solution (one that already has `\boxed`, `$...$`, `\(...\)` or `\[...\]`) is kept as is; a bare answer such as
    `\frac{1}{3}` is wrapped in `\boxed{}`.
    """
    if isinstance(solution, (list, tuple)):  # verl-style `ground_truth` lists
        solution = solution[0] if solution else None
    if solution is None:
        return None
    text = str(solution).strip()
    if not text:
        return None
    unescaped_dollar = any(ch == "$" and (i == 0 or text[i - 1] != "\\") for i, ch in enumerate(text))
    if "\\boxed" in text or "\\(" in text or "\\[" in text or unescaped_dollar:
        return text
    return "\\boxed{" + text + "}"


def _brace_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch == "{":
            depth += 1
            best = max(best, depth)
        elif ch == "}":
            depth = max(depth - 1, 0)
    return best


class MathAccuracyReward:
    r"""Reward 1.0 when a completion's final answer matches the gold answer (math-verify), else 0.0; never hangs.

    A callable with TRL's reward-function signature, usable in `reward_funcs` of TRL trainers and picklable. Each item
    is checked as [`trl.rewards.accuracy_reward`] does (the answer must be in `\boxed{}` or follow "final answer is";
    shorthand such as `\frac12` is accepted unless `strict=True`) in a [`VerifierPool`] process with a per-item
    deadline:

    - a completion is cut to its last `max_chars` characters, and one whose braces nest deeper than `max_brace_depth`
      scores `0.0` unparsed;
    - an item the verifier cannot decide gives `None` (the rollout is unscored), never `0.0`: an unparseable gold
      answer, math-verify's own timeout, the deadline, an error in the verifier or a dead verifier process. A prompt
      whose rollouts are all unscored has a NaN success rate P and is not gated by HPT: it stays on RL, where TRL gives
      its rollouts zero advantage. A timed-out rollout therefore never counts as a failure in P.

    Args:
        timeout (`float`, *optional*, defaults to `5.0`):
            Seconds allowed to verify one item.
        num_workers (`int` or `None`, *optional*):
            Verifier processes; defaults to `min(4, os.cpu_count())`. `0` verifies inline (no deadline off the main
            thread).
        max_chars (`int`, *optional*, defaults to `4000`):
            Only the last `max_chars` characters of a completion are verified.
        max_brace_depth (`int`, *optional*, defaults to `50`):
            Completions whose braces nest deeper score `0.0` without being parsed.
        strict (`bool`, *optional*, defaults to `False`):
            Use `trl.rewards.accuracy_reward` unchanged, which rejects shorthand LaTeX like `\frac12` in answers.

    Example:
    ```python
    >>> from hpt_trl.rewards import math_accuracy_reward

    >>> completions = [r"So the answer is $\boxed{\frac{1}{3}}$.", r"$\boxed{2}$", r"$\boxed{1}$"]
    >>> math_accuracy_reward(completions, [r"\frac{1}{3}", "3", ""])
    [1.0, 0.0, None]
    ```
    """

    # TRL logs rewards by function name; its own `accuracy_reward` is another function
    __name__ = "math_accuracy_reward"

    def __init__(
        self,
        timeout: float = 5.0,
        num_workers: int | None = None,
        max_chars: int = 4000,
        max_brace_depth: int = 50,
        strict: bool = False,
    ):
        self.timeout = timeout
        self.strict = strict
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.max_chars = max_chars
        self.max_brace_depth = max_brace_depth
        self._pool: VerifierPool | None = None
        self._pool_lock = threading.Lock()

    @property
    def pool(self) -> VerifierPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = VerifierPool(self.num_workers, self.timeout)
            return self._pool

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_pool_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _pool=None, _pool_lock=threading.Lock())

    def __call__(self, completions: list, solution: list, log_extra=None, log_metric=None, **kwargs):
        """Score `completions` against `solution`.

        Args:
            completions (`list[str]` or `list[list[dict[str, str]]]`):
                Completions, as text or as conversational lists of messages (the last assistant message is scored).
            solution (`list[str]`):
                Gold answers (bare, like `72` or `\\frac{1}{3}`, or full solutions with a `\\boxed{}` answer).
            log_extra (`callable`, *optional*):
                Provided by TRL trainers to log the parsed gold and answer to the completions table.
            log_metric (`callable`, *optional*):
                Provided by TRL trainers; used to log how many items timed out (`math_accuracy_reward/timeouts`).

        Returns:
            `list[float | None]`: `1.0` correct, `0.0` wrong, `None` unscored (unparseable gold answer, timeout,
            verifier error or dead verifier process).
        """
        golds = [normalize_gold(sol) for sol in solution]
        if len(golds) != len(completions):
            raise ValueError(f"Got {len(completions)} completions but {len(golds)} solutions.")
        results: list = [None] * len(completions)
        todo, items = [], []
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            text = _completion_text(completion)[-self.max_chars :]
            if gold is None:
                results[i] = (None, _UNPARSEABLE, "[skipped]")
            elif _brace_depth(text) > self.max_brace_depth:
                results[i] = (0.0, "", "[too deeply nested]")
            else:
                todo.append(i)
                # math-verify's own timeouts (parse gold, parse answer, verify) end before the deadline kills the worker
                items.append((text, gold, self.strict, max(1, int(self.timeout // 3))))
        for i, result in zip(todo, self.pool.map(items)):
            results[i] = result
        if log_extra is not None:
            log_extra("solution", [str(sol) for sol in solution])
            log_extra("gold_parsed", [r[1] for r in results])
            log_extra("answer_parsed", [r[2] for r in results])
        if log_metric is not None:  # math-verify's own timeouts and the deadline's
            log_metric("math_accuracy_reward/timeouts", float(sum(r[1] == _TIMEOUT[1] for r in results)))
        return [None if r[0] is None else float(r[0]) for r in results]

    def close(self) -> None:
        """Stop the verifier processes."""
        if self._pool is not None:
            self._pool.close()


def get_math_accuracy_reward(
    timeout: float = 5.0,
    num_workers: int | None = None,
    max_chars: int = 4000,
    max_brace_depth: int = 50,
    strict: bool = False,
) -> MathAccuracyReward:
    """Return a [`MathAccuracyReward`] with its own verifier pool and settings (see its docstring for the arguments)."""
    return MathAccuracyReward(timeout, num_workers, max_chars, max_brace_depth, strict)


math_accuracy_reward = MathAccuracyReward()
"""The default verifier reward: 5 s per item, up to 4 worker processes (started on first use)."""

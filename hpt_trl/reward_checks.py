"""Checks on what the reward functions return and on whether the correctness reward can ever define success.

- [`check_reward_output`]: a reward function returns one reward per completion, each a type TRL turns into a float
  (a number, `None`, a bool, a numpy scalar or a one-element torch tensor); a dict, a string or a nested list stops
  with the function's name and the type (TRL would iterate a dict's keys and use them as rewards).
- [`ScoringWatch`]: when no rollout of a generation batch is scored by the correctness reward (P is NaN for every
  prompt, so nothing is gated), warn at the first such batch and stop after `MAX_UNSCORED_GENERATIONS` in a row.
  When no rollout has succeeded in the first `THRESHOLD_WATCH_GENERATIONS` generation batches although the correctness
  reward took at least two values, all below `success_threshold`, warn: the threshold is likely above every value
  the reward can give, and every scored prompt is gated.
"""

from __future__ import annotations

import functools
import logging
import numbers
from collections.abc import Callable

import numpy as np
import torch
from trl.trainer.utils import is_async_callable

from .gate import KNOWN_CORRECTNESS_REWARDS

logger = logging.getLogger(__name__)

MAX_UNSCORED_GENERATIONS = 5  # consecutive generation batches with no scored rollout before training stops
THRESHOLD_WATCH_GENERATIONS = 5  # generation batches after which an unreachable success_threshold is reported


def _is_reward_value(value) -> bool:
    """Whether TRL's `torch.tensor(rewards)` takes `value` as one reward (after it maps `None` to NaN)."""
    if value is None or isinstance(value, (numbers.Real, np.bool_)):  # int, float, bool, numpy ints and floats
        return True
    return isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()


def check_reward_output(name: str, output, num_completions: int) -> None:
    """Raise a `TypeError` naming reward function `name` unless `output` is a sequence of `num_completions` rewards of
    the types TRL accepts (see the module docstring)."""
    if isinstance(output, (dict, str, bytes, set)) or not hasattr(output, "__len__") or not hasattr(output, "__iter__"):
        raise TypeError(
            f"The reward function {name!r} returned a {type(output).__name__}; it must return a list with one reward "
            f"per completion ({num_completions} here): numbers, or None for an unscored completion."
        )
    for index, value in enumerate(output):
        if not _is_reward_value(value):
            raise TypeError(
                f"The reward function {name!r} returned a {type(value).__name__} for completion {index} "
                f"({str(value)[:80]!r}); each reward must be a number (int, float, bool, a numpy or one-element torch "
                "scalar) or None for an unscored completion."
            )


def checked_reward_func(func: Callable, name: str) -> Callable:
    """`func` (sync or async), with its output checked by [`check_reward_output`]; same name for TRL's logs."""
    if is_async_callable(func):

        @functools.wraps(func)
        async def checked_async(*args, **kwargs):
            output = await func(*args, **kwargs)
            check_reward_output(name, output, len(kwargs.get("completions", ())))
            return output

        return checked_async

    @functools.wraps(func)
    def checked(*args, **kwargs):
        output = func(*args, **kwargs)
        check_reward_output(name, output, len(kwargs.get("completions", ())))
        return output

    if not hasattr(func, "__name__"):  # a callable object: keep TRL's name for it
        checked.__name__ = name
    return checked


def warn_if_threshold_unreachable(reward_name: str, success_threshold: float) -> bool:
    """At construction: warn (and return `True`) when the correctness reward is a known 0/1 verifier and
    `success_threshold > 1`, which no rollout can reach."""
    if reward_name in KNOWN_CORRECTNESS_REWARDS and success_threshold > 1.0:
        logger.warning(
            f"success_threshold={success_threshold} is above 1.0, the highest score of the 0/1 verifier "
            f"{reward_name!r}: no rollout can succeed, so every scored prompt has P = 0 and is gated."
        )
        return True
    return False


class ScoringWatch:
    """Watches the correctness reward over generation batches (see the module docstring).

    Args:
        reward_name (`str`):
            The correctness reward's name (`performance_reward`), for the messages.
        success_threshold (`float`):
            `HPTConfig.success_threshold`.
    """

    def __init__(self, reward_name: str, success_threshold: float):
        self.reward_name = reward_name
        self.success_threshold = success_threshold
        self.unscored_in_a_row = 0
        self.generations = 0
        self.any_success = False
        self.values: set[float] = set()
        self.threshold_warned = False

    def observe(self, correctness: torch.Tensor, success: torch.Tensor, step: int) -> None:
        """One generation batch: the correctness reward of every rollout (NaN where unscored) and its success (1/0/NaN).
        Warns, or raises a `RuntimeError` after `MAX_UNSCORED_GENERATIONS` batches in a row with nothing scored."""
        self.generations += 1
        scored = ~torch.isnan(correctness)
        if not scored.any():
            self.unscored_in_a_row += 1
            if self.unscored_in_a_row >= MAX_UNSCORED_GENERATIONS:
                raise RuntimeError(
                    f"The correctness reward {self.reward_name!r} scored no rollout (it returned None for all of "
                    f"them) in {self.unscored_in_a_row} generation batches in a row (up to step {step}): P is "
                    "undefined for every prompt and nothing is gated. Check the column it reads (e.g. blank "
                    "`solution` cells) and `performance_reward`."
                )
            if self.unscored_in_a_row == 1:
                logger.warning(
                    f"At step {step}, the correctness reward {self.reward_name!r} scored no rollout (None for all): P "
                    f"is undefined for every prompt and nothing is gated. Training stops after "
                    f"{MAX_UNSCORED_GENERATIONS} such generation batches in a row."
                )
            return
        self.unscored_in_a_row = 0
        self.any_success = self.any_success or bool((success[scored] == 1).any())
        if not self.any_success and len(self.values) < 100:
            self.values.update(correctness[scored].unique().tolist())
        if self.generations == THRESHOLD_WATCH_GENERATIONS and not self.any_success and len(self.values) > 1:
            highest = max(self.values)
            if highest < self.success_threshold:
                self.threshold_warned = True
                logger.warning(
                    f"No rollout has succeeded in the first {self.generations} generation batches: the correctness "
                    f"reward {self.reward_name!r} gave values up to {highest:g}, all below success_threshold="
                    f"{self.success_threshold:g}. If it cannot give more, every scored prompt has P = 0 and is gated: "
                    "lower success_threshold."
                )

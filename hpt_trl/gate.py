"""The HPT gate: per-prompt performance P and the per-prompt plan of UPGE estimators (Algorithm 1 of the HPT paper).

Everything here is a pure function of tensors and settings; `HPTTrainer` only applies the [`GatePlan`] it gets back.
One planner per algorithm, picked by name from [`PLANNERS`], as verl's `core_algos.py` registers one estimator per
name.

P is a success rate, as in the paper (the mean of a 0/1 verifier over the prompt's rollouts) and in the authors' code
(`mix_trainer.py` counts the rollouts whose reward equals the success value): a rollout succeeded when its correctness
reward is at least `success_threshold`; a rollout whose correctness reward is `None` is unscored and not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

GATE_TOLERANCE = 1e-6

# Reward functions known to score correctness with 0/1, picked as the correctness reward when several are given and
# `performance_reward` is not set (the project's verifier, then TRL's)
KNOWN_CORRECTNESS_REWARDS = ("math_accuracy_reward", "accuracy_reward", "reasoning_accuracy_reward")

# Labels of the estimators a prompt's demonstration and rollouts use, for the logs and the gate log
ESTIMATORS = ("rl", "sft", "mixed", "middle", "luffy", "srft")


def resolve_performance_reward(
    reward_names: Sequence[str], requested: str | None, required: bool = True
) -> tuple[int | None, str]:
    """
    Pick the reward function that defines success, and say why.

    Args:
        reward_names (`Sequence[str]`):
            Names of the reward functions, in order (the trainer's `reward_func_names`).
        requested (`str` or `None`):
            `HPTConfig.performance_reward`.
        required (`bool`, *optional*, defaults to `True`):
            Whether training reads P (`HPTConfig.uses_performance`). If not, an ambiguous choice gives index `None`
            (P is not computed) instead of an error, so that pure RL and SFT accept any reward functions.

    Returns:
        `tuple[int | None, str]`: the function's index (`None`: no correctness reward) and a sentence for the log.

    Raises:
        `ValueError`: if `requested` is not a name of `reward_names`, or if `required`, several functions are given,
        none is requested and not exactly one is a known correctness reward.
    """
    names = list(reward_names)
    if requested is not None:
        if requested not in names:
            raise ValueError(
                f"`performance_reward={requested!r}` is not one of the reward functions: {names}. Set it to the name "
                "of the reward that scores correctness; P is the share of rollouts it scores >= success_threshold."
            )
        return names.index(requested), f"P counts the successes of `{requested}` (performance_reward)."
    if len(names) == 1:
        return 0, f"P counts the successes of `{names[0]}`, the only reward function."
    known = [name for name in names if name in KNOWN_CORRECTNESS_REWARDS]
    if len(set(known)) == 1:
        return names.index(known[0]), (
            f"P counts the successes of `{known[0]}`, the correctness reward among {names}; set `performance_reward` "
            "to choose another."
        )
    if not required:
        return None, (
            f"P is not computed: training does not read it here, and no reward among {names} is known to score "
            "correctness."
        )
    raise ValueError(
        f"HPT gates each prompt on the success rate of its rollouts, so it must know which of the reward functions "
        f"{names} scores correctness. Set `performance_reward` to one of them (e.g. "
        f"HPTConfig(performance_reward={names[0]!r})); the others still shape the RL advantages."
    )


def resolve_success_threshold(threshold: float | None, is_reward_model: bool, reward_name: str) -> float:
    """
    The `success_threshold` in force: the one set, else 1.0 (the success value of a 0/1 or -1/+1 verifier). A reward
    model's scores are arbitrary real numbers, so no default says which of its rollouts succeeded.

    Args:
        threshold (`float` or `None`):
            `HPTConfig.success_threshold`.
        is_reward_model (`bool`):
            Whether the correctness reward is a model (a `SequenceClassification` path or instance).
        reward_name (`str`):
            Its name, for the error.

    Raises:
        `ValueError`: for a reward model and no threshold.
    """
    if threshold is not None:
        return float(threshold)
    if is_reward_model:
        raise ValueError(
            f"The correctness reward {reward_name!r} is a reward model: its scores are arbitrary real numbers, so HPT "
            "cannot tell which rollouts succeeded. Set `success_threshold` to the score from which a rollout counts "
            "as correct (e.g. HPTConfig(success_threshold=0.0)), or add a verifier function and name it in "
            "`performance_reward`."
        )
    return 1.0


def rollout_success(rewards_per_func: torch.Tensor, performance_index: int, threshold: float) -> torch.Tensor:
    """
    Whether each rollout succeeded: its correctness reward is at least `threshold`.

    Args:
        rewards_per_func (`torch.Tensor` of shape `(num_rollouts, num_reward_funcs)`):
            Rewards of all rollouts, gathered across processes (NaN where a function returned `None`).
        performance_index (`int`):
            Column of the correctness reward (see [`resolve_performance_reward`]).
        threshold (`float`):
            `HPTConfig.success_threshold`.

    Returns:
        `torch.Tensor` of shape `(num_rollouts,)`: 1.0 (success), 0.0 (failure) or NaN (unscored).
    """
    rewards = rewards_per_func[:, performance_index].double()
    success = (rewards >= threshold - GATE_TOLERANCE).float()
    return success.masked_fill(torch.isnan(rewards), torch.nan)


def performance_per_prompt(success: torch.Tensor, num_generations: int) -> torch.Tensor:
    """
    P per prompt: the share of its scored rollouts that succeeded.

    Args:
        success (`torch.Tensor` of shape `(num_prompts * num_generations,)`):
            As returned by [`rollout_success`], grouped by prompt.
        num_generations (`int`):
            Rollouts per prompt.

    Returns:
        `torch.Tensor` of shape `(num_prompts,)`, NaN for a prompt with no scored rollout.
    """
    return torch.nanmean(success.view(-1, num_generations), dim=1)


def sft_gate(performance: torch.Tensor, gamma: float) -> torch.Tensor:
    """
    The paper's switch: `True` (SFT) where `P <= gamma`.

    `gamma < 0` never gates and `gamma >= 1` always gates. A prompt with no scored rollout (P = NaN) is not gated for
    `0 <= gamma < 1`.
    """
    if gamma < 0:
        return torch.zeros_like(performance, dtype=torch.bool)
    if gamma >= 1:
        return torch.ones_like(performance, dtype=torch.bool)
    return performance.double() <= gamma + GATE_TOLERANCE  # NaN compares False


def switch_gate(performance: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's switch as `(alpha, beta)`: `(0, 1)` where [`sft_gate`] holds, else `(1, 0)`."""
    beta = sft_gate(performance, gamma).float()
    return 1.0 - beta, beta


def linear_gate(performance: torch.Tensor, lower: float, upper: float) -> tuple[torch.Tensor, torch.Tensor]:
    """
    A soft feedback function: `beta` falls linearly from 1 at `P <= lower` to 0 at `P >= upper`; `alpha = 1 - beta`.
    NaN (no scored rollout) gives `(alpha, beta) = (1, 0)`.
    """
    beta = ((upper - performance.double()) / (upper - lower)).clamp(0.0, 1.0).nan_to_num(0.0).float()
    return 1.0 - beta, beta


def group_advantages(rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """
    Advantages of groups of rewards as TRL 1.16 computes them in `GRPOTrainer._generate_and_score_completions`
    (`multi_objective_aggregation="sum_then_normalize"`): reward minus the group mean, divided by the group's
    (`"group"`) or the whole batch's (`"batch"`) Bessel-corrected std plus 1e-4, or not divided (`"none"`); NaN
    (unscored) members are left out of the statistics and get advantage 0.

    Args:
        rewards (`torch.Tensor` of shape `(num_groups, group_size)`):
            Combined rewards (weighted sum of the reward functions), NaN where unscored or not a member.
        scale_rewards (`str`):
            `"group"`, `"batch"` or `"none"`.

    Returns:
        `torch.Tensor` of the shape of `rewards`.
    """

    def nanstd(x: torch.Tensor, dim=None) -> torch.Tensor:
        count = (~torch.isnan(x)).sum(dim=dim, keepdim=dim is not None)
        mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
        variance = torch.nansum((x - mean) ** 2, dim=dim, keepdim=dim is not None) / (count - 1).clamp(min=1)
        return torch.where(count > 1, variance.sqrt(), torch.zeros_like(variance))

    centred = rewards - torch.nanmean(rewards, dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (nanstd(rewards, dim=1) + 1e-4)
    elif scale_rewards == "batch":
        centred = centred / (nanstd(rewards) + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"`scale_rewards` must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    return centred.nan_to_num(0.0)


@dataclass(frozen=True)
class GatePlan:
    """
    What each prompt of a generation batch trains, as UPGE parts. All tensors are on the CPU.

    Attributes:
        performance (`torch.Tensor` of shape `(num_prompts,)`):
            P, NaN where no rollout was scored.
        rollout_weights (`torch.Tensor` of shape `(num_prompts, num_generations)`):
            Weight of each rollout in TRL's RL loss (alpha in the paper; 0 removes the rollout).
        sft_weights (`torch.Tensor` of shape `(num_prompts,)`):
            Weight of each prompt's demonstration in the SFT term (beta in the paper), before `sft_loss_coef`.
        demonstration_advantages (`torch.Tensor` of shape `(num_prompts,)`):
            Advantage of each prompt's demonstration in the off-policy RL term (LUFFY's shaping, no clip); 0: none.
        rollout_advantages (`torch.Tensor` of shape `(num_prompts, num_generations)` or `None`):
            Advantages that replace TRL's, NaN where TRL's stay; `None` keeps all of TRL's.
        labels (`tuple[str, ...]`):
            The estimator of each prompt, one of [`ESTIMATORS`].
    """

    performance: torch.Tensor
    rollout_weights: torch.Tensor
    sft_weights: torch.Tensor
    demonstration_advantages: torch.Tensor
    rollout_advantages: torch.Tensor | None
    labels: tuple[str, ...]

    @property
    def trains_demonstration(self) -> torch.Tensor:
        """`(num_prompts,)` bool: the prompt's demonstration is in the loss."""
        return (self.sft_weights != 0) | (self.demonstration_advantages != 0)

    @property
    def gated(self) -> torch.Tensor:
        """`(num_prompts,)` bool: the prompt's demonstration is trained with SFT."""
        return self.sft_weights > 0


@dataclass(frozen=True)
class GateInputs:
    """
    What a planner sees of one generation batch. All tensors are on the CPU.

    Attributes:
        success (`torch.Tensor` of shape `(num_prompts, num_generations)`):
            1/0 per rollout, NaN where unscored (see [`rollout_success`]).
        rewards (`torch.Tensor` of shape `(num_prompts, num_generations)`):
            TRL's combined reward per rollout (weighted sum of the reward functions, NaN where all returned `None`).
        has_demonstration (`torch.Tensor` of shape `(num_prompts,)`):
            bool, the prompt has a usable demonstration.
    """

    success: torch.Tensor
    rewards: torch.Tensor
    has_demonstration: torch.Tensor

    @cached_property  # read by the planner and by `_plan`: computed once
    def performance(self) -> torch.Tensor:
        return performance_per_prompt(self.success.reshape(-1), self.success.size(1))


@dataclass(frozen=True)
class GateSettings:
    """The settings planners read; built from [`HPTConfig`] by `GateSettings.from_config`."""

    gamma: float = 0.0
    gamma_off: float | None = None
    gate: str = "switch"
    gate_linear_upper: float = 0.5
    demonstration_reward: float = 1.0
    scale_rewards: str = "none"
    gate_function: Callable | None = None

    @classmethod
    def from_config(cls, args, gate_function: Callable | None = None) -> GateSettings:
        return cls(
            gamma=float(args.gamma),
            gamma_off=None if args.gamma_off is None else float(args.gamma_off),
            gate=args.gate,
            gate_linear_upper=float(args.gate_linear_upper),
            demonstration_reward=float(args.demonstration_reward),
            scale_rewards=args.scale_rewards,
            gate_function=gate_function,
        )


def _plan(batch: GateInputs, rollout_weights, sft_weights, labels, demonstration_advantages=None, advantages=None):
    """Build a [`GatePlan`]; a prompt without a demonstration keeps all its rollouts on RL and trains no demonstration."""
    has_demo = batch.has_demonstration
    num_prompts = has_demo.numel()
    demonstration_advantages = (
        torch.zeros(num_prompts) if demonstration_advantages is None else demonstration_advantages
    )
    if not has_demo.all():
        missing = ~has_demo
        rollout_weights = torch.where(missing.unsqueeze(1), torch.ones_like(rollout_weights), rollout_weights)
        sft_weights = sft_weights.masked_fill(missing, 0.0)
        demonstration_advantages = demonstration_advantages.masked_fill(missing, 0.0)
        if advantages is not None:
            advantages = advantages.masked_fill(missing.unsqueeze(1), torch.nan)
        labels = ["rl" if m else label for m, label in zip(missing.tolist(), labels)]
    return GatePlan(
        performance=batch.performance,
        rollout_weights=rollout_weights.float(),
        sft_weights=sft_weights.float(),
        demonstration_advantages=demonstration_advantages.float(),
        rollout_advantages=advantages,
        labels=tuple(labels),
    )


def _check_gate_output(values, name: str, function: Callable, num_prompts: int) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float32).cpu()
    function_name = getattr(function, "__qualname__", type(function).__name__)
    if values.shape != (num_prompts,):
        raise ValueError(
            f"gate_function {function_name} returned {name} of shape {tuple(values.shape)}; expected one value per "
            f"prompt, shape ({num_prompts},)."
        )
    bad = ~torch.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        raise ValueError(
            f"gate_function {function_name} returned {name}={values[bad][0].item()} for a prompt; alpha and beta must "
            "be finite and in [0, 1]. It receives P = NaN for a prompt with no scored rollout: map NaN explicitly, "
            "e.g. with torch.nan_to_num."
        )
    return values


def plan_hpt(batch: GateInputs, settings: GateSettings) -> GatePlan:
    """
    HPT: `(alpha, beta)` from the feedback function (the paper's switch by default). With `gamma_off`, the authors'
    middle band `gamma < P <= gamma_off`: the prompt's rollouts are removed and its demonstration, alone in its group,
    is trained with off-policy RL with advantage `demonstration_reward` (its verifier score; veRL gives a one-member
    group its score as advantage) and LUFFY's shaping, as `select_on_off_ada_balance` with `off_add_num=-1` does.
    """
    performance, n = batch.performance, batch.success.size(1)
    if settings.gate_function is not None:
        alpha, beta = settings.gate_function(performance.clone())
        alpha = _check_gate_output(alpha, "alpha", settings.gate_function, performance.numel())
        beta = _check_gate_output(beta, "beta", settings.gate_function, performance.numel())
    elif settings.gate == "linear":
        alpha, beta = linear_gate(performance, settings.gamma, settings.gate_linear_upper)
    else:
        alpha, beta = switch_gate(performance, settings.gamma)
    labels = [
        "sft" if b == 1 and a == 0 else "rl" if b == 0 else "mixed" for a, b in zip(alpha.tolist(), beta.tolist())
    ]
    demonstration_advantages = torch.zeros_like(performance)
    if settings.gamma_off is not None:
        band = (beta == 0) & (performance > settings.gamma) & (performance <= settings.gamma_off + GATE_TOLERANCE)
        alpha = alpha.masked_fill(band, 0.0)
        demonstration_advantages = demonstration_advantages.masked_fill(band, settings.demonstration_reward)
        labels = ["middle" if in_band else label for in_band, label in zip(band.tolist(), labels)]
    rollout_weights = alpha.unsqueeze(1).expand(-1, n)
    return _plan(batch, rollout_weights, beta, labels, demonstration_advantages)


def plan_sft(batch: GateInputs, settings: GateSettings) -> GatePlan:
    """SFT on every demonstration; rollouts are sampled and scored (for the reward metric) but not trained on."""
    num_prompts, n = batch.success.shape
    return _plan(batch, torch.zeros(num_prompts, n), torch.ones(num_prompts), ["sft"] * num_prompts)


def plan_grpo(batch: GateInputs, settings: GateSettings) -> GatePlan:
    """RL only: TRL's loss, no demonstration."""
    num_prompts, n = batch.success.shape
    empty = GateInputs(batch.success, batch.rewards, torch.zeros(num_prompts, dtype=torch.bool))
    return _plan(empty, torch.ones(num_prompts, n), torch.zeros(num_prompts), ["rl"] * num_prompts)


def plan_luffy(batch: GateInputs, settings: GateSettings) -> GatePlan:
    """
    LUFFY: the demonstration takes the last rollout's place in its group; advantages over the `n - 1` rollouts plus
    the demonstration (reward `demonstration_reward`), computed as TRL computes them ([`group_advantages`]).
    """
    num_prompts, n = batch.success.shape
    group = batch.rewards.clone().float()
    group[:, -1] = settings.demonstration_reward
    advantages = group_advantages(group, settings.scale_rewards)
    rollout_advantages = advantages.clone()
    rollout_advantages[:, -1] = 0.0
    rollout_weights = torch.ones(num_prompts, n)
    rollout_weights[:, -1] = 0.0
    return _plan(
        batch, rollout_weights, torch.zeros(num_prompts), ["luffy"] * num_prompts, advantages[:, -1], rollout_advantages
    )


def plan_srft(batch: GateInputs, settings: GateSettings) -> GatePlan:
    """SRFT: SFT on every demonstration and RL on every rollout (the trainer sets SRFT's entropy-aware weights)."""
    num_prompts, n = batch.success.shape
    return _plan(batch, torch.ones(num_prompts, n), torch.ones(num_prompts), ["srft"] * num_prompts)


PLANNERS: dict[str, Callable[[GateInputs, GateSettings], GatePlan]] = {
    "hpt": plan_hpt,
    "sft": plan_sft,
    "grpo": plan_grpo,
    "luffy": plan_luffy,
    "srft": plan_srft,
}


def plan_gate(algorithm: str, batch: GateInputs, settings: GateSettings) -> GatePlan:
    """The [`GatePlan`] of `algorithm` (a key of [`PLANNERS`]) for one generation batch."""
    return PLANNERS[algorithm](batch, settings)


def finite_or_none(value: float) -> float | None:
    """A JSON-safe number for the gate log: `None` for NaN."""
    return None if math.isnan(value) else round(value, 6)

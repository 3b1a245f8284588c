"""The HPT gate: per-prompt performance P and the switch between SFT and RL (Algorithm 1 of the HPT paper)."""

import torch

GATE_TOLERANCE = 1e-6


def rollout_scores(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, performance_index: int | None = None
) -> torch.Tensor:
    """
    Score of each rollout, as P uses it.

    Args:
        rewards_per_func (`torch.Tensor` of shape `(num_rollouts, num_reward_funcs)`):
            Rewards of all rollouts, gathered across processes (NaN where a function returned `None`).
        reward_weights (`torch.Tensor` of shape `(num_reward_funcs,)`):
            Weights of the reward functions, used when `performance_index` is `None`.
        performance_index (`int` or `None`, *optional*):
            Column of the reward function that defines P. If `None`, the weighted sum of all functions (NaN only where
            every function returned `None`), as TRL's logged `reward`.

    Returns:
        `torch.Tensor` of shape `(num_rollouts,)`, NaN for unscored rollouts.
    """
    if performance_index is not None:
        return rewards_per_func[:, performance_index]
    unscored = torch.isnan(rewards_per_func).all(dim=1)
    scores = (rewards_per_func * reward_weights.to(rewards_per_func.device)).nansum(dim=1)
    return scores.masked_fill(unscored, torch.nan)


def performance_per_prompt(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """
    P per prompt: the mean score of its rollouts.

    Args:
        scores (`torch.Tensor` of shape `(num_prompts * num_generations,)`):
            Rollout scores as returned by [`rollout_scores`], grouped by prompt (NaN: unscored).
        num_generations (`int`):
            Rollouts per prompt.

    Returns:
        `torch.Tensor` of shape `(num_prompts,)`: the mean over each prompt's scored rollouts, NaN if none was scored.
    """
    return torch.nanmean(scores.view(-1, num_generations), dim=1)


def sft_gate(performance: torch.Tensor, gamma: float) -> torch.Tensor:
    """
    The paper's switch: SFT (alpha=0, beta=1) where `P <= gamma`, RL (alpha=1, beta=0) elsewhere.

    `gamma < 0` never gates and `gamma >= 1` always gates, whatever the rewards' range. A prompt with no scored
    rollout (P = NaN) is not gated for `0 <= gamma < 1`.

    Args:
        performance (`torch.Tensor` of shape `(num_prompts,)`):
            P per prompt, as returned by [`performance_per_prompt`].
        gamma (`float`):
            Gate threshold.

    Returns:
        `torch.Tensor` of dtype `bool` and shape `(num_prompts,)`: `True` for prompts trained with SFT.
    """
    if gamma < 0:
        return torch.zeros_like(performance, dtype=torch.bool)
    if gamma >= 1:
        return torch.ones_like(performance, dtype=torch.bool)
    return performance.double() <= gamma + GATE_TOLERANCE  # NaN compares False


# Which UPGE estimator a prompt's demonstration and rollouts use, for logging and the gate log
ESTIMATORS = ("rl", "sft", "mixed", "offline", "luffy", "srft")


def linear_gate(performance: torch.Tensor, lower: float, upper: float) -> tuple[torch.Tensor, torch.Tensor]:
    """
    A soft feedback function: `beta` falls linearly from 1 at `P <= lower` to 0 at `P >= upper`; `alpha = 1 - beta`.

    Args:
        performance (`torch.Tensor` of shape `(num_prompts,)`):
            P per prompt. NaN (no scored rollout) gives `(alpha, beta) = (1, 0)`.
        lower (`float`):
            Threshold under which the prompt is pure SFT.
        upper (`float`):
            Threshold above which the prompt is pure RL.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(alpha, beta)`, each of shape `(num_prompts,)`.
    """
    beta = ((upper - performance.double()) / (upper - lower)).clamp(0.0, 1.0).nan_to_num(0.0).float()
    return 1.0 - beta, beta


def switch_gate(performance: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's switch as `(alpha, beta)`: `(0, 1)` where [`sft_gate`] holds, else `(1, 0)`."""
    beta = sft_gate(performance, gamma).float()
    return 1.0 - beta, beta


def mixed_group_advantages(
    rewards: torch.Tensor, demonstration_reward: float, scale: bool, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Advantages of a group of rollouts extended with its demonstration as one more (off-policy) member, as in LUFFY.

    Args:
        rewards (`torch.Tensor` of shape `(num_prompts, num_generations)`):
            Rollout rewards (NaN: unscored, ignored).
        demonstration_reward (`float`):
            Reward of the demonstration (demonstrations are assumed correct).
        scale (`bool`):
            Divide by the group's std (+1e-4), as TRL does with `scale_rewards="group"`.
        keep (`torch.Tensor` of dtype `bool` and shape `(num_prompts, num_generations)`, *optional*):
            Rollouts that stay in the group (LUFFY replaces one rollout by the demonstration).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: rollout advantages `(num_prompts, num_generations)` (0 where not kept or
        unscored) and demonstration advantages `(num_prompts,)`.
    """
    keep = torch.ones_like(rewards, dtype=torch.bool) if keep is None else keep
    kept = rewards.masked_fill(~keep, torch.nan)
    demo = torch.full_like(rewards[:, :1], demonstration_reward)
    group = torch.cat([kept, demo], dim=1)
    centred = group - torch.nanmean(group, dim=1, keepdim=True)
    if scale:
        count = (~torch.isnan(group)).sum(dim=1, keepdim=True)
        variance = torch.nansum(centred**2, dim=1, keepdim=True) / (count - 1).clamp(min=1)
        centred = centred / (variance.sqrt() + 1e-4)
    centred = centred.nan_to_num(0.0)
    return centred[:, :-1], centred[:, -1]

"""The HPT gate: per-prompt performance P and the switch between SFT and RL (Algorithm 1 of the HPT paper)."""

import torch

GATE_TOLERANCE = 1e-6


def performance_per_prompt(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    performance_index: int | None = None,
) -> torch.Tensor:
    """
    Mean score of each prompt's rollouts.

    Args:
        rewards_per_func (`torch.Tensor` of shape `(num_prompts * num_generations, num_reward_funcs)`):
            Rewards of all rollouts, gathered across processes, grouped by prompt (NaN where a function returned
            `None`).
        reward_weights (`torch.Tensor` of shape `(num_reward_funcs,)`):
            Weights of the reward functions, used when `performance_index` is `None`.
        num_generations (`int`):
            Rollouts per prompt.
        performance_index (`int` or `None`, *optional*):
            Column of the reward function that defines P. If `None`, the weighted sum of all functions (NaN only where
            every function returned `None`), as TRL's logged `reward`.

    Returns:
        `torch.Tensor` of shape `(num_prompts,)`: P per prompt, the mean over its scored rollouts, NaN if none was
        scored.
    """
    if performance_index is None:
        unscored = torch.isnan(rewards_per_func).all(dim=1)
        scores = (rewards_per_func * reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        scores = scores.masked_fill(unscored, torch.nan)
    else:
        scores = rewards_per_func[:, performance_index]
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

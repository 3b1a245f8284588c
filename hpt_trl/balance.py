"""The SFT/RL balance: how much a demonstration weighs against the rollouts in one optimizer step.

The authors' code (`TsinghuaC3I/Unify-Post-Training`, `mix_actor.py` with `loss_remove_token_mean=True`) adds, per
micro-batch, `sft_loss_coef * token_mean_NLL(demonstrations of the micro-batch) + sum(per-token RL loss) /
max_response_length`, and sums the micro-batches. A gated prompt's rollouts are removed and its demonstration joins the
batch as one row, so with one demonstration per micro-batch a demonstration weighs as much as one full-length rollout
with advantage 1, and the SFT weight grows linearly with the number of gated prompts.

Here a gated prompt's rollouts stay in TRL's batch with loss weight 0 (so TRL's normalizers do not change), and its
demonstration enters the loss as one row whose token-mean NLL weighs as much as one full-length rollout
(`max_completion_length` tokens) with advantage 1 under the RL term's normalizer:

    demonstration term = sft_loss_coef * beta * token_mean_NLL * max_completion_length / rollout_normalizer

where a rollout contributes `sum_t loss_t / rollout_normalizer` to TRL's loss (see [`rollout_normalizer`]). Up to one
constant shared by both terms (TRL divides by the number of rows, the authors do not), this is the authors' SFT:RL
ratio, and it does not depend on how the batch is split into micro-batches, accumulation steps or processes.
"""

from __future__ import annotations

import torch

# Loss types whose normalizer of a full-length row does not depend on the micro-batch split
DEMONSTRATION_LOSS_TYPES = ("dr_grpo", "grpo", "sapo", "dapo", "cispo")
REJECTED_LOSS_TYPES = {
    "bnpo": "its normalizer is the number of tokens of each micro-batch, so a demonstration's weight would depend "
    "on the micro-batch it lands in; use 'dapo', its split-invariant version",
    "luspo": "its sequence-level length-scaled objective has no per-token rollout weight to match a demonstration to",
    "vespo": "its variational sequence weights have no per-token rollout weight to match a demonstration to",
}


def check_loss_type(loss_type: str, trains_demonstrations: bool) -> None:
    """Raise a `ValueError` if demonstrations are trained and `loss_type` cannot weigh them against rollouts."""
    if trains_demonstrations and loss_type in REJECTED_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} cannot be combined with training on demonstrations: "
            f"{REJECTED_LOSS_TYPES[loss_type]}. Supported: {DEMONSTRATION_LOSS_TYPES} (HPT uses 'dr_grpo')."
        )


def rollout_normalizer(
    loss_type: str,
    *,
    max_completion_length: int,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    steps_per_generation: int,
    num_processes: int,
    num_items_in_batch: torch.Tensor | float | None = None,
) -> torch.Tensor | float:
    """
    The `N` such that a full-length rollout (`max_completion_length` tokens, all in the loss) contributes
    `sum_t loss_t / N` to one micro-batch's loss in TRL 1.16's `GRPOTrainer._compute_loss`, gradient accumulation
    included.

    - `"dr_grpo"`: TRL divides by `rows * max_completion_length`;
    - `"grpo"`, `"sapo"`: a token mean per row, then a mean over rows, i.e. `rows * length` for a full-length row;
    - `"dapo"`, `"cispo"`: the generation batch's loss tokens over processes and accumulation windows.

    Args:
        loss_type (`str`):
            One of [`DEMONSTRATION_LOSS_TYPES`].
        max_completion_length (`int`), per_device_batch_size (`int`), gradient_accumulation_steps (`int`),
        steps_per_generation (`int`), num_processes (`int`):
            As in the trainer (`current_gradient_accumulation_steps` for the accumulation).
        num_items_in_batch (`torch.Tensor`, `float` or `None`):
            TRL's `num_items_in_batch` (loss tokens of the generation batch, all processes); needed by `"dapo"` and
            `"cispo"`.

    Returns:
        `torch.Tensor` or `float`: `N`.
    """
    if loss_type in ("dr_grpo", "grpo", "sapo"):
        return per_device_batch_size * max_completion_length * gradient_accumulation_steps
    if loss_type in ("dapo", "cispo"):
        tokens = torch.as_tensor(num_items_in_batch).clamp(min=1.0)
        return tokens / num_processes * gradient_accumulation_steps / steps_per_generation
    raise ValueError(f"No rollout normalizer for loss_type={loss_type!r}; supported: {DEMONSTRATION_LOSS_TYPES}.")


def demonstration_sft_loss(
    token_nll: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, max_completion_length: int, normalizer
) -> torch.Tensor:
    """
    The SFT term of a micro-batch's demonstrations (before `sft_loss_coef`): each demonstration's token-mean NLL,
    times its weight, as one full-length rollout with advantage 1.

    Args:
        token_nll (`torch.Tensor` of shape `(num_demonstrations, length)`):
            Per-token NLL.
        mask (`torch.Tensor` of the same shape):
            1 on demonstration tokens.
        weights (`torch.Tensor` of shape `(num_demonstrations,)`):
            beta per demonstration (0 for a demonstration that is not trained with SFT).
        max_completion_length (`int`):
            The length of a full-length rollout.
        normalizer:
            [`rollout_normalizer`].
    """
    token_mean = (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return (token_mean * weights).sum() * max_completion_length / normalizer

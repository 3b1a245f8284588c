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

import math
from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------------------------------------
# The authors' packing (`sft_weighting="authors_packing"`)
#
# In the authors' runs (veRL, `use_dynamic_bsz=True`) the SFT term of a micro-batch is a token mean over the
# demonstrations *in that micro-batch*, so demonstrations that share a micro-batch share one unit of SFT weight. Which
# rows share a micro-batch follows from their batching, replayed here on the lengths of the generation batch:
#   1. the kept rollouts in prompt order, then one row per demonstration (veRL appends them), padded to a multiple of
#      8 (and of the GPUs) by repeating the last row (`mix_trainer.py`);
#   2. rows spread over the GPUs by token-balanced partitions of equal row counts (`_balance_batch`, Karmarkar-Karp);
#   3. on each GPU, the padding rows dropped and the rows cut into mini-batches (one optimizer step each) in order;
#   4. each mini-batch cut into ceil(tokens / max_tokens_per_gpu) token-balanced micro-batches, the count being the
#      largest over the GPUs (`rearrange_micro_batches`, Karmarkar-Karp without equal sizes).
# A row's length is its prompt plus response tokens (veRL's attention mask).
# ---------------------------------------------------------------------------------------------------------------------


class _Partition:
    __slots__ = ("items", "total")

    def __init__(self):
        self.total, self.items = 0, []

    def key(self):  # veRL's `Set.__lt__`: sum, then number of items, then the items
        return (self.total, len(self.items), self.items)


class _PartialSolution:
    """A state of the largest differencing method, ordered as veRL's `State` (largest spread popped first)."""

    def __init__(self, items: list[tuple[int, int]], k: int):
        self.sets = [_Partition() for _ in range(k)]
        for part, (index, length) in zip(self.sets, items):
            part.items.append((index, length))
            part.total += length
        self.sets.sort(key=_Partition.key, reverse=True)

    @property
    def spread(self) -> int:
        return self.sets[0].total - self.sets[-1].total

    def merge(self, other: _PartialSolution) -> None:
        for mine, theirs in zip(self.sets, reversed(other.sets)):
            mine.items.extend(theirs.items)
            mine.total += theirs.total
        self.sets.sort(key=_Partition.key, reverse=True)

    def __lt__(self, other: _PartialSolution) -> bool:
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.sets[0].key() > other.sets[0].key()


def balanced_partitions(lengths: list[int], k: int, equal_size: bool) -> list[list[int]]:
    """
    Row indices of `k` token-balanced partitions of `lengths`, each sorted, in veRL's order: the largest differencing
    (Karmarkar-Karp) method of `verl.utils.seqlen_balancing.get_seqlen_balanced_partitions`, same tie-breaking.
    """
    import heapq

    if len(lengths) < k:
        raise ValueError(f"Cannot split {len(lengths)} rows into {k} partitions.")
    ordered = sorted((length, index) for index, length in enumerate(lengths))
    if equal_size:
        if len(lengths) % k:
            raise ValueError(f"{len(lengths)} rows cannot be split into {k} partitions of equal size.")
        groups = [ordered[start : start + k] for start in range(0, len(ordered), k)]
    else:
        groups = [[item] for item in ordered]
    heap = []
    for group in groups:
        heapq.heappush(heap, _PartialSolution([(index, length) for length, index in group], k))
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        first.merge(second)
        heapq.heappush(heap, first)
    return [sorted(index for index, _ in part.items) for part in heap[0].sets]


@dataclass(frozen=True)
class AuthorsPacking:
    """
    Where the rows of one generation batch land in the authors' micro-batches (see [`authors_packing`]).

    Attributes:
        sft_weights (`list[float]`):
            Per demonstration: its share of its micro-batch's SFT token mean, `T_i / sum of T_j` over the SFT
            demonstrations `j` of the micro-batch (`T`: demonstration tokens); 0 for a demonstration not trained with
            SFT. Today's rule (`"per_demonstration"`) is 1 for every demonstration.
        rollout_micro_batch_tokens (`list[int]`):
            Per rollout row: the response tokens of its micro-batch (rollouts and demonstrations), 0 for a removed row.
        demonstration_micro_batch_tokens (`list[int]`):
            The same per demonstration.
        micro_batches (`list[list[int]]`):
            Every micro-batch, as indices into the authors' layout: rollout rows first (their index in the generation
            batch), then demonstrations (`num_rollouts + their index`).
    """

    sft_weights: list[float]
    rollout_micro_batch_tokens: list[int]
    demonstration_micro_batch_tokens: list[int]
    micro_batches: list[list[int]]


def authors_packing(
    rollout_lengths: list[int],
    rollout_response_tokens: list[int],
    rollout_kept: list[bool],
    demonstration_lengths: list[int],
    demonstration_tokens: list[int],
    demonstration_sft: list[bool],
    *,
    num_gpus: int,
    rows_per_mini_batch: int,
    max_tokens_per_gpu: int,
) -> AuthorsPacking:
    """
    Replay the authors' batching of one generation batch (veRL with `use_dynamic_bsz`; see the comment above).

    Args:
        rollout_lengths (`list[int]`):
            Prompt plus response tokens of every rollout of the generation batch, in prompt order.
        rollout_response_tokens (`list[int]`):
            Response tokens of every rollout.
        rollout_kept (`list[bool]`):
            Whether each rollout stays in the batch (`False`: its prompt was gated, the authors remove it).
        demonstration_lengths (`list[int]`):
            Prompt plus demonstration tokens of each demonstration that joins the batch, in prompt order.
        demonstration_tokens (`list[int]`):
            Demonstration tokens of each.
        demonstration_sft (`list[bool]`):
            Whether each demonstration is trained with SFT (in the SFT token mean) rather than off-policy RL.
        num_gpus (`int`):
            Data-parallel size of the authors' run (8).
        rows_per_mini_batch (`int`):
            Rows per GPU per optimizer step: `ppo_mini_batch_size * n / num_gpus` (64 * 8 / 8 = 64).
        max_tokens_per_gpu (`int`):
            `ppo_max_token_len_per_gpu` (32768).
    """
    layout = [i for i, kept in enumerate(rollout_kept) if kept]
    num_rollouts = len(rollout_lengths)
    layout += [num_rollouts + j for j in range(len(demonstration_lengths))]
    lengths = list(rollout_lengths) + list(demonstration_lengths)
    response = list(rollout_response_tokens) + list(demonstration_tokens)
    padding = -len(layout) % math.lcm(8, num_gpus)  # veRL pads to a multiple of 8, then splits over the GPUs
    padded = layout + [layout[-1]] * padding if layout else []
    is_padding = [False] * len(layout) + [True] * padding
    per_gpu = []
    if padded:
        for part in balanced_partitions([lengths[row] for row in padded], num_gpus, equal_size=True):
            rows = [padded[position] for position in part if not is_padding[position]]
            per_gpu.append(
                [rows[start : start + rows_per_mini_batch] for start in range(0, len(rows), rows_per_mini_batch)]
            )
    micro_batches = []
    for step in range(max((len(steps) for steps in per_gpu), default=0)):
        mini_batches = [steps[step] for steps in per_gpu if step < len(steps)]
        count = max(-(-sum(lengths[row] for row in rows) // max_tokens_per_gpu) for rows in mini_batches)
        for rows in mini_batches:
            if count > len(rows):
                raise ValueError(f"The authors' packing needs {count} micro-batches for {len(rows)} rows.")
            for part in balanced_partitions([lengths[row] for row in rows], count, equal_size=False):
                micro_batches.append([rows[position] for position in part])
    sft_weights = [0.0] * len(demonstration_lengths)
    tokens_of_micro_batch = [0] * len(lengths)
    for rows in micro_batches:
        demos = [row - num_rollouts for row in rows if row >= num_rollouts and demonstration_sft[row - num_rollouts]]
        sft_tokens = sum(demonstration_tokens[j] for j in demos)
        for j in demos:
            sft_weights[j] = demonstration_tokens[j] / sft_tokens if sft_tokens else 0.0
        total = sum(response[row] for row in rows)
        for row in rows:
            tokens_of_micro_batch[row] = total
    return AuthorsPacking(
        sft_weights=sft_weights,
        rollout_micro_batch_tokens=tokens_of_micro_batch[:num_rollouts],
        demonstration_micro_batch_tokens=tokens_of_micro_batch[num_rollouts:],
        micro_batches=micro_batches,
    )

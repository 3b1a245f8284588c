"""An oracle of the authors' batching and loss (TsinghuaC3I/Unify-Post-Training, veRL fork), written from their code:
`verl/utils/seqlen_balancing.py` (Karmarkar-Karp partitions, `rearrange_micro_batches`), `mix_trainer.py` (gated
rollouts removed, demonstrations appended, padding to a multiple of 8, `_balance_batch`), `mix_fsdp_worker.py`
(mini-batch rows per GPU) and `mix_actor.py` (`offline_loss_type="sft"`, `loss_remove_token_mean=True`): per
micro-batch `sft_coef * masked_mean(-logp, SFT rows) + sum(pg * mask) / max_response_length - entropy_coeff *
masked_mean(entropy, all response tokens)`, summed over the micro-batches of a mini-batch (gradient_accumulation = 1),
FSDP averaging the GPUs. Independent of `hpt_trl.balance`: used to test it."""

import heapq


class Set:
    def __init__(self):
        self.sum = 0
        self.items = []

    def add(self, idx, val):
        self.items.append((idx, val))
        self.sum += val

    def merge(self, other):
        for idx, val in other.items:
            self.items.append((idx, val))
            self.sum += val

    def __lt__(self, other):
        if self.sum != other.sum:
            return self.sum < other.sum
        if len(self.items) != len(other.items):
            return len(self.items) < len(other.items)
        return self.items < other.items


class State:
    def __init__(self, items, k):
        self.k = k
        self.sets = [Set() for _ in range(k)]
        assert len(items) in [1, k]
        for i, (idx, seqlen) in enumerate(items):
            self.sets[i].add(idx=idx, val=seqlen)
        self.sets = sorted(self.sets, reverse=True)

    @property
    def spread(self):
        return self.sets[0].sum - self.sets[-1].sum

    def merge(self, other):
        for i in range(self.k):
            self.sets[i].merge(other.sets[self.k - 1 - i])
        self.sets = sorted(self.sets, reverse=True)

    def __lt__(self, other):
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.sets[0] > other.sets[0]


def karmarkar_karp(seqlen_list, k_partitions, equal_size):
    sorted_seqlen_list = sorted([(seqlen, i) for i, seqlen in enumerate(seqlen_list)])
    states_pq = []
    if equal_size:
        for offset in range(0, len(sorted_seqlen_list), k_partitions):
            items = []
            for i in range(k_partitions):
                seqlen, idx = sorted_seqlen_list[offset + i]
                items.append((idx, seqlen))
            heapq.heappush(states_pq, State(items=items, k=k_partitions))
    else:
        for seqlen, idx in sorted_seqlen_list:
            heapq.heappush(states_pq, State(items=[(idx, seqlen)], k=k_partitions))
    while len(states_pq) > 1:
        state0 = heapq.heappop(states_pq)
        state1 = heapq.heappop(states_pq)
        state0.merge(state1)
        heapq.heappush(states_pq, state0)
    return [[idx for idx, _ in s.items] for s in states_pq[0].sets]


def get_seqlen_balanced_partitions(seqlen_list, k_partitions, equal_size):
    return [sorted(p) for p in karmarkar_karp(seqlen_list, k_partitions, equal_size)]


def micro_batches(rows, num_gpus, rows_per_mini_batch, max_token_len):
    """`rows`: the authors' batch after the gate, as (row id, length) in their order. Returns the micro-batches of row
    ids, grouped by optimizer step: `steps[s][g]` is the list of micro-batches of GPU g at step s."""
    padded = list(rows)
    remainder = len(padded) % 8
    if remainder != 0:  # whether_pad: copies of the last row, dropped by the actor
        padded += [(None, padded[-1][1])] * (8 - remainder)
    assert len(padded) % num_gpus == 0
    partitions = get_seqlen_balanced_partitions([length for _, length in padded], num_gpus, equal_size=True)
    per_gpu = [[padded[i] for i in part if padded[i][0] is not None] for part in partitions]
    steps = []
    step = 0
    while any(len(gpu) > step * rows_per_mini_batch for gpu in per_gpu):
        minis = [gpu[step * rows_per_mini_batch : (step + 1) * rows_per_mini_batch] for gpu in per_gpu]
        count = max(-(-sum(length for _, length in mini) // max_token_len) for mini in minis if mini)  # all_reduce MAX
        steps.append(
            [
                [
                    [mini[i][0] for i in part]
                    for part in get_seqlen_balanced_partitions([l for _, l in mini], count, False)
                ]
                if mini
                else []
                for mini in minis
            ]
        )
        step += 1
    return steps


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def actor_loss(steps, rows, sft_coef, entropy_coeff, max_response_length, num_gpus):
    """The authors' loss summed over the optimizer steps, each step's FSDP-averaged gradient being its gradient.
    `rows[row_id]` holds tensors `logp`, `pg` (per-token policy loss), `entropy` and `mask` of one response, and
    `sft` (bool). Returns the total as a scalar tensor."""
    total = 0.0
    for step in steps:
        for gpu in step:
            for micro in gpu:
                sft = [rows[r] for r in micro if rows[r]["sft"]]
                on = [rows[r] for r in micro if not rows[r]["sft"]]
                loss = 0.0
                if sft:
                    nll = sum((-row["logp"] * row["mask"]).sum() for row in sft)
                    loss = loss + sft_coef * nll / sum(row["mask"].sum() for row in sft)
                if on:
                    loss = loss + sum((row["pg"] * row["mask"]).sum() for row in on) / max_response_length
                entropy = sum((rows[r]["entropy"] * rows[r]["mask"]).sum() for r in micro)
                loss = loss - entropy_coeff * entropy / sum(rows[r]["mask"].sum() for r in micro)
                total = total + loss / num_gpus
    return total

"""The paper's runs step for step (docs/reproducing.md): the authors' packing of demonstrations and entropy, checked
against an oracle written from their code (tests/authors_oracle.py), the gradient-norm skip, and the paper recipes."""

import copy
import random

import authors_oracle
import pytest
import torch
from helpers import addition_dataset, mixed_reward, tiny_args
from test_modes import run_and_capture

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.balance import authors_packing, balanced_partitions, demonstration_sft_loss, rollout_normalizer
from hpt_trl.hpt_trainer import DEMO_IDS, DEMO_MASK, DEMO_SFT_WEIGHT
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.mark.parametrize("equal_size", [True, False])
def test_balanced_partitions_are_the_authors(equal_size):
    rng = random.Random(equal_size)
    for k in (2, 3, 8):
        lengths = [rng.choice([rng.randint(1, 50), 7, 7, 12]) for _ in range(8 * k)]  # ties on purpose
        expected = authors_oracle.get_seqlen_balanced_partitions(lengths, k, equal_size)
        assert balanced_partitions(lengths, k, equal_size) == expected


def _paper_batch(rng, num_gated, prompts=128, n=8, short=False):
    """Lengths of a generation batch of the paper's shape: prompt + response tokens per rollout, prompt order."""
    top = 1200 if short else 8192
    prompt_lengths = [rng.randint(40, 300) for _ in range(prompts)]
    responses = [rng.randint(20, top) for _ in range(prompts * n)]
    demos = [rng.randint(top // 4, top) for _ in range(num_gated)]
    gated = set(rng.sample(range(prompts), num_gated))
    return prompt_lengths, responses, demos, sorted(gated)


def _replay(prompt_lengths, responses, demos, gated, n, num_gpus, rows_per_mini_batch, max_tokens):
    rollout_lengths = [prompt_lengths[row // n] + r for row, r in enumerate(responses)]
    kept = [row // n not in gated for row in range(len(responses))]
    demo_lengths = [prompt_lengths[p] + d for p, d in zip(gated, demos)]
    ours = authors_packing(
        rollout_lengths,
        responses,
        kept,
        demo_lengths,
        demos,
        [True] * len(demos),
        num_gpus=num_gpus,
        rows_per_mini_batch=rows_per_mini_batch,
        max_tokens_per_gpu=max_tokens,
    )
    # the oracle: their order (kept rollouts, then the demonstrations), rows named by (kind, index)
    rows = [(("rollout", row), length) for row, length in enumerate(rollout_lengths) if kept[row]]
    rows += [(("demo", j), length) for j, length in enumerate(demo_lengths)]
    steps = authors_oracle.micro_batches(rows, num_gpus, rows_per_mini_batch, max_tokens)
    return ours, steps


@pytest.mark.parametrize("num_gated", [8, 32, 64])
def test_authors_packing_weights_match_the_oracle_at_the_papers_batch(num_gated):
    # 128 prompts x 8 rollouts on 8 GPUs, 64 rows per GPU per optimizer step, 32768 tokens per micro-batch
    rng = random.Random(num_gated)
    batch = _paper_batch(rng, num_gated)
    ours, steps = _replay(*batch, n=8, num_gpus=8, rows_per_mini_batch=64, max_tokens=32768)
    theirs = [micro for step in steps for gpu in step for micro in gpu]
    num_rollouts = len(batch[1])

    def name(row):
        return ("rollout", row) if row < num_rollouts else ("demo", row - num_rollouts)

    assert sorted(sorted(map(name, micro)) for micro in ours.micro_batches) == sorted(map(sorted, theirs))
    demos = batch[2]
    for micro in theirs:
        in_micro = [j for kind, j in micro if kind == "demo"]
        for j in in_micro:  # a demonstration's share of its micro-batch's SFT token mean
            assert ours.sft_weights[j] == pytest.approx(demos[j] / sum(demos[i] for i in in_micro))
    total = sum(ours.sft_weights)
    assert total <= num_gated  # demonstrations sharing a micro-batch share one unit of weight
    if num_gated >= 32:
        assert total < num_gated


@pytest.mark.parametrize("num_gated", [0, 5, 20])
def test_authors_loss_is_ours_times_rows_per_step_over_gpus(num_gated):
    # The authors' whole loss (SFT token mean per micro-batch, RL sum / max_response_length, entropy token mean per
    # micro-batch, averaged over the GPUs) on random per-token values equals, times R / G, our loss with the replayed
    # weights (R = rollouts per optimizer step in TRL, G = their GPUs), which is what makes max_grad_norm / 64 theirs
    rng = random.Random(num_gated)
    torch.manual_seed(num_gated)
    n, prompts, gpus, rows_per_mini_batch = 8, 32, 4, 32  # R = 2 steps x 128 rollouts, G = 4
    L, coef, sft_coef = 1200, 0.01, 0.3
    prompt_lengths, responses, demos, gated = _paper_batch(rng, num_gated, prompts=prompts, short=True)
    ours, steps = _replay(prompt_lengths, responses, demos, gated, n, gpus, rows_per_mini_batch, max_tokens=4096)

    def values(length):
        mask = torch.zeros(L, dtype=torch.float64)
        mask[:length] = 1
        return {"logp": -torch.rand(L, dtype=torch.float64), "pg": torch.randn(L, dtype=torch.float64),
                "entropy": torch.rand(L, dtype=torch.float64), "mask": mask}

    rows = {("rollout", row): dict(values(r), sft=False) for row, r in enumerate(responses)}
    rows.update({("demo", j): dict(values(d), sft=True) for j, d in enumerate(demos)})
    oracle = authors_oracle.actor_loss(steps, rows, sft_coef, coef, L, gpus)

    R = gpus * rows_per_mini_batch  # our rollouts per optimizer step (one process: B * GA = R)
    N = rollout_normalizer("dr_grpo", max_completion_length=L, per_device_batch_size=R, gradient_accumulation_steps=1,
                           steps_per_generation=1, num_processes=1)
    kept = [row for row in range(len(responses)) if row // n not in gated]
    rl = sum((rows[("rollout", row)]["pg"] * rows[("rollout", row)]["mask"]).sum() for row in kept) / N
    entropy = sum(
        (rows[("rollout", row)]["entropy"] * rows[("rollout", row)]["mask"]).sum() / ours.rollout_micro_batch_tokens[row]
        for row in kept
    ) + sum(
        (rows[("demo", j)]["entropy"] * rows[("demo", j)]["mask"]).sum() / ours.demonstration_micro_batch_tokens[j]
        for j in range(len(demos))
    )
    total = rl - coef * entropy * L / N
    if demos:
        nll = torch.stack([-rows[("demo", j)]["logp"] for j in range(len(demos))])
        mask = torch.stack([rows[("demo", j)]["mask"] for j in range(len(demos))])
        weights = torch.tensor(ours.sft_weights, dtype=torch.float64)
        total = total + sft_coef * demonstration_sft_loss(nll * mask, mask, weights, L, N)
    assert (total * R / gpus).item() == pytest.approx(oracle.item(), rel=1e-9)


def _authors_gradient(trainer, model, output, steps, sft_coef, entropy_coeff, num_gpus):
    """The gradient of the oracle's loss on the trainer's own generation batch (rows named by their TRL index)."""
    L = trainer.args.max_completion_length
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, ids, mask, output["completion_ids"].size(1), compute_entropy=True
    )
    rows = {}
    for row in range(ids.size(0)):
        pg = -output["advantages"][row] * torch.exp(logps[row] - logps[row].detach())
        rows[("rollout", row)] = {"pg": pg, "logp": logps[row], "entropy": entropies[row],
                                  "mask": output["completion_mask"][row].double(), "sft": False}
    for row in output[DEMO_MASK].any(dim=1).nonzero().squeeze(1).tolist():
        demo_ids, demo_mask = output[DEMO_IDS][row : row + 1], output[DEMO_MASK][row : row + 1]
        logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
            model,
            torch.cat([output["prompt_ids"][row : row + 1], demo_ids], dim=1),
            torch.cat([output["prompt_mask"][row : row + 1], demo_mask], dim=1),
            demo_ids.size(1),
            compute_entropy=True,
        )
        rows[("demo", row)] = {"logp": logp[0], "entropy": entropy[0], "mask": demo_mask[0].double(), "sft": True}
    loss = authors_oracle.actor_loss(steps, rows, sft_coef, entropy_coeff, L, num_gpus)
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_trainer_update_is_the_authors_under_their_packing(tmp_path):
    # 6 prompts x 2 rollouts, the 3 odd ones never solved (gated); the authors' batch is the 6 kept rollouts and 3
    # demonstrations on 1 GPU, cut into 2 micro-batches of at most 60 tokens, so two demonstrations share one. One SGD
    # step of the trainer must be the authors' gradient over R / G = 12 / 1, SFT, RL and entropy together.
    sft_coef, entropy_coef, max_tokens = 0.7, 0.05, 60
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).double()
    args = tiny_args(
        tmp_path, gamma=0.0, max_steps=1, per_device_train_batch_size=12, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, num_generations=2,
        sft_loss_coef=sft_coef, entropy_coef=entropy_coef, sft_weighting="authors_packing",
        entropy_weighting="authors_packing", authors_num_gpus=1, authors_max_tokens_per_gpu=max_tokens,
    )
    trainer = HPTTrainer(model=model, reward_funcs=mixed_reward, args=args, train_dataset=addition_dataset(size=6),
                         processing_class=tokenizer)
    initial = copy.deepcopy(trainer.model)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    (_, output), = run_and_capture(trainer)
    update = torch.cat([(b - p.detach()).flatten() for p, b in zip(trainer.model.parameters(), before)])

    kept = output["tool_mask"].amax(dim=1) > 0
    demo_rows = output[DEMO_MASK].any(dim=1).nonzero().squeeze(1).tolist()
    lengths = (output["prompt_mask"].sum(1) + output["completion_mask"].sum(1)).tolist()
    rows = [(("rollout", r), lengths[r]) for r in range(len(lengths)) if kept[r]]
    rows += [(("demo", r), int(output["prompt_mask"][r].sum() + output[DEMO_MASK][r].sum())) for r in demo_rows]
    steps = authors_oracle.micro_batches(rows, 1, 12, max_tokens)
    micro = [m for step in steps for gpu in step for m in gpu]
    assert len(demo_rows) == 3 and len(micro) == 2
    assert output[DEMO_SFT_WEIGHT][demo_rows].sum().item() == pytest.approx(2.0)  # one unit per micro-batch

    oracle = _authors_gradient(trainer, initial, output, steps, sft_coef, entropy_coef, num_gpus=1)
    # TRL computes log-probabilities and entropies in float32 whatever the model dtype: float32 tolerances
    torch.testing.assert_close(update, oracle / 12, atol=1e-6 * oracle.abs().max().item(), rtol=1e-4)


def test_skip_update_above_grad_norm(tmp_path):
    def run(threshold, path):
        tokenizer = build_tiny_tokenizer()
        args = tiny_args(path, gamma=0.0, max_steps=2, skip_update_above_grad_norm=threshold, weight_decay=0.1)
        trainer = HPTTrainer(model=build_tiny_model(tokenizer), reward_funcs=mixed_reward, args=args,
                             train_dataset=addition_dataset(), processing_class=tokenizer)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        changed = any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))
        skipped = [e["hpt/skipped_update"] for e in trainer.state.log_history if "hpt/skipped_update" in e]
        norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
        return changed, skipped, norms

    changed, skipped, norms = run(1e-12, tmp_path / "skip")  # every update skipped: nothing moves, not even decay
    assert not changed and skipped == [1.0, 1.0] and min(norms) > 1e-12
    changed, skipped, _ = run(1e12, tmp_path / "keep")
    assert changed and skipped == [0.0, 0.0]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sft_weighting": "authors"}, "sft_weighting"),
        ({"entropy_weighting": "authors_packing", "algorithm": "luffy"}, "algorithm='hpt'"),
        ({"authors_num_gpus": 0}, "authors_num_gpus"),
        ({"skip_update_above_grad_norm": -1.0}, "skip_update_above_grad_norm"),
    ],
)
def test_reproduction_options_are_checked(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        HPTConfig(output_dir=str(tmp_path), use_cpu=True, **options)

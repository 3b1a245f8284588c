"""Gradient-equality tests for `hpt_trl.upge` (float64, random inputs, atol 1e-6)."""

import dataclasses
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from hpt_trl.upge import (
    PRESETS,
    UPGE,
    AdvantageEstimator,
    Aggregation,
    ReferencePolicy,
    StabilizationMask,
    get_preset,
    srft_advantages,
    srft_weights,
)

ATOL = 1e-6
B, T, V, G = 8, 7, 11, 4  # 2 prompts x 4 completions, 7 tokens, 11-token vocabulary
MAX_LEN = 10  # TRL max_completion_length (> T: padded batches are shorter than the cap)


def _mask(generator):
    lengths = torch.randint(2, T + 1, (B,), generator=generator)
    lengths[0] = T
    return (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()


def _rollout(seed=0, scale=0.4):
    """Random leaf log-probs, perturbed old log-probs (so the clip is active), rewards and a completion mask."""
    g = torch.Generator().manual_seed(seed)
    logps = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    old = logps + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 3, (B,), generator=g).to(torch.float64)
    rewards = rewards + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)
    return logps.requires_grad_(), old, rewards, _mask(g)


def _grad(loss_fn, leaf):
    (grad,) = torch.autograd.grad(loss_fn(leaf), leaf)
    return grad


def _trl_loss(loss_type, per_token_logps, old_per_token_logps, advantages, mask, epsilon_high=0.2, delta=None):
    """Call TRL 1.16's own `GRPOTrainer._compute_loss` on a stub trainer that returns `per_token_logps`."""
    accelerator = SimpleNamespace(
        reduce=lambda tensor, reduction="sum": tensor,
        gather=lambda tensor: tensor,
        gather_for_metrics=lambda tensor: tensor,
        num_processes=1,
        sync_gradients=True,
    )
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=epsilon_high,
        beta=0.0,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        max_completion_length=MAX_LEN,
        current_gradient_accumulation_steps=1,
        args=SimpleNamespace(delta=delta),
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    prompt_ids = torch.zeros(mask.size(0), 2, dtype=torch.long)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": torch.zeros_like(mask),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_per_token_logps,
    }
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


def _trl_advantages(rewards, group_size, scale):
    """TRL's `_generate_and_score_completions` advantage formula (sum_then_normalize branch)."""
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale:
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def test_sft_preset_is_cross_entropy_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = _mask(g)

    def ce(x):
        return F.cross_entropy(x[mask.bool()], labels[mask.bool()])

    def upge(x, preset="sft", **kwargs):
        logps = torch.log_softmax(x, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return get_preset(preset, aggregation=Aggregation("token_mean")).loss(logps, mask=mask, **kwargs)

    expected = _grad(ce, logits)
    torch.testing.assert_close(_grad(upge, logits), expected, atol=ATOL, rtol=0)
    assert ce(logits).item() == pytest.approx(upge(logits).item())  # value is the CE too
    # Discriminative: the offline (pi_ref = 1) estimator is a different gradient on the same data.
    offline = _grad(lambda x: upge(x, "offline", advantages=torch.ones(B, dtype=torch.float64)), logits)
    assert not torch.allclose(offline, expected, atol=ATOL)


@pytest.mark.parametrize(
    "loss_type,preset,scale", [("grpo", "grpo", True), ("dr_grpo", "dr_grpo", False), ("bnpo", "grpo", True)]
)
@pytest.mark.parametrize("epsilon_high,delta", [(0.2, None), (0.28, None), (0.28, 1.5)])
def test_grpo_presets_match_trl_compute_loss(loss_type, preset, scale, epsilon_high, delta):
    logps, old, rewards, mask = _rollout(seed=3, scale=0.6)
    upge = get_preset(preset, epsilon_high=epsilon_high, delta=delta, max_completion_length=MAX_LEN)
    if loss_type == "bnpo":
        upge = get_preset(preset, epsilon_high=epsilon_high, delta=delta, aggregation=Aggregation("bnpo"))
    advantages = upge.advantage(rewards=rewards, group_size=G)
    torch.testing.assert_close(advantages, _trl_advantages(rewards, G, scale), atol=ATOL, rtol=0)

    trl_loss, metrics = _trl_loss(loss_type, logps, old, advantages, mask, epsilon_high, delta)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    ours = _grad(lambda x: upge.loss(x, old, rewards=rewards, mask=mask, group_size=G), logps)
    torch.testing.assert_close(ours, trl_grad, atol=ATOL, rtol=0)
    assert metrics["clip_ratio/region_mean"][0] > 0  # the clip is active on these inputs
    ratio = torch.exp(logps.detach() - old)
    if delta is not None:  # and so is the delta clip (A < 0 tokens above delta)
        assert ((ratio > delta) & (advantages[:, None] < 0) & mask.bool()).any()
    # Discriminative: without the stabilization mask the gradient differs.
    unclipped = dataclasses.replace(upge, mask=StabilizationMask())
    unclipped_grad = _grad(lambda x: unclipped.loss(x, old, rewards=rewards, mask=mask, group_size=G), logps)
    assert not torch.allclose(unclipped_grad, trl_grad, atol=ATOL)


def test_grpo_and_dr_grpo_gradients_differ():
    logps, old, rewards, mask = _rollout(seed=3)
    grads = [
        _grad(lambda x: get_preset(p).loss(x, old, rewards=rewards, mask=mask, group_size=G), logps)
        for p in ("grpo", "dr_grpo")
    ]
    assert not torch.allclose(*grads, atol=ATOL)


def test_advantage_estimators_match_trl_formula_with_nan_and_flat_groups():
    nan = float("nan")
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, nan, -1.0, 0.3], dtype=torch.float64)
    for kind, scale in (("group_norm", True), ("group_mean", False)):
        ours = AdvantageEstimator(kind)(rewards=rewards, group_size=4)
        torch.testing.assert_close(ours, _trl_advantages(rewards, 4, scale), atol=ATOL, rtol=0)
    assert AdvantageEstimator("given")(advantages=rewards) is rewards
    ones = AdvantageEstimator("constant")(batch_size=3, like=rewards)
    assert ones.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        AdvantageEstimator("given")(rewards=rewards)
    with pytest.raises(ValueError):
        AdvantageEstimator("group_norm")(rewards=rewards, group_size=5)


def test_luffy_matches_policy_shaping_formula():
    logps, _, rewards, mask = _rollout(seed=4)
    gamma = 0.1

    def direct(x):
        adv = (rewards - rewards.view(-1, G).mean(1).repeat_interleave(G)).unsqueeze(1)
        p = torch.exp(x)
        return (-(adv * p / (p + gamma)) * mask).sum() / (B * T)

    luffy = get_preset("luffy")
    ours = _grad(lambda x: luffy.loss(x, rewards=rewards, mask=mask, group_size=G), logps)
    expected = _grad(direct, logps)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # UPGE form: grad wrt logp = -A * gamma / (p + gamma)^2 * p * m / (B T)
    p = torch.exp(logps.detach())
    adv = AdvantageEstimator("group_mean")(rewards=rewards, group_size=G).unsqueeze(1)
    torch.testing.assert_close(ours, -adv * gamma / (p + gamma) ** 2 * p * mask / (B * T), atol=ATOL, rtol=0)
    # gamma is configurable and matters
    other = _grad(lambda x: get_preset("luffy", gamma=0.5).loss(x, rewards=rewards, mask=mask, group_size=G), logps)
    assert not torch.allclose(other, expected, atol=ATOL)


def test_ppo_clip_semantics():
    # ratio = exp(logp - old) chosen per token; advantages per row.
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.9, 2.5]] * 2, dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    old = torch.log(torch.full_like(ratios, 0.3))
    logps = (old + torch.log(ratios)).requires_grad_()
    ppo = get_preset("ppo")
    grad = _grad(lambda x: ppo.loss(x, old, advantages=advantages), logps)
    n = ratios.numel()
    # A > 0: ratio 1.5 and 2.5 above 1 + eps are clipped; 0.5 (below 1 - eps) keeps its gradient.
    keep = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 1, 1, 1]], dtype=torch.float64)
    expected = -keep * advantages.unsqueeze(1) * ratios / n
    torch.testing.assert_close(grad, expected, atol=ATOL, rtol=0)

    # TRL-style clipped objective (PPO token mean) has the same gradient.
    def clipped_objective(x):
        ratio, adv = torch.exp(x - old), advantages[:, None]
        return -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv).mean()

    direct = _grad(clipped_objective, logps)
    torch.testing.assert_close(grad, direct, atol=ATOL, rtol=0)
    # delta additionally drops A < 0 tokens with ratio > delta.
    with_delta = _grad(lambda x: get_preset("ppo", delta=2.0).loss(x, old, advantages=advantages), logps)
    keep[1, 4] = 0
    torch.testing.assert_close(with_delta, -keep * advantages.unsqueeze(1) * ratios / n, atol=ATOL, rtol=0)
    # Mask values
    m = StabilizationMask("clip", 0.2, 0.28)(ratios, advantages.unsqueeze(1))
    assert m[0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_offline_preset_is_grad_of_pi():
    logps, _, rewards, mask = _rollout(seed=5)
    advantages = rewards - rewards.mean()
    grad = _grad(lambda x: get_preset("offline").loss(x, advantages=advantages, mask=mask), logps)
    # d/dlogp of -A * pi = -A * pi; dr_grpo normalization by B * T
    expected = -advantages.unsqueeze(1) * torch.exp(logps.detach()) * mask / (B * T)
    torch.testing.assert_close(grad, expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        get_preset("offline").loss(logps, rewards=rewards, mask=mask, group_size=G)


def test_srft_weights_and_preset():
    g = torch.Generator().manual_seed(6)
    logps, _, _, mask = _rollout(seed=6)
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    h = (entropy * mask).sum(-1) / mask.sum(-1)
    w_sft, w_rl = srft_weights(entropy, mask)
    torch.testing.assert_close(w_sft, 0.5 * torch.exp(-h), atol=ATOL, rtol=0)
    torch.testing.assert_close(w_rl, 0.1 * torch.exp(h), atol=ATOL, rtol=0)
    is_demo = torch.tensor([True, False] * 4)
    is_correct = torch.tensor([False, True, False, False] * 2)
    adv = srft_advantages(entropy, is_demo, is_correct, mask)
    expected_adv = torch.where(is_demo, w_sft, torch.where(is_correct, w_rl, torch.full_like(w_rl, -1.0)))
    assert torch.equal(adv, expected_adv)
    grad = _grad(lambda x: get_preset("srft").loss(x, advantages=adv, mask=mask), logps)
    # weighted log-likelihood: loss = -sum(A * logp * m) / sum(m)
    torch.testing.assert_close(grad, -adv.unsqueeze(1) * mask / mask.sum(), atol=ATOL, rtol=0)


def test_presets_and_overrides():
    assert set(PRESETS) >= {"sft", "ppo", "grpo", "dr_grpo", "luffy", "srft", "offline"}
    assert all(isinstance(p, UPGE) for p in PRESETS.values())
    custom = get_preset("grpo", epsilon_low=0.1, reference=ReferencePolicy("one"))
    assert custom.mask.epsilon_low == 0.1 and custom.reference.kind == "one"
    assert PRESETS["grpo"].mask.epsilon_low == 0.2  # presets are not mutated
    assert Aggregation("grpo").kind == "seq_mean_token_mean"
    with pytest.raises(ValueError):
        get_preset("nope")
    with pytest.raises(ValueError):
        get_preset("grpo", kind="none")
    with pytest.raises(ValueError):
        StabilizationMask("dual")

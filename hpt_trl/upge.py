"""The Unified Policy Gradient Estimator (UPGE) as a small, composable, pure-torch loss.

Lv et al. (2025), "Towards a Unified View of Large Language Model Post-Training" (arXiv:2509.04419), write the
gradients of SFT, PPO, GRPO, Dr. GRPO, LUFFY, SRFT, ... as one estimator with four interchangeable parts:

    grad_uni = 1_stable * (1 / pi_ref) * A_hat * grad(pi_theta)

- [`StabilizationMask`] is `1_stable`: none, or the PPO two-sided clip region (plus TRL's `delta` upper clip);
- [`ReferencePolicy`] is the `1 / pi_ref` denominator, as a per-token weight `w` with
  `grad(w) = grad(pi_theta) / pi_ref`: `pi_theta` detached (SFT), `pi_old` (PPO/GRPO), `1` (offline data) or
  LUFFY's policy shaping `f(pi) = pi / (pi + gamma)`;
- [`AdvantageEstimator`] is `A_hat`: constant 1 (SFT), group mean-centred (Dr. GRPO), group-normalized (GRPO) or given;
- the likelihood gradient comes from the caller's token log-probs `per_token_logps` (with `requires_grad`).

[`Aggregation`] reduces the per-token terms like TRL's `GRPOTrainer` loss types, [`UPGE`] composes the parts and
[`PRESETS`] / [`get_preset`] name the algorithms (`docs/upge.md` maps the paper's Table 1 onto them).

Which presets run in training: `HPTTrainer` trains rollouts with TRL's own loss (which the `grpo` and `dr_grpo`
presets reproduce, tested against TRL 1.16), demonstrations with `sft` (SFT, SRFT) and `luffy` (LUFFY, the middle
band), and uses `srft_advantages` / `srft_weights`. `ppo`, `grpo`, `dr_grpo` and `offline` are a tested reference of
the paper's unified view, not called by the trainer. The loss *value*
is a surrogate whose gradient is the estimator: clipped tokens contribute 0, not TRL's constant clipped term.

References:
    UPGE/HPT: Lv et al., arXiv:2509.04419. PPO: Schulman et al., arXiv:1707.06347. GRPO: Shao et al.,
    arXiv:2402.03300. Dr. GRPO: Liu et al., arXiv:2503.20783. LUFFY: Yan et al., arXiv:2504.14945. SRFT: Fu et al.,
    arXiv:2506.19767. `delta` clip: INTELLECT-2, arXiv:2505.07291 (TRL's `GRPOConfig.delta`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = [
    "PRESETS",
    "UPGE",
    "AdvantageEstimator",
    "Aggregation",
    "ReferencePolicy",
    "StabilizationMask",
    "get_preset",
    "srft_advantages",
    "srft_weights",
]


def _check(kind: str, allowed: tuple[str, ...], what: str) -> None:
    if kind not in allowed:
        raise ValueError(f"Unknown {what} kind {kind!r}; expected one of {allowed}.")


@dataclass(frozen=True)
class StabilizationMask:
    """`1_stable`: which token terms keep their gradient.

    Args:
        kind (`str`, *optional*, defaults to `"none"`):
            `"none"` keeps every token. `"clip"` is PPO's two-sided clip: a token is dropped when `A > 0` and
            `ratio > 1 + epsilon_high`, or `A < 0` and `ratio < 1 - epsilon_low`, exactly where the gradient of TRL's
            `-min(ratio * A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)` vanishes.
        epsilon_low (`float`, *optional*, defaults to `0.2`):
            Lower clip range.
        epsilon_high (`float`, *optional*, defaults to `0.2`):
            Upper clip range (DAPO's clip-higher when larger than `epsilon_low`).
        delta (`float` or `None`, *optional*):
            TRL's `delta`: tokens with `ratio > delta` are dropped too (TRL's `clamp(coef_1, max=delta)`, for
            `delta >= 1 + epsilon_high`).
    """

    kind: str = "none"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None

    def __post_init__(self):
        _check(self.kind, ("none", "clip"), "stabilization mask")

    def __call__(self, ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """Return the 0/1 mask.

        Args:
            ratio (`torch.Tensor`):
                Importance ratio `pi_theta / pi_old`, `(B, T)` (all ones without old log-probs); read detached.
            advantages (`torch.Tensor`):
                Advantages broadcastable to `ratio`, e.g. `(B, 1)`.

        Returns:
            `torch.Tensor`: `1_stable`, in the dtype of `ratio` and the broadcast shape of both inputs.
        """
        ratio = ratio.detach()
        keep = torch.ones(torch.broadcast_shapes(ratio.shape, advantages.shape), dtype=torch.bool, device=ratio.device)
        if self.kind == "clip":
            high = (advantages > 0) & (ratio > 1 + self.epsilon_high)
            low = (advantages < 0) & (ratio < 1 - self.epsilon_low)
            keep = keep & ~(high | low)
            if self.delta is not None:
                keep = keep & (ratio <= self.delta)
        return keep.to(ratio.dtype)


@dataclass(frozen=True)
class ReferencePolicy:
    """The `1 / pi_ref` denominator, as a per-token weight `w` with `grad(w) = grad(pi_theta) / pi_ref`.

    Args:
        kind (`str`, *optional*, defaults to `"current"`):
            - `"current"`: `pi_ref = sg(pi_theta)`, `w = log pi_theta` (`grad log pi`; loss value = NLL): SFT.
            - `"old"`: `pi_ref = pi_old`, `w = pi_theta / pi_old` (PPO/GRPO ratio); without old log-probs
              `pi_old = sg(pi_theta)` (on-policy), as in TRL.
            - `"one"`: `pi_ref = 1`, `w = pi_theta` (off-policy data whose behaviour policy is unknown).
            - `"luffy"`: LUFFY's regularized importance sampling, `w = f(pi_theta)` with `f(p) = p / (p + gamma)`, so
              `grad(w) = gamma / (pi_theta + gamma)^2 * grad(pi_theta)`, i.e. `pi_ref = (pi + gamma)^2 / gamma`.
        gamma (`float`, *optional*, defaults to `0.1`):
            LUFFY's shaping constant.
    """

    kind: str = "current"
    gamma: float = 0.1

    def __post_init__(self):
        _check(self.kind, ("current", "old", "one", "luffy"), "reference policy")

    def __call__(self, per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None = None) -> torch.Tensor:
        """Return the weight `w`, shaped like `per_token_logps`.

        Args:
            per_token_logps (`torch.Tensor`):
                `log pi_theta` of the taken tokens, `(B, T)`, with gradient.
            old_per_token_logps (`torch.Tensor` or `None`, *optional*):
                `log pi_old`, `(B, T)`; only read by `"old"`.

        Returns:
            `torch.Tensor`: The weight `w`.
        """
        if self.kind == "current":
            return per_token_logps
        if self.kind == "old":
            old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
            return torch.exp(per_token_logps - old)
        prob = torch.exp(per_token_logps)
        return prob if self.kind == "one" else prob / (prob + self.gamma)


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Row-wise NaN-ignoring std with Bessel's correction, like `trl.trainer.utils.nanstd(x, dim=1)`."""
    count = (~torch.isnan(x)).sum(dim=1, keepdim=True)
    var = torch.nanmean((x - torch.nanmean(x, dim=1, keepdim=True)) ** 2, dim=1, keepdim=True) * count / (count - 1)
    return torch.sqrt(torch.where(count > 1, var, torch.full_like(var, float("nan"))))


@dataclass(frozen=True)
class AdvantageEstimator:
    """`A_hat`: one advantage per sequence (or per token when given so).

    Args:
        kind (`str`, *optional*, defaults to `"given"`):
            - `"constant"`: `A = value` (SFT: 1).
            - `"group_mean"`: `A = r - mean_group(r)` (Dr. GRPO; TRL `scale_rewards="none"`).
            - `"group_norm"`: `A = (r - mean_group(r)) / (std_group(r) + std_eps)`, unbiased std (GRPO; TRL
              `scale_rewards="group"`).
            - `"given"`: precomputed `advantages` must be passed.
            Passed `advantages` always take precedence (SRFT's weighted SFT; LUFFY rows whose group baseline also
            covers on-policy rollouts). As in TRL, NaN rewards are left out of group statistics and get advantage 0.
        value (`float`, *optional*, defaults to `1.0`):
            The constant of `"constant"`.
        std_eps (`float`, *optional*, defaults to `1e-4`):
            Added to the group std (TRL's value).
    """

    kind: str = "given"
    value: float = 1.0
    std_eps: float = 1e-4

    def __post_init__(self):
        _check(self.kind, ("constant", "group_mean", "group_norm", "given"), "advantage estimator")

    def __call__(
        self,
        rewards: torch.Tensor | None = None,
        advantages: torch.Tensor | None = None,
        group_size: int | None = None,
        batch_size: int | None = None,
        like: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the advantages, `(B,)` (or as given).

        Args:
            rewards (`torch.Tensor` or `None`, *optional*):
                Rewards `(B,)`, each prompt's `group_size` completions contiguous (TRL's `repeat_interleave` order).
            advantages (`torch.Tensor` or `None`, *optional*):
                Precomputed advantages, returned as is.
            group_size (`int` or `None`, *optional*):
                Completions per prompt, for the group kinds.
            batch_size (`int` or `None`, *optional*):
                Number of rows, for `"constant"`.
            like (`torch.Tensor` or `None`, *optional*):
                Tensor whose dtype and device `"constant"` uses.

        Returns:
            `torch.Tensor`: The advantages.
        """
        if advantages is not None:
            if rewards is not None:
                raise ValueError("Pass either `rewards` or `advantages`, not both.")
            return advantages
        if self.kind == "constant":
            like = torch.empty(0) if like is None else like
            return torch.full((batch_size,), self.value, dtype=like.dtype, device=like.device)
        if self.kind == "given" or rewards is None:
            raise ValueError(f"Advantage estimator {self.kind!r} needs `advantages` (or `rewards` for group kinds).")
        if group_size is None or rewards.numel() % group_size != 0:
            raise ValueError(f"`group_size` must divide the number of rewards ({rewards.numel()}), got {group_size}.")
        grouped = rewards.view(-1, group_size)
        adv = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
        if self.kind == "group_norm":
            std = _nanstd(grouped) if group_size > 1 else torch.zeros_like(grouped[:, :1])
            adv = adv / (std + self.std_eps)
        return torch.nan_to_num(adv.reshape(-1), nan=0.0)


_AGGREGATION_ALIASES = {"bnpo": "token_mean", "grpo": "seq_mean_token_mean"}


@dataclass(frozen=True)
class Aggregation:
    """Reduce per-token terms `(B, T)` to a scalar, like TRL's `GRPOTrainer` loss types.

    Args:
        kind (`str`, *optional*, defaults to `"token_mean"`):
            - `"token_mean"` (alias `"bnpo"`): `sum(l * m) / sum(m)` over the batch (SFT, PPO, TRL `"bnpo"`).
            - `"seq_mean_token_mean"` (alias `"grpo"`): mean over sequences of each sequence's token mean.
            - `"dr_grpo"`: `sum(l * m) / (B * max_completion_length)`.
            - `"sum"`: `sum(l * m)`.
        max_completion_length (`int` or `None`, *optional*):
            Constant of `"dr_grpo"`; `None` uses `mask.size(1)`.
    """

    kind: str = "token_mean"
    max_completion_length: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", _AGGREGATION_ALIASES.get(self.kind, self.kind))
        _check(self.kind, ("token_mean", "seq_mean_token_mean", "dr_grpo", "sum"), "aggregation")

    def __call__(self, per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss.

        Args:
            per_token_loss (`torch.Tensor`):
                Per-token loss `(B, T)`.
            mask (`torch.Tensor`):
                Completion mask `(B, T)`, 1 for tokens that count.

        Returns:
            `torch.Tensor`: Scalar loss.
        """
        masked = per_token_loss * mask
        if self.kind == "token_mean":
            return masked.sum() / mask.sum().clamp(min=1.0)
        if self.kind == "seq_mean_token_mean":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        if self.kind == "dr_grpo":
            return masked.sum() / (mask.size(0) * (self.max_completion_length or mask.size(1)))
        return masked.sum()


@dataclass(frozen=True)
class UPGE:
    """`grad = 1_stable * (1 / pi_ref) * A_hat * grad(pi_theta)`, aggregated into a loss to minimize.

    Args:
        mask (`StabilizationMask`, *optional*): `1_stable`; defaults to no mask.
        reference (`ReferencePolicy`, *optional*): `1 / pi_ref`; defaults to `"current"` (`grad log pi`).
        advantage (`AdvantageEstimator`, *optional*): `A_hat`; defaults to `"given"`.
        aggregation (`Aggregation`, *optional*): Defaults to `"token_mean"`.
    """

    mask: StabilizationMask = StabilizationMask()
    reference: ReferencePolicy = ReferencePolicy()
    advantage: AdvantageEstimator = AdvantageEstimator()
    aggregation: Aggregation = Aggregation()

    def per_token_loss(
        self,
        per_token_logps: torch.Tensor,
        old_per_token_logps: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        advantages: torch.Tensor | None = None,
        group_size: int | None = None,
    ) -> torch.Tensor:
        """Per-token surrogate `-1_stable * A * w`, `(B, T)`, unmasked and unaggregated (to mix estimators row-wise).

        Args: as [`UPGE.loss`].

        Returns:
            `torch.Tensor`: Per-token loss; its gradient is minus the per-token estimator.
        """
        adv = self.advantage(rewards, advantages, group_size, per_token_logps.size(0), per_token_logps)
        adv = adv.to(per_token_logps.dtype)
        adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
        weight = self.reference(per_token_logps, old_per_token_logps)
        old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        stable = self.mask(torch.exp(per_token_logps.detach() - old), adv)
        return -stable * adv * weight

    def loss(
        self,
        per_token_logps: torch.Tensor,
        old_per_token_logps: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        advantages: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        group_size: int | None = None,
    ) -> torch.Tensor:
        """Scalar loss whose gradient is minus the aggregated UPGE.

        Args:
            per_token_logps (`torch.Tensor`):
                `log pi_theta` of the taken tokens, `(B, T)`, with gradient.
            old_per_token_logps (`torch.Tensor` or `None`, *optional*):
                `log pi_old`, `(B, T)`: the ratio of `ReferencePolicy("old")` and of the clip mask.
            rewards (`torch.Tensor` or `None`, *optional*):
                Rewards `(B,)`, for the group advantage estimators.
            advantages (`torch.Tensor` or `None`, *optional*):
                Precomputed advantages `(B,)` or `(B, T)`; take precedence over the estimator.
            mask (`torch.Tensor` or `None`, *optional*):
                Completion mask `(B, T)`; defaults to all ones.
            group_size (`int` or `None`, *optional*):
                Completions per prompt.

        Returns:
            `torch.Tensor`: Scalar loss.
        """
        per_token = self.per_token_loss(per_token_logps, old_per_token_logps, rewards, advantages, group_size)
        mask = torch.ones_like(per_token_logps) if mask is None else mask.to(per_token_logps.dtype)
        return self.aggregation(per_token, mask)


def srft_weights(entropy: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SRFT's entropy-aware weights (Fu et al., arXiv:2506.19767): `w_sft = 0.5 * sg(exp(-H(pi_theta)))` for SFT on
    demonstrations and `w_rl = 0.1 * sg(exp(H(pi_theta)))` for RL on positive self-rollouts.

    The paper leaves open over what `H` is averaged; like the HPT authors' SRFT baseline, `H` here is each sequence's
    masked mean token entropy.

    Args:
        entropy (`torch.Tensor`):
            Token entropies `(B, T)` (TRL's `entropies`) or per-sequence entropies `(B,)`.
        mask (`torch.Tensor` or `None`, *optional*):
            Completion mask `(B, T)` for token entropies.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: Detached `(w_sft, w_rl)`, each `(B,)`.
    """
    entropy = entropy.detach()
    if entropy.dim() == 2:
        mask = torch.ones_like(entropy) if mask is None else mask.to(entropy.dtype)
        entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return 0.5 * torch.exp(-entropy), 0.1 * torch.exp(entropy)


def srft_advantages(
    entropy: torch.Tensor, is_demo: torch.Tensor, is_correct: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Advantages for the `"srft"` preset: `w_sft` on demonstrations, `w_rl` on correct self-rollouts, `-1` on the
    others (the negative-sample weight follows the HPT authors' SRFT baseline).

    Args:
        entropy (`torch.Tensor`):
            As in [`srft_weights`].
        is_demo (`torch.Tensor`):
            `(B,)` bool, demonstration rows.
        is_correct (`torch.Tensor`):
            `(B,)` bool, self-rollouts with a positive outcome.
        mask (`torch.Tensor` or `None`, *optional*):
            As in [`srft_weights`].

    Returns:
        `torch.Tensor`: Advantages `(B,)`.
    """
    w_sft, w_rl = srft_weights(entropy, mask)
    return torch.where(is_demo, w_sft, torch.where(is_correct, w_rl, -torch.ones_like(w_rl)))


_NO_MASK, _CLIP = StabilizationMask(), StabilizationMask("clip", 0.2, 0.2)
PRESETS: dict[str, UPGE] = {
    "sft": UPGE(_NO_MASK, ReferencePolicy("current"), AdvantageEstimator("constant"), Aggregation("token_mean")),
    "ppo": UPGE(_CLIP, ReferencePolicy("old"), AdvantageEstimator("given"), Aggregation("token_mean")),
    "grpo": UPGE(_CLIP, ReferencePolicy("old"), AdvantageEstimator("group_norm"), Aggregation("grpo")),
    "dr_grpo": UPGE(_CLIP, ReferencePolicy("old"), AdvantageEstimator("group_mean"), Aggregation("dr_grpo")),
    # LUFFY's off-policy (demonstration) rows; its on-policy rows use `dr_grpo`, advantages over the mixed group.
    "luffy": UPGE(_NO_MASK, ReferencePolicy("luffy"), AdvantageEstimator("group_mean"), Aggregation("dr_grpo")),
    # SRFT's SFT and self-rollout terms, with `advantages=srft_advantages(...)`; its demo-RL term is `offline`.
    "srft": UPGE(_NO_MASK, ReferencePolicy("current"), AdvantageEstimator("given"), Aggregation("token_mean")),
    # Off-policy RL on demonstrations with pi_ref = 1 (SRFT's demo-RL term; a reference, not used in training).
    "offline": UPGE(_NO_MASK, ReferencePolicy("one"), AdvantageEstimator("given"), Aggregation("dr_grpo")),
}


def get_preset(name: str, **overrides) -> UPGE:
    """Return a preset, optionally with parts or part fields replaced ([`PRESETS`] itself is never changed).

    Args:
        name (`str`):
            A key of [`PRESETS`]: `"sft"`, `"ppo"`, `"grpo"`, `"dr_grpo"`, `"luffy"`, `"srft"` or `"offline"`.
        **overrides:
            Whole parts (`mask=`, `reference=`, `advantage=`, `aggregation=`) or part fields (`epsilon_low`,
            `epsilon_high`, `delta`, `gamma`, `value`, `std_eps`, `max_completion_length`), e.g.
            `get_preset("grpo", epsilon_high=0.28, aggregation=Aggregation("bnpo"))`.

    Returns:
        `UPGE`: The configured estimator.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; expected one of {sorted(PRESETS)}.")
    parts = {f.name: getattr(PRESETS[name], f.name) for f in dataclasses.fields(UPGE)}
    for key, value in overrides.items():
        if key in parts:
            parts[key] = value
            continue
        owners = [p for p, obj in parts.items() if key != "kind" and key in {f.name for f in dataclasses.fields(obj)}]
        if not owners:
            raise ValueError(f"Unknown override {key!r}; to change a `kind`, pass the whole part.")
        for p in owners:
            parts[p] = dataclasses.replace(parts[p], **{key: value})
    return UPGE(**parts)

"""TRL's vLLM importance-sampling correction (`vllm_importance_sampling_correction`) under HPT, without vLLM.

The rule (docs/vllm.md): the correction `pi_trainer / pi_vLLM` is a property of a row that vLLM sampled, so it
multiplies the RL loss of the rollouts (TRL's `_compute_loss`) and nothing else. A demonstration is not sampled by vLLM:
its SFT term, its off-policy term in the middle band (`gamma_off`) and as LUFFY's off-policy group member keep the
weight HPT gives them, whatever the ratio. LUFFY's and the middle band's rollouts are vLLM samples and are corrected.

The tests take a real generation batch of the tiny trainer, turn the correction on as TRL does with `use_vllm=True`,
and set every row's sequence-level ratio to r. TRL multiplies each rollout's per-token loss by r, so the loss is
`r * L_rollouts + L_demonstrations`: at r=0 it must be the demonstrations' loss alone, and it must grow linearly in r
by the rollouts' loss.
"""

import pytest
import torch
from helpers import addition_dataset, is_always_solved, tiny_args

from hpt_trl import HPTTrainer
from hpt_trl.hpt_trainer import DEMO_ADVANTAGE, DEMO_IDS, DEMO_SFT_WEIGHT
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer


def alternating_reward(prompts, completions, **kwargs):
    """Odd-`a` prompts score 0 (gated at gamma=0); the rollouts of even-`a` prompts alternate 0.5 and 1 (all succeed at
    success_threshold=0.5, with non-zero advantages)."""
    return [0.5 + 0.5 * (i % 2) if is_always_solved(p) else 0.0 for i, p in enumerate(prompts)]


def _generation_batch(tmp_path, **overrides):
    """A trainer after one step and the (gated) generation batch of that step."""
    tokenizer = build_tiny_tokenizer()
    trainer = HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=alternating_reward,
        args=tiny_args(tmp_path, max_steps=1, **overrides),
        train_dataset=addition_dataset(),
        processing_class=tokenizer,
    )
    batches, original = [], trainer._apply_gate
    trainer._apply_gate = lambda inputs, output: batches.append(original(inputs, output)) or batches[-1]
    trainer.train()
    return trainer, batches[0]


def _loss_with_ratio(trainer, batch, ratio: float) -> torch.Tensor:
    inputs = dict(batch, importance_sampling_ratio=torch.full((batch["completion_ids"].size(0), 1), ratio))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, inputs).detach()


@pytest.mark.parametrize(
    "overrides, demonstration_term, rollouts_trained",
    [
        (dict(gamma=0.0), DEMO_SFT_WEIGHT, True),  # gated prompts: SFT; solved prompts: RL on rollouts
        (dict(gamma=0.0, gamma_off=1.0), DEMO_ADVANTAGE, False),  # solved prompts fall in the middle band
        (dict(algorithm="luffy"), DEMO_ADVANTAGE, True),  # every group: rollouts + off-policy demonstration
    ],
    ids=["sft", "middle-band", "luffy"],
)
def test_importance_sampling_ratio_scales_rollouts_only(tmp_path, overrides, demonstration_term, rollouts_trained):
    trainer, batch = _generation_batch(tmp_path, **overrides)
    assert DEMO_IDS in batch and (batch[demonstration_term] != 0).any()
    trainer.model.train()
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True  # what `use_vllm=True` sets
    demonstrations_only = trainer._demonstration_loss(trainer.model, batch).detach()
    losses = [_loss_with_ratio(trainer, batch, ratio) for ratio in (0.0, 1.0, 2.0)]

    assert demonstrations_only.abs() > 0
    torch.testing.assert_close(losses[0], demonstrations_only)  # ratio 0 removes the rollouts, not the demonstrations
    rollouts = losses[1] - losses[0]
    torch.testing.assert_close(losses[2] - losses[1], rollouts, rtol=1e-5, atol=1e-7)  # linear in r: rollouts only
    assert (rollouts.abs() > 0) == rollouts_trained

"""`skip_zero_loss_rows` is on by default wherever it is exact, and TRL's rollout metrics never mix two meanings."""

import logging

import pytest
import torch
from helpers import addition_dataset, count_rollout_passes, mixed_reward, tiny_args
from test_fidelity import _tiny_mixtral
from test_trainer import logged, make_trainer

from hpt_trl import HPTTrainer
from hpt_trl.tiny import build_tiny_tokenizer


def test_skipping_is_on_by_default_where_exact(tmp_path):
    trainer = make_trainer(tmp_path, gamma=0.0, max_steps=2)
    assert trainer._skip_zero_loss_rows
    trainer.train()
    assert max(logged(trainer, "hpt/skipped_rows_fraction")) > 0


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"entropy_coef": 0.01}, "an entropy bonus"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile < 1"),
        ({"loss_type": "bnpo", "algorithm": "grpo"}, "loss_type='bnpo'"),
    ],
)
def test_skipping_turns_off_with_one_info_line_where_inexact(tmp_path, caplog, overrides, reason):
    with caplog.at_level(logging.INFO, logger="hpt_trl.hpt_trainer"):
        trainer = make_trainer(tmp_path, **overrides)
    assert not trainer._skip_zero_loss_rows
    lines = [r.getMessage() for r in caplog.records if "skip_zero_loss_rows is off" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0]


def test_kl_penalty_makes_skipping_inexact(tmp_path):
    from hpt_trl import HPTConfig

    config = HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.1)
    assert config.inexact_skipping_reasons == ["beta != 0"]  # the trainer then turns skipping off (one info line)


def test_skipping_turns_off_for_a_moe_router_loss(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    with caplog.at_level(logging.INFO, logger="hpt_trl.hpt_trainer"):
        trainer = HPTTrainer(
            model=_tiny_mixtral(tokenizer),
            reward_funcs=mixed_reward,
            args=tiny_args(tmp_path),
            train_dataset=addition_dataset(),
            processing_class=tokenizer,
        )
    assert not trainer._skip_zero_loss_rows
    assert "mixture-of-experts router loss" in caplog.text


def test_rollout_metrics_of_kept_rows_are_renamed(tmp_path):
    trainer = make_trainer(tmp_path, gamma=0.0, max_steps=2)
    trainer.train()
    assert logged(trainer, "entropy") == [] and logged(trainer, "clip_ratio/region_mean") == []
    assert len(logged(trainer, "hpt/kept_rows/entropy")) == 2
    # without skipping, TRL's own names describe all rollouts in the loss
    full = make_trainer(tmp_path / "full", gamma=0.0, max_steps=2, skip_zero_loss_rows=False)
    full.train()
    assert len(logged(full, "entropy")) == 2 and logged(full, "hpt/kept_rows/entropy") == []


@pytest.mark.parametrize("skip", [False, True])
def test_entropy_is_missing_when_every_rollout_is_masked(tmp_path, skip):
    # algorithm="sft": every prompt on SFT, no rollout token in the loss. TRL would log entropy 0.
    trainer = make_trainer(tmp_path, algorithm="sft", max_steps=2, skip_zero_loss_rows=skip)
    trainer.train()
    key = "hpt/kept_rows/entropy" if skip else "entropy"
    assert logged(trainer, key) == [None, None]


def test_demonstrations_are_tokenized_once_per_dataset(tmp_path, monkeypatch):
    import hpt_trl.hpt_trainer as trainer_module

    calls = []
    original = trainer_module.demonstration_token_ids

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "demonstration_token_ids", counting)
    trainer = make_trainer(tmp_path, gamma=1.0, max_steps=3)  # every prompt on SFT at every step
    assert len(calls) == len(addition_dataset())
    trainer.train()
    assert len(calls) == len(addition_dataset())  # 3 steps x 4 demonstrations, none tokenized again
    assert logged(trainer, "hpt/demo_tokens") == [sum(len(d) + 1 for d in addition_dataset()["completion"])] * 3


def test_one_process_runs_no_placeholder_rollout_row(tmp_path):
    # algorithm="sft": no rollout can have a non-zero loss; on one process nothing has to keep the processes in step,
    # so no rollout row (not even a zero-loss placeholder) is run
    trainer = make_trainer(tmp_path, algorithm="sft", max_steps=2)
    assert count_rollout_passes(trainer) == []
    assert logged(trainer, "hpt/skipped_rows_fraction") == [1.0, 1.0]


def _reward_constant_after_first_call():
    """0 and 1 in every group of 2 rollouts on the first step, then 1.0 for every rollout: from step 2 on no row has
    a non-zero loss."""
    calls = []

    def reward(prompts, completions, **kwargs):
        calls.append(1)
        return [float(i % 2) for i in range(len(prompts))] if len(calls) == 1 else [1.0] * len(prompts)

    return reward


def test_a_step_with_nothing_to_train_keeps_adams_update(tmp_path):
    # Step 2 has no rollout row with a non-zero loss and no demonstration. Without skipping, TRL's loss gives every
    # parameter a zero gradient and AdamW still moves them by its momentum; skipping must give the same step (a
    # parameter left without a gradient would be skipped by the optimizer).
    def final_parameters(name, skip):
        trainer = make_trainer(
            tmp_path / name, reward=_reward_constant_after_first_call(), gamma=-1.0, max_steps=2,
            skip_zero_loss_rows=skip, optim="adamw_torch", learning_rate=1e-2,
        )  # fmt: skip
        sizes = count_rollout_passes(trainer)
        return sizes, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    skipped_sizes, skipped = final_parameters("skip", True)
    full_sizes, full = final_parameters("full", False)
    assert full_sizes == [8, 8] and skipped_sizes == [8]  # step 2 ran no rollout row
    for name, tensor in full.items():
        torch.testing.assert_close(skipped[name], tensor, atol=1e-6, rtol=1e-5, msg=name)

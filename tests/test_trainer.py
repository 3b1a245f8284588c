import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from helpers import (
    addition_dataset,
    count_rollout_passes,
    half_solved_reward,
    is_always_solved,
    mixed_reward,
    prompt_text,
    tiny_args,
)
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.demonstrations import demonstration_token_ids
from hpt_trl.gate import performance_per_prompt, rollout_success, sft_gate
from hpt_trl.hpt_trainer import DEMO_IDS, DEMO_MASK
from hpt_trl.tiny import END_OF_TURN_TOKEN, build_tiny_model, build_tiny_tokenizer


def make_trainer(
    tmp_path, trainer_class=HPTTrainer, config_class=HPTConfig, dataset=None, reward=mixed_reward, **overrides
):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    args = tiny_args(tmp_path, config_class=config_class, **overrides)
    return trainer_class(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset if dataset is not None else addition_dataset(),
        processing_class=tokenizer,
    )


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_gamma_negative_is_grpo(tmp_path):
    grpo = make_trainer(tmp_path / "grpo", GRPOTrainer, GRPOConfig)
    grpo.train()
    hpt = make_trainer(tmp_path / "hpt", gamma=-1.0)
    hpt.train()
    assert hpt.state.global_step == grpo.state.global_step == 3
    assert logged(hpt, "hpt/sft_fraction") == [0.0, 0.0, 0.0]
    moved = False
    for (name, p_hpt), p_grpo, p_init in zip(
        hpt.model.named_parameters(), grpo.model.parameters(), build_tiny_model(build_tiny_tokenizer()).parameters()
    ):
        torch.testing.assert_close(p_hpt, p_grpo, atol=1e-6, rtol=0, msg=name)
        moved |= not torch.allclose(p_hpt, p_init)
    assert moved, "the run must train, or the comparison proves nothing"


def test_exact_gate_half_solved(tmp_path):
    trainer = make_trainer(tmp_path, reward=half_solved_reward, gamma=0.0)
    seen_demonstrations = []
    original = trainer._demonstration_loss

    def spy(model, inputs):
        rows = inputs[DEMO_MASK].any(dim=1)
        for ids, mask in zip(inputs[DEMO_IDS][rows], inputs[DEMO_MASK][rows]):
            seen_demonstrations.append(trainer.processing_class.decode(ids[mask.bool()], skip_special_tokens=True))
        return original(model, inputs)

    trainer._demonstration_loss = spy
    trainer.train()

    assert logged(trainer, "hpt/sft_fraction") == [0.5, 0.5, 0.5]
    demonstrations = {prompt_text(r["prompt"]): r["completion"] for r in trainer.train_dataset}
    never_solved = sorted(d for p, d in demonstrations.items() if not is_always_solved(p))
    # Each step trains each never-solved prompt's demonstration exactly once, and nothing else
    assert sorted(seen_demonstrations) == sorted(never_solved * 3)
    # hpt/demo_tokens counts each gated demonstration once (its characters plus the EOS)
    assert logged(trainer, "hpt/demo_tokens") == [sum(len(d) + 1 for d in never_solved)] * 3
    # The gate log agrees, on disk and in memory
    lines = [json.loads(line) for line in (tmp_path / "hpt_gate.jsonl").read_text().splitlines()]
    assert lines == trainer.gate_history and len(lines) == 3
    for record in lines:
        assert sorted(record["performance"]) == [0.0, 0.0, 1.0, 1.0]
        assert [p == 0.0 for p in record["performance"]] == record["gated"]


def test_gated_rollouts_leave_the_rl_loss(tmp_path):
    trainer = make_trainer(tmp_path, gamma=0.0, max_steps=1)
    batches = []
    original = trainer._apply_gate

    def spy(inputs, output):
        output = original(inputs, output)
        batches.append((inputs, output))
        return output

    trainer._apply_gate = spy
    trainer.train()
    inputs, output = batches[0]
    gated_rows = torch.tensor([not is_always_solved(x["prompt"]) for x in inputs])
    assert gated_rows.any() and (~gated_rows).any()
    assert (output["tool_mask"][gated_rows] == 0).all()
    assert (output["tool_mask"][~gated_rows] == 1).all()


def _sgd_update(tmp_path, **overrides):
    trainer = make_trainer(tmp_path, gamma=0.0, max_steps=1, optim="sgd", learning_rate=0.5, **overrides)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert logged(trainer, "hpt/sft_fraction")[0] == 0.5
    assert logged(trainer, "frac_reward_zero_std")[0] < 1.0  # some RL rows carry a non-zero advantage
    return [p.detach() - b for p, b in zip(trainer.model.parameters(), before)]


def test_update_does_not_depend_on_micro_batch_split(tmp_path):
    split = _sgd_update(
        tmp_path / "split", num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=2
    )
    whole = _sgd_update(
        tmp_path / "whole", num_generations=4, per_device_train_batch_size=16, gradient_accumulation_steps=1
    )
    assert any(u.abs().max() > 1e-4 for u in whole)
    for u_split, u_whole in zip(split, whole):
        torch.testing.assert_close(u_split, u_whole, atol=1e-6, rtol=1e-5)


def test_sft_mode_lowers_demonstration_nll(tmp_path):
    trainer = make_trainer(tmp_path, gamma=1.0, max_steps=6, learning_rate=3e-2)
    trainer.train()
    assert logged(trainer, "hpt/sft_fraction") == [1.0] * 6
    nll = logged(trainer, "hpt/sft_loss")
    assert len(nll) == 6 and nll[-1] < nll[0] - 0.5


def test_conversational_dataset(tmp_path):
    trainer = make_trainer(tmp_path, dataset=addition_dataset(conversational=True), gamma=0.0, max_steps=2)
    trainer.train()
    assert logged(trainer, "hpt/sft_fraction") == [0.5, 0.5]
    for key in ("hpt/performance_mean", "hpt/demo_tokens", "hpt/sft_loss", "hpt/rl_loss"):
        assert len(logged(trainer, key)) == 2, key


def test_conversational_demonstration_ends_at_end_of_turn():
    tokenizer = build_tiny_tokenizer()
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    prompt = [{"role": "user", "content": "1+2="}]
    ids = demonstration_token_ids(
        prompt, [{"role": "assistant", "content": "1+2=3"}], tokenizer, [tokenizer.eos_token_id, end]
    )
    assert tokenizer.decode(ids) == "1+2=3" + END_OF_TURN_TOKEN  # the template's trailing newline is cut
    text_ids = demonstration_token_ids("1+2=", "1+2=3", tokenizer, [tokenizer.eos_token_id, end])
    assert text_ids[-1] == tokenizer.eos_token_id and tokenizer.decode(text_ids[:-1]) == "1+2=3"
    assert len(demonstration_token_ids("1+2=", "1+2=3", tokenizer, [tokenizer.eos_token_id], max_length=3)) == 3


def test_lora(tmp_path):
    tokenizer = build_tiny_tokenizer()
    trainer = HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=mixed_reward,
        args=tiny_args(tmp_path, gamma=0.0, max_steps=2, learning_rate=5e-2),
        train_dataset=addition_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert lora_before and all(
        not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before
    )
    assert logged(trainer, "hpt/sft_fraction") == [0.5, 0.5]


def test_max_demonstration_length_truncates_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hpt_trl.hpt_trainer"):
        trainer = make_trainer(tmp_path, gamma=1.0, max_steps=1, max_demonstration_length=4)
    assert "4 of 4 demonstrations are longer than max_demonstration_length=4" in caplog.text
    trainer.train()
    assert logged(trainer, "hpt/demo_tokens") == [16.0]  # 4 prompts x 4 tokens


def test_unscored_prompts_are_not_gated():
    rewards = torch.tensor([[0.0], [0.0], [torch.nan], [torch.nan], [torch.nan], [1.0]])
    performance = performance_per_prompt(rollout_success(rewards, 0, 1.0), num_generations=2)
    assert performance[0] == 0.0 and math.isnan(performance[1]) and performance[2] == 1.0
    assert sft_gate(performance, 0.0).tolist() == [True, False, False]
    assert sft_gate(performance, 1.0).tolist() == [True, True, True]
    assert sft_gate(performance, -0.5).tolist() == [False, False, False]


def test_performance_reward_name_in_training(tmp_path):
    def always_one(prompts, **kwargs):
        return [1.0] * len(prompts)

    tokenizer = build_tiny_tokenizer()
    trainer = HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=[half_solved_reward, always_one],
        args=tiny_args(tmp_path, gamma=0.0, max_steps=1, performance_reward="half_solved_reward"),
        train_dataset=addition_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    assert logged(trainer, "hpt/sft_fraction") == [0.5]  # the weighted sum would have gated nothing


# Bad input is rejected at construction, with a message naming the column, the row and what is expected


def test_missing_demonstration_column(tmp_path):
    dataset = addition_dataset().remove_columns("completion")
    with pytest.raises(ValueError, match=r"no demonstration column 'completion'.*\['prompt', 'solution'\]"):
        make_trainer(tmp_path, dataset=dataset)


def _with_demonstration(row_index, bad, conversational=False):
    rows = addition_dataset(conversational=conversational).to_list()
    rows[row_index]["completion"] = bad
    return Dataset.from_list(rows)


@pytest.mark.parametrize(
    "dataset, row, reason",
    [
        (lambda: _with_demonstration(2, ""), 2, "is an empty string"),
        (lambda: _with_demonstration(1, None), 1, "is None"),
        (lambda: Dataset.from_dict({"prompt": ["1+1=", "2+2="], "completion": [2, 4]}), 0, "is a int"),
        (lambda: _with_demonstration(3, [], conversational=True), 3, "is an empty list of messages"),
        (lambda: _with_demonstration(2, [{"role": "user", "content": "x"}], True), 2, "has a message with role 'user'"),
        (
            lambda: _with_demonstration(0, [{"role": "assistant", "content": " "}], True),
            0,
            "has an assistant message with empty",
        ),
    ],
)
def test_invalid_demonstration(tmp_path, dataset, row, reason):
    with pytest.raises(ValueError, match=rf"Row {row} of the train dataset .* column 'completion': it {reason}"):
        make_trainer(tmp_path, dataset=dataset())


def test_unknown_performance_reward(tmp_path):
    with pytest.raises(ValueError, match=r"performance_reward='accuracy'.*\['mixed_reward'\]"):
        make_trainer(tmp_path, performance_reward="accuracy")


def test_nan_gamma(tmp_path):
    with pytest.raises(ValueError, match="`gamma` must be a real number, got nan"):
        HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gamma=float("nan"))


def test_grpo_config_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="must be an `HPTConfig`"):
        make_trainer(tmp_path, config_class=GRPOConfig)


@pytest.mark.parametrize("loss_type", ["dr_grpo", "grpo", "dapo"])
def test_skipping_zero_loss_rows_keeps_the_update(tmp_path, loss_type):
    common = dict(num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=2, loss_type=loss_type)
    skipped = _sgd_update(tmp_path / "skip", skip_zero_loss_rows=True, **common)
    full = _sgd_update(tmp_path / "full", skip_zero_loss_rows=False, **common)
    assert any(u.abs().max() > 1e-4 for u in full)
    for u_skip, u_full in zip(skipped, full):
        torch.testing.assert_close(u_skip, u_full, atol=1e-6, rtol=1e-5)


def test_skipping_zero_loss_rows_runs_fewer_rows(tmp_path):
    trainer = make_trainer(tmp_path, gamma=0.0, max_steps=2, skip_zero_loss_rows=True)
    batch_sizes = count_rollout_passes(trainer)
    assert all(size < 8 for size in batch_sizes)  # the gated half and zero-advantage groups never reach TRL's loss
    fractions = logged(trainer, "hpt/skipped_rows_fraction")
    assert all(0 <= f <= 1 for f in fractions) and max(fractions) > 0


def test_skipping_zero_loss_rows_rejects_inexact_settings(tmp_path):
    with pytest.raises(ValueError, match=r"beta != 0"):
        HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, skip_zero_loss_rows=True, beta=0.1)

"""HPT as its authors run it (TsinghuaC3I/Unify-Post-Training, hpt/verl/verl/mix_src): the SFT/RL balance, P as a
success rate, demonstration advantages, the middle band, reasoning demonstrations and MoE models."""

import copy
import logging

import pytest
import torch
from datasets import Dataset
from helpers import addition_dataset, half_solved_reward, mixed_reward, tiny_args
from test_modes import run_and_capture
from test_trainer import logged, make_trainer
from transformers import MixtralConfig, MixtralForCausalLM

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.balance import DEMONSTRATION_LOSS_TYPES, REJECTED_LOSS_TYPES
from hpt_trl.demonstrations import demonstration_token_ids, end_of_turn_token_id
from hpt_trl.gate import (
    GateInputs,
    GateSettings,
    group_advantages,
    performance_per_prompt,
    plan_gate,
    resolve_performance_reward,
    rollout_success,
)
from hpt_trl.hpt_trainer import DEMO_ADVANTAGE, DEMO_IDS, DEMO_MASK, DEMO_SFT_WEIGHT
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer

# 1. The SFT/RL balance


def _sgd_update(trainer):
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batches = run_and_capture(trainer)
    return [b - p.detach() for p, b in zip(trainer.model.parameters(), before)], batches  # = lr * gradient


def _sgd_args(tmp_path, **overrides):
    values = dict(max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, num_generations=2)
    values.update(overrides)
    return values


@pytest.mark.parametrize("num_gated", [2, 3, 4])
def test_k_gated_prompts_give_k_times_the_sft_update(tmp_path, num_gated):
    # 4 prompts x 2 rollouts in one batch: `num_gated` copies of a never-solved prompt, the rest always solved (zero
    # advantage, so the whole update is the SFT term). The authors' update grows linearly with the gated prompts.
    def dataset(k):
        rows = [{"prompt": "1+4=", "completion": "1+4=5"}] * k + [{"prompt": "2+2=", "completion": "2+2=4"}] * (4 - k)
        return Dataset.from_list(rows)

    def update(k, path):
        trainer = make_trainer(path, dataset=dataset(k), reward=half_solved_reward, gamma=0.0, **_sgd_args(path))
        return _sgd_update(trainer)[0]

    one = update(1, tmp_path / "one")
    many = update(num_gated, tmp_path / "many")
    assert max(u.abs().max() for u in one) > 1e-4
    for u_one, u_many in zip(one, many):
        torch.testing.assert_close(u_many, num_gated * u_one, atol=1e-6, rtol=1e-4)


def _authors_gradients(trainer, model, output, sft_loss_coef):
    """Gradients of the authors' loss terms for one micro-batch holding the whole batch (`mix_actor.py`,
    `offline_loss_type="sft"`, `loss_remove_token_mean=True`, `loss_remove_clip=True`):
    `sft_loss_coef * masked_mean(-logp, demonstration tokens) + sum(-A * ratio * mask) / max_response_length`."""
    rl_rows = output["tool_mask"].amax(dim=1) > 0
    prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
    completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        model,
        torch.cat([prompt_ids, completion_ids], dim=1)[rl_rows],
        torch.cat([prompt_mask, completion_mask], dim=1)[rl_rows],
        completion_ids.size(1),
    )
    ratio = torch.exp(logps - logps.detach())
    advantages = output["advantages"][rl_rows].unsqueeze(1)
    rl_loss = (-advantages * ratio * completion_mask[rl_rows]).sum() / trainer.args.max_completion_length

    demo_rows = output[DEMO_MASK].any(dim=1)
    demo_ids, demo_mask = output[DEMO_IDS][demo_rows], output[DEMO_MASK][demo_rows]
    demo_logps, _, _ = trainer._get_per_token_logps_and_entropies(
        model,
        torch.cat([prompt_ids[demo_rows], demo_ids], dim=1),
        torch.cat([prompt_mask[demo_rows], demo_mask], dim=1),
        demo_ids.size(1),
    )
    sft_loss = sft_loss_coef * (-demo_logps * demo_mask).sum() / demo_mask.sum()

    grads = []
    for loss in (rl_loss, sft_loss):
        model.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return grads


@pytest.mark.parametrize("sft_loss_coef", [1.0, 0.3])
def test_sft_to_rl_ratio_matches_the_authors(tmp_path, sft_loss_coef):
    # Authors' layout: one micro-batch, one demonstration in it. Two runs from the same seed see the same rollouts:
    # without the SFT term (sft_loss_coef=0) the update is the RL part; the difference is the SFT part.
    def run(coef, path):
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer).double()
        trainer = HPTTrainer(
            model=model,
            reward_funcs=mixed_reward,
            args=tiny_args(
                path, gamma=0.0, per_device_train_batch_size=8, sft_loss_coef=coef, **_sgd_args(path, num_generations=4)
            ),
            train_dataset=addition_dataset(size=2),
            processing_class=tokenizer,
        )
        initial = copy.deepcopy(trainer.model)
        update, batches = _sgd_update(trainer)
        return trainer, initial, torch.cat([u.flatten() for u in update]), batches[0][1]

    trainer, initial, with_sft, output = run(sft_loss_coef, tmp_path / "sft")
    _, _, rl_only, output_rl = run(0.0, tmp_path / "rl")
    torch.testing.assert_close(output["advantages"], output_rl["advantages"])  # the same rollouts
    assert output[DEMO_MASK].any(dim=1).sum() == 1 and output["advantages"].abs().max() > 0
    sft_part = with_sft - rl_only

    oracle_rl, oracle_sft = _authors_gradients(trainer, initial, output, sft_loss_coef)
    # Each part is the authors' gradient times one constant (TRL divides by the rows, 1/8), the same for both parts
    scale_rl = (rl_only @ oracle_rl) / (oracle_rl @ oracle_rl)
    scale_sft = (sft_part @ oracle_sft) / (oracle_sft @ oracle_sft)
    for update, oracle, scale in ((rl_only, oracle_rl, scale_rl), (sft_part, oracle_sft, scale_sft)):
        torch.testing.assert_close(update, scale * oracle, atol=1e-6 * update.abs().max().item(), rtol=1e-5)
    assert scale_sft.item() == pytest.approx(scale_rl.item(), rel=1e-6)
    assert scale_rl.item() == pytest.approx(1 / 8, rel=1e-6)


@pytest.mark.parametrize("loss_type", DEMONSTRATION_LOSS_TYPES)
def test_every_supported_loss_type_is_split_invariant(tmp_path, loss_type):
    def update(path, batch_size, accumulation):
        common = dict(
            num_generations=4, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation
        )
        trainer = make_trainer(path, gamma=0.0, loss_type=loss_type, **_sgd_args(path, **common))
        return _sgd_update(trainer)[0]

    split, whole = update(tmp_path / "split", 8, 2), update(tmp_path / "whole", 16, 1)
    assert any(u.abs().max() > 1e-4 for u in whole)
    for u_split, u_whole in zip(split, whole):
        torch.testing.assert_close(u_split, u_whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss_type", sorted(REJECTED_LOSS_TYPES))
def test_loss_types_that_cannot_weigh_demonstrations_are_rejected(tmp_path, loss_type):
    extra = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}
    with pytest.raises(
        ValueError, match=rf"loss_type='{loss_type}' cannot be combined with training on demonstrations"
    ):
        HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type=loss_type, **extra)
    # Without demonstrations (pure GRPO) every loss type is TRL's own
    HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type=loss_type, algorithm="grpo", **extra)


# 2. P is a success rate


def _performance(rewards, threshold=1.0, index=0, n=4):
    return performance_per_prompt(rollout_success(torch.tensor(rewards), index, threshold), n).tolist()


def test_success_rate_with_a_format_bonus():
    # accuracy (column 0) and a format bonus (column 1): the bonus never counts as success
    rewards = [[0.0, 0.5], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5], [1.0, 0.5], [0.0, 0.5], [1.0, 0.0], [0.0, 0.5]]
    assert _performance(rewards) == [0.0, 0.5]


@pytest.mark.parametrize(
    "rewards, threshold, expected",
    [
        ([[-1.0], [-1.0], [1.0], [-1.0]], 1.0, [0.25]),  # -1/+1 rewards
        ([[0.0], [10.0], [10.0], [0.0]], 1.0, [0.5]),  # 0/10 rewards
        ([[0.0], [float("nan")], [1.0], [float("nan")]], 1.0, [0.5]),  # unscored rollouts are not counted
        ([[float("nan")]] * 4, 1.0, [float("nan")]),  # no scored rollout: P = NaN (never gated for gamma < 1)
        ([[0.7], [0.3], [0.7], [0.7]], 0.5, [0.75]),  # a documented threshold
    ],
)
def test_success_rate(rewards, threshold, expected):
    assert _performance(rewards, threshold) == pytest.approx(expected, nan_ok=True)


def test_format_bonus_does_not_disable_the_gate(tmp_path):
    def math_accuracy_reward(prompts, completions, **kwargs):
        return half_solved_reward(prompts, completions)

    def format_reward(prompts, **kwargs):
        return [0.5] * len(prompts)

    tokenizer = build_tiny_tokenizer()
    trainer = HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=[math_accuracy_reward, format_reward],
        args=tiny_args(tmp_path, gamma=0.0, max_steps=1, success_threshold=1.0),
        train_dataset=addition_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    assert logged(trainer, "hpt/sft_fraction") == [0.5]  # the weighted sum (0.5 for failures) would gate nothing


def test_minus_one_plus_one_rewards_gate_only_unsolved_prompts(tmp_path):
    def signed_reward(prompts, completions, **kwargs):
        return [2.0 * r - 1.0 for r in half_solved_reward(prompts, completions)]

    trainer = make_trainer(tmp_path, reward=signed_reward, gamma=0.0, max_steps=1, success_threshold=1.0)
    trainer.train()
    assert logged(trainer, "hpt/sft_fraction") == [0.5]  # the mean reward (-1 or +1) would gate nothing at gamma=0


@pytest.mark.parametrize(
    "names, requested, expected",
    [
        (["only_reward"], None, 0),
        (["format_reward", "math_accuracy_reward"], None, 1),
        (["accuracy_reward", "format_reward"], None, 0),
        (["a", "b"], "b", 1),
    ],
)
def test_resolve_performance_reward(names, requested, expected):
    index, reason = resolve_performance_reward(names, requested)
    assert index == expected and names[expected] in reason


@pytest.mark.parametrize(
    "names, requested, message",
    [
        (
            ["format_reward", "length_reward"],
            None,
            r"must know which of the reward functions \['format_reward', 'length_reward'\]",
        ),
        (["math_accuracy_reward", "accuracy_reward"], None, "Set `performance_reward` to one of them"),
        (["a", "b"], "c", r"`performance_reward='c'` is not one of the reward functions: \['a', 'b'\]"),
    ],
)
def test_ambiguous_or_unknown_performance_reward(names, requested, message):
    with pytest.raises(ValueError, match=message):
        resolve_performance_reward(names, requested)


def test_several_rewards_without_a_correctness_reward_stop_before_the_model_loads(tmp_path):
    def format_reward(prompts, **kwargs):
        return [0.0] * len(prompts)

    with pytest.raises(ValueError, match=r"\['mixed_reward', 'format_reward'\]"):
        HPTTrainer(
            model="a-model-that-is-never-loaded",
            reward_funcs=[mixed_reward, format_reward],
            args=tiny_args(tmp_path),
            train_dataset=addition_dataset(),
        )


def test_the_picked_correctness_reward_is_logged(tmp_path, caplog):
    def math_accuracy_reward(prompts, completions, **kwargs):
        return half_solved_reward(prompts, completions)

    tokenizer = build_tiny_tokenizer()
    with caplog.at_level(logging.INFO, logger="hpt_trl.hpt_trainer"):
        HPTTrainer(
            model=build_tiny_model(tokenizer),
            reward_funcs=[mixed_reward, math_accuracy_reward],
            args=tiny_args(tmp_path),
            train_dataset=addition_dataset(),
            processing_class=tokenizer,
        )
    assert "P counts the successes of `math_accuracy_reward`" in caplog.text


def test_srft_splits_rollouts_by_success(tmp_path):
    # Rewards 0.5 and 1 with success_threshold=1: a 0.5 rollout failed, so SRFT gives it -1
    trainer = make_trainer(tmp_path, algorithm="srft", max_steps=3, success_threshold=1.0)
    seen = set()
    for inputs, output in run_and_capture(trainer):
        texts = trainer.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
        rewards = torch.tensor(mixed_reward([x["prompt"] for x in inputs], texts))
        seen |= set(rewards.tolist())
        assert (output["advantages"][rewards < 1.0] == -1).all()
        assert (output["advantages"][rewards == 1.0] > 0).all()
    assert seen == {0.0, 0.5, 1.0}


# 3. Group advantages of demonstrations (LUFFY) as TRL computes them


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_are_trls(tmp_path, scale_rewards):
    # TRL's advantages of a GRPO run (two weighted rewards, one None) against `group_advantages` on its rewards
    def sparse_reward(prompts, completions, **kwargs):
        return [None if i == 0 else float(len(c) % 3) for i, c in enumerate(completions)]

    tokenizer = build_tiny_tokenizer()
    trainer = HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=[mixed_reward, sparse_reward],
        args=tiny_args(
            tmp_path,
            algorithm="grpo",
            scale_rewards=scale_rewards,
            max_steps=1,
            num_generations=4,
            reward_weights=[1.0, 0.5],
            performance_reward="mixed_reward",
        ),
        train_dataset=addition_dataset(),
        processing_class=tokenizer,
    )
    inputs, output = run_and_capture(trainer)[0]
    rewards = trainer._combined_rewards().view(-1, 4)
    torch.testing.assert_close(group_advantages(rewards, scale_rewards).view(-1), output["advantages"])


def test_luffy_advantages_use_every_reward_and_batch_scaling():
    # combined rewards of 2 prompts x 3 rollouts; the last rollout's place goes to the demonstration (reward 2.0)
    rewards = torch.tensor([[0.0, 1.5, 9.0], [0.5, 0.5, 9.0]])
    batch = GateInputs(success=torch.zeros(2, 3), rewards=rewards, has_demonstration=torch.ones(2, dtype=torch.bool))
    plan = plan_gate("luffy", batch, GateSettings(demonstration_reward=2.0, scale_rewards="batch"))
    group = torch.tensor([[0.0, 1.5, 2.0], [0.5, 0.5, 2.0]])
    centred = group - group.mean(dim=1, keepdim=True)
    expected = centred / (group.std() + 1e-4)
    torch.testing.assert_close(plan.demonstration_advantages, expected[:, -1])
    torch.testing.assert_close(plan.rollout_advantages[:, :2], expected[:, :2])
    assert plan.rollout_weights[:, -1].eq(0).all() and plan.rollout_weights[:, :2].eq(1).all()


def test_luffy_rejects_normalize_then_sum(tmp_path):
    with pytest.raises(ValueError, match="normalize_then_sum"):
        HPTConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            bf16=False,
            algorithm="luffy",
            multi_objective_aggregation="normalize_then_sum",
        )


# 4. The middle band, checked on the plan (the trainer run is in test_modes.py)


def test_middle_band_plan():
    success = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    batch = GateInputs(success=success, rewards=success, has_demonstration=torch.ones(4, dtype=torch.bool))
    plan = plan_gate("hpt", batch, GateSettings(gamma=0.0, gamma_off=0.5))
    assert plan.labels == ("sft", "middle", "middle", "rl")
    assert plan.sft_weights.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert plan.demonstration_advantages.tolist() == [0.0, 1.0, 1.0, 0.0]  # alone in its group: A = its score
    assert plan.rollout_weights.tolist() == [[0.0] * 4, [0.0] * 4, [0.0] * 4, [1.0] * 4]  # all rollouts removed
    assert plan.rollout_advantages is None


def test_gate_function_output_is_checked():
    batch = GateInputs(
        success=torch.tensor([[0.0, 0.0], [float("nan"), float("nan")]]),
        rewards=torch.zeros(2, 2),
        has_demonstration=torch.ones(2, dtype=torch.bool),
    )

    def unsafe_gate(performance):
        return performance, 1 - performance

    with pytest.raises(ValueError, match=r"gate_function .*unsafe_gate returned alpha=nan .* map NaN explicitly"):
        plan_gate("hpt", batch, GateSettings(gate_function=unsafe_gate))


# 5. Demonstrations of reasoning models

SPECIAL = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<|im_start|>",
    "<|im_end|>",
]
SPECIAL += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]

# The parts of DeepSeek-R1-Distill's template that matter here: assistant messages lose everything up to </think>,
# and the generation prompt opens the reasoning block
R1_TEMPLATE = (
    "<｜begin▁of▁sentence｜>{% for message in messages %}{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}<｜Assistant｜>{{ content }}<｜end▁of▁sentence｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
# Qwen3-style: the reasoning of the last assistant turn is kept, re-rendered as <think>\n...\n</think>\n\n
QWEN3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and '</think>' in message['content'] %}"
    "{% set reasoning = message['content'].split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = message['content'].split('</think>')[-1].lstrip('\n') %}"
    "<|im_start|>assistant\n<think>\n{{ reasoning }}\n</think>\n\n{{ content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _tokenizer(template):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.chat_template = template
    return tokenizer


def _ids(tokenizer, prompt, demonstration, eos_tokens):
    eos_ids = [tokenizer.convert_tokens_to_ids(token) for token in eos_tokens]
    return tokenizer.decode(demonstration_token_ids(prompt, demonstration, tokenizer, eos_ids))


PROMPT = [{"role": "user", "content": "1+2=?"}]


def test_r1_distill_keeps_the_reasoning_trace():
    tokenizer = _tokenizer(R1_TEMPLATE)
    demonstration = [{"role": "assistant", "content": "<think>\n1+2 is 3.\n</think>\n\nThe answer is 3."}]
    text = _ids(tokenizer, PROMPT, demonstration, ["<｜end▁of▁sentence｜>"])
    # the generation prompt already opened <think>\n: no second one; the trace stays; the turn ends as generation does
    assert text == "1+2 is 3.\n</think>\n\nThe answer is 3.<｜end▁of▁sentence｜>"


def test_qwen3_style_reasoning_and_literal_special_tokens():
    tokenizer = _tokenizer(QWEN3_TEMPLATE)
    content = "<think>\nWhy does <|im_end|> appear?\n</think>\n\nIt is text: <|im_end|> 3."
    text = _ids(tokenizer, PROMPT, [{"role": "assistant", "content": content}], ["<|im_end|>", "<|end_of_text|>"])
    assert text == content + "<|im_end|>"
    ids = demonstration_token_ids(PROMPT, content, tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 1  # the literal text is not the token


def test_llama3_style_content_blocks():
    tokenizer = _tokenizer(LLAMA3_TEMPLATE)
    demonstration = [
        {"role": "assistant", "content": [{"type": "text", "text": "1+2"}, {"type": "text", "text": "=3"}]}
    ]
    text = _ids(tokenizer, PROMPT, demonstration, ["<|end_of_text|>", "<|eot_id|>"])
    assert text == "1+2=3<|eot_id|>"  # the turn ends with <|eot_id|>, the end-of-turn token generation stops on
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ["<|end_of_text|>", "<|eot_id|>"]]
    assert end_of_turn_token_id(tokenizer, eos_ids) == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_plain_text_demonstration_with_literal_eos_text():
    tokenizer = build_tiny_tokenizer()
    text = _ids(tokenizer, "1+2=", "3 (not </s> yet) done", ["</s>"])
    assert text == "3 (not </s> yet) done</s>"


def test_several_assistant_messages_are_refused(tmp_path):
    rows = addition_dataset(conversational=True).to_list()
    rows[1]["completion"] = [{"role": "assistant", "content": "1+"}, {"role": "assistant", "content": "4=5"}]
    with pytest.raises(ValueError, match="Row 1 .* has 2 messages; a demonstration is one assistant message"):
        make_trainer(tmp_path, dataset=Dataset.from_list(rows))


def test_trainer_puts_the_demonstration_after_the_rollouts_prompt_ids(tmp_path):
    tokenizer = _tokenizer(R1_TEMPLATE)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{a}+4=?"}],
            "completion": [{"role": "assistant", "content": f"<think>\n{a}+4\n</think>\n\n{a + 4}"}],
        }
        for a in (1, 3)
    ]
    end = tokenizer.convert_tokens_to_ids("<｜end▁of▁sentence｜>")
    model = build_tiny_model(tokenizer)
    model.generation_config.eos_token_id = [end]
    trainer = HPTTrainer(
        model=model,
        reward_funcs=half_solved_reward,
        args=tiny_args(tmp_path, gamma=0.0, max_steps=1, per_device_train_batch_size=4),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    inputs, output = run_and_capture(trainer)[0]
    row = int(output[DEMO_MASK].any(dim=1).nonzero()[0])
    prompt = tokenizer.decode(output["prompt_ids"][row][output["prompt_mask"][row].bool()])
    demo = tokenizer.decode(output[DEMO_IDS][row][output[DEMO_MASK][row].bool()])
    assert prompt.endswith("<｜Assistant｜><think>\n")
    a = prompt.split("<｜User｜>")[1].split("+")[0]
    assert demo == f"{a}+4\n</think>\n\n{int(a) + 4}<｜end▁of▁sentence｜>"


# 6. skip_zero_loss_rows with mixture-of-experts models


def _tiny_mixtral(tokenizer):
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
        output_router_logits=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return MixtralForCausalLM(config)


def test_skip_zero_loss_rows_refuses_moe_router_loss(tmp_path):
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="not exact for a mixture-of-experts model with `output_router_logits`"):
        HPTTrainer(
            model=_tiny_mixtral(tokenizer),
            reward_funcs=mixed_reward,
            args=tiny_args(tmp_path, skip_zero_loss_rows=True),
            train_dataset=addition_dataset(),
            processing_class=tokenizer,
        )


def test_demonstration_rows_carry_the_plan(tmp_path):
    trainer = make_trainer(tmp_path, gamma=0.0, max_steps=1)
    inputs, output = run_and_capture(trainer)[0]
    record = trainer.gate_history[0]
    owners = output[DEMO_SFT_WEIGHT] > 0
    assert owners.sum() == sum(record["gated"]) == 2 and (output[DEMO_ADVANTAGE] == 0).all()

"""What `GRPOTrainer` accepts and `HPTTrainer` must accept too, and the rules where they differ by design (see
docs/grpo_differences.md)."""

import pytest
import torch
from helpers import addition_dataset, half_solved_reward, tiny_args
from transformers import LlamaConfig, LlamaForSequenceClassification

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer


def format_reward(prompts, **kwargs):
    return [0.5] * len(prompts)


def length_reward(prompts, completions, **kwargs):
    return [float(len(c) % 2) for c in completions]


def _trainer(tmp_path, reward_funcs, model=None, **settings):
    tokenizer = build_tiny_tokenizer()
    return HPTTrainer(
        model=build_tiny_model(tokenizer) if model is None else model,
        reward_funcs=reward_funcs,
        args=tiny_args(tmp_path, max_steps=1, **settings),
        train_dataset=addition_dataset(),
        processing_class=tokenizer,
    )


# 1. Modes that never read P take any reward functions, as GRPOTrainer does


@pytest.mark.parametrize(
    "settings, reads_performance",
    [
        ({}, True),
        ({"gamma": 0.5, "gate": "linear", "gate_linear_upper": 0.8}, True),
        ({"algorithm": "srft"}, True),
        ({"gamma": 0.0, "gamma_off": 0.5}, True),
        ({"gamma": -1.0}, False),
        ({"gamma": 1.0}, False),
        ({"algorithm": "grpo"}, False),
        ({"algorithm": "sft"}, False),
        ({"algorithm": "luffy"}, False),
    ],
)
def test_which_settings_read_the_success_rate(settings, reads_performance):
    assert HPTConfig(output_dir="unused", use_cpu=True, **settings).uses_performance is reads_performance


@pytest.mark.parametrize(
    "settings", [{"gamma": -1.0}, {"algorithm": "grpo"}, {"algorithm": "sft"}, {"gamma": 1.0}, {"algorithm": "luffy"}]
)
def test_modes_that_never_read_p_train_with_several_unknown_rewards(tmp_path, settings):
    trainer = _trainer(tmp_path, [format_reward, length_reward], **settings)
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.gate_history[0]["performance"] == [None] * 4  # no correctness reward: P is not computed


def test_a_mode_that_reads_p_still_asks_which_reward_scores_correctness(tmp_path):
    with pytest.raises(ValueError, match=r"Set `performance_reward` to one of them"):
        HPTTrainer(
            model="a-model-that-is-never-loaded",
            reward_funcs=[format_reward, length_reward],
            args=tiny_args(tmp_path, gamma=0.0),
            train_dataset=addition_dataset(),
        )


# 2. A reward model as the correctness reward needs an explicit success_threshold


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny Llama sequence classifier with one label (a reward model) and its tokenizer, saved locally."""
    tokenizer = build_tiny_tokenizer()
    policy_config = build_tiny_model(tokenizer).config
    settings = {k: v for k, v in policy_config.to_dict().items() if k not in ("id2label", "label2id")}
    config = LlamaConfig(**settings, num_labels=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
    path = str(tmp_path_factory.mktemp("tiny-reward-model"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("as_instance", [False, True])
def test_a_reward_model_as_correctness_reward_needs_a_success_threshold(tmp_path, reward_model_dir, as_instance):
    reward = LlamaForSequenceClassification.from_pretrained(reward_model_dir) if as_instance else reward_model_dir
    with pytest.raises(ValueError, match=r"is a reward model: its scores are arbitrary.*success_threshold"):
        HPTTrainer(
            model="a-model-that-is-never-loaded",
            reward_funcs=reward,
            args=tiny_args(tmp_path, success_threshold=None),
            train_dataset=addition_dataset(),
        )


def test_a_reward_model_with_a_success_threshold_gates_on_it(tmp_path, reward_model_dir):
    trainer = _trainer(tmp_path, reward_model_dir, success_threshold=0.0)
    trainer.train()
    scores = [p for p in trainer.gate_history[0]["performance"]]
    assert all(p is not None and 0.0 <= p <= 1.0 for p in scores)


@pytest.mark.parametrize("settings", [{"gamma": -1.0}, {"algorithm": "sft"}])
def test_a_reward_model_needs_no_threshold_where_p_is_not_read(tmp_path, reward_model_dir, settings):
    trainer = _trainer(tmp_path, reward_model_dir, success_threshold=None, **settings)
    trainer.train()
    assert trainer.gate_history[0]["performance"] == [None] * 4  # P of a reward model without a threshold: undefined


def test_a_reward_model_beside_a_verifier_needs_no_threshold(tmp_path, reward_model_dir):
    def math_accuracy_reward(prompts, completions, **kwargs):
        return half_solved_reward(prompts, completions)

    trainer = _trainer(tmp_path, [reward_model_dir, math_accuracy_reward], success_threshold=None)
    assert trainer.reward_func_names[trainer._performance_index] == "math_accuracy_reward"
    assert trainer._success_threshold == 1.0


# 3. docs/grpo_differences.md says what the code does


def test_the_differences_page_matches_the_defaults_and_the_rules():
    import re
    from pathlib import Path

    from trl import GRPOConfig

    from hpt_trl.balance import REJECTED_LOSS_TYPES
    from hpt_trl.gate import KNOWN_CORRECTNESS_REWARDS

    text = (Path(__file__).resolve().parent.parent / "docs" / "grpo_differences.md").read_text()
    rows = re.findall(r'^\| `(\w+)` \| `"?([\w.]+)"?` \| `"?([\w.]+)"?` \|$', text, flags=re.MULTILINE)
    trl_config, hpt_config = GRPOConfig("unused", use_cpu=True), HPTConfig("unused", use_cpu=True)
    assert rows and all(str(getattr(trl_config, name)) == trl and str(getattr(hpt_config, name)) == hpt
                        for name, trl, hpt in rows)  # fmt: skip
    changed = [name for name in ("loss_type", "scale_rewards", "beta", "temperature", "num_generations")
               if getattr(trl_config, name) != getattr(hpt_config, name)]  # fmt: skip
    assert sorted(name for name, _, _ in rows) == sorted(changed)
    assert all(f'"{loss_type}"' in text for loss_type in REJECTED_LOSS_TYPES)
    assert all(f"`{name}`" in text for name in KNOWN_CORRECTNESS_REWARDS)

"""The paper's baselines as `HPTConfig(algorithm=...)`, the feedback functions and the middle band."""

import pytest
import torch
from helpers import addition_dataset, half_solved_reward, is_always_solved, mixed_reward
from test_trainer import logged, make_trainer

from hpt_trl import HPTConfig
from hpt_trl.gate import linear_gate, switch_gate
from hpt_trl.hpt_trainer import DEMO_ADVANTAGE, DEMO_IDS, DEMO_SFT_WEIGHT


def run_and_capture(trainer):
    """Train, keeping every generation batch's inputs and gated output."""
    batches, original = [], trainer._apply_gate

    def spy(inputs, output):
        output = original(inputs, output)
        batches.append((inputs, {k: v.clone() if torch.is_tensor(v) else v for k, v in output.items()}))
        return output

    trainer._apply_gate = spy
    trainer.train()
    return batches


@pytest.mark.parametrize("algorithm", ["hpt", "sft", "grpo", "luffy", "srft"])
def test_each_algorithm_trains(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, algorithm=algorithm, max_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batches = run_and_capture(trainer)
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))
    expected = {"hpt": None, "sft": "sft", "grpo": "rl", "luffy": "luffy", "srft": "srft"}[algorithm]
    if expected:
        assert logged(trainer, f"hpt/estimator/{expected}") == [1.0, 1.0]
    for record in trainer.gate_history:
        assert len(record["estimator"]) == 4
    inputs, output = batches[0]
    if algorithm == "grpo":
        assert DEMO_IDS not in output and "tool_mask" not in output
    if algorithm == "sft":
        assert (output["tool_mask"] == 0).all() and (output[DEMO_SFT_WEIGHT] > 0).sum() == 4
    if algorithm == "luffy":
        # the last rollout of each group (n=2) leaves the RL loss; the demonstration joins the group instead
        assert output["tool_mask"][1::2].eq(0).all() and output["tool_mask"][0::2].eq(1).all()
        assert (output[DEMO_ADVANTAGE] != 0).any() and not (output[DEMO_SFT_WEIGHT] != 0).any()
    if algorithm == "srft":
        scores = torch.tensor(mixed_reward([x["prompt"] for x in inputs], [""] * len(inputs)))
        assert (output["advantages"][scores == 0] == -1).all()
        assert (output["advantages"][scores > 0] > 0.1).all()  # 0.1 * exp(H) with H > 0
        assert (output[DEMO_SFT_WEIGHT] > 0).sum() == 4


def test_linear_gate_values():
    performance = torch.tensor([0.0, 0.25, 0.5, 1.0, float("nan")])
    alpha, beta = linear_gate(performance, 0.0, 0.5)
    torch.testing.assert_close(beta, torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(alpha, 1 - beta)
    alpha, beta = switch_gate(performance, 0.25)
    assert beta.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_linear_gate_weights_both_terms(tmp_path):
    trainer = make_trainer(tmp_path, gate="linear", gamma=0.0, gate_linear_upper=1.0, max_steps=1)
    inputs, output = run_and_capture(trainer)[0]
    record = trainer.gate_history[0]
    for row, example in enumerate(inputs):
        p = record["performance"][row // 2]
        assert output["tool_mask"][row].max().item() == pytest.approx(p)  # alpha = P on [0, 1]
        if row % 2 == 0:
            assert output[DEMO_SFT_WEIGHT][row].item() == pytest.approx(1 - p)
    assert "mixed" in record["estimator"] or all(p in (0.0, 1.0) for p in record["performance"])


def test_custom_gate_function(tmp_path):
    def constant_gate(performance):
        return torch.full_like(performance, 0.3), torch.full_like(performance, 0.7)

    tokenizer_trainer = make_trainer(tmp_path, max_steps=1)
    trainer = type(tokenizer_trainer)(
        model=tokenizer_trainer.model,
        reward_funcs=half_solved_reward,
        args=tokenizer_trainer.args,
        train_dataset=addition_dataset(),
        processing_class=tokenizer_trainer.processing_class,
        gate_function=constant_gate,
    )
    inputs, output = run_and_capture(trainer)[0]
    torch.testing.assert_close(output["tool_mask"].amax(dim=1), torch.full((8,), 0.3))
    torch.testing.assert_close(output[DEMO_SFT_WEIGHT][0::2], torch.full((4,), 0.7))
    assert trainer.gate_history[0]["estimator"] == ["mixed"] * 4


def test_middle_band_is_the_authors_rule(tmp_path):
    # gamma < P <= gamma_off: all rollouts leave the loss; the demonstration, alone in its group, gets its score (1.0)
    # as advantage and is trained with LUFFY's shaping (mix_trainer.py: on_remove_num = n, off_add_num = -1)
    trainer = make_trainer(tmp_path, gamma=0.0, gamma_off=1.0, max_steps=1)
    inputs, output = run_and_capture(trainer)[0]
    record = trainer.gate_history[0]
    for row in range(len(inputs)):
        solved = is_always_solved(inputs[row]["prompt"])
        assert record["estimator"][row // 2] == ("middle" if solved else "sft")
        assert (output["tool_mask"][row] == 0).all()
        first = row % 2 == 0
        assert output[DEMO_ADVANTAGE][row].item() == (1.0 if solved and first else 0.0)
        assert output[DEMO_SFT_WEIGHT][row].item() == (1.0 if first and not solved else 0.0)
    assert logged(trainer, "hpt/estimator/middle") == [0.5]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"algorithm": "ppo"}, "`algorithm` must be one of"),
        ({"gate": "sigmoid"}, "`gate` must be one of"),
        ({"gate": "linear", "gamma": 0.5, "gate_linear_upper": 0.5}, "must be greater than `gamma`"),
        ({"gamma": 0.5, "gamma_off": 0.25}, "`gamma_off` .* must be greater than `gamma`"),
    ],
)
def test_invalid_mode_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **overrides)

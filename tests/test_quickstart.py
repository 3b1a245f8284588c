import json

import pytest

from hpt_trl.cli import main as cli_main
from hpt_trl.toy_task import build_toy_math_dataset, extract_answer, toy_answer_reward


def test_toy_task_is_fixed_and_held_out():
    first, second = build_toy_math_dataset(seed=0), build_toy_math_dataset(seed=0)
    assert first["train"]["prompt"] == second["train"]["prompt"]
    assert not set(first["train"]["prompt"]) & set(first["test"]["prompt"])
    example = first["train"][0]
    assert extract_answer(example["completion"]) == example["solution"]
    assert toy_answer_reward([example["completion"], "1+1=2;#3"], [example["solution"], "2"]) == [1.0, 0.0]
    conversational = build_toy_math_dataset(conversational=True)["train"][0]
    assert conversational["completion"][0]["role"] == "assistant"


def test_cli_lists_commands(capsys):
    assert cli_main([]) == 2
    assert "quickstart" in capsys.readouterr().err  # usage goes to stderr with exit code 2


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    assert cli_main(["quickstart", "--output-dir", str(tmp_path), "--max-steps", "300"]) == 0
    results = json.loads((tmp_path / "quickstart_results.json").read_text())
    assert results["heldout_accuracy_before"] == 0.0
    assert results["heldout_accuracy_after"] >= 0.15
    assert results["sft_share_first_10pct_steps"] > results["sft_share_last_10pct_steps"]
    assert (tmp_path / "training_dynamics.png").stat().st_size > 10_000
    assert (tmp_path / "final" / "model.safetensors").exists()

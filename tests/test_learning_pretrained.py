"""The learning benchmark in the paper's regime (`benchmarks/learning_pretrained.py`, `benchmarks/tasks/chain_sums.py`):
the task family and its two styles, the splits, the spread check and pass@k, and a smoke run of the whole pipeline
(tiny base, 2 steps, 1 seed, 2 methods) that is resumed without re-running anything. Offline; no accuracy is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.tasks.chain_sums import (
    BaseRecipe,
    build_splits,
    held_out_prompts,
    own_style,
    pass_at_k,
    spread,
    spread_problems,
    teacher_style,
)
from hpt_trl.toy_task import toy_answer_reward

ROOT = Path(__file__).resolve().parent.parent


def test_styles_differ_and_both_are_right():
    assert own_style((3, 4, 5)) == "7,12#12"
    assert teacher_style((3, 4, 5)) == "3+4=7;7+5=12;#12"
    assert toy_answer_reward([own_style((9, 9, 9)), teacher_style((9, 9, 9))], ["27", "27"]) == [1.0, 1.0]


def test_splits_are_disjoint_and_ood_has_one_more_step():
    splits = build_splits()
    prompts = {name: set(splits[name]["prompt"]) for name in splits}
    assert len(prompts["train"]) + len(prompts["validation"]) + len(prompts["test"]) == 729
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    assert all(p.count("+") == 3 for p in prompts["ood"]) and all(p.count("+") == 2 for p in prompts["train"])
    assert held_out_prompts(splits) == prompts["validation"] | prompts["test"] | prompts["ood"]
    assert splits["train"][0]["completion"] == teacher_style(
        tuple(map(int, splits["train"][0]["prompt"][:-1].split("+")))
    )
    assert build_splits()["test"]["prompt"] == splits["test"]["prompt"]  # fixed seed


def test_spread_bounds_and_pass_at_k():
    report = spread([[1.0] * 8, [1.0] * 4 + [0.0] * 4, [0.0] * 8, [0.0] * 8])
    assert report["mean_p"] == 1.5 / 4 and report["histogram"][0] == 2 and report["histogram"][8] == 1
    assert spread_problems(report) == []
    assert spread_problems(spread([[1.0] * 8] * 4))  # always solved: out of bounds
    assert pass_at_k(16, 0, 4) == 0.0 and pass_at_k(16, 16, 1) == 1.0 and abs(pass_at_k(16, 4, 1) - 0.25) < 1e-12
    assert abs(pass_at_k(16, 1, 4) - 0.25) < 1e-12  # 1 - C(15,4)/C(16,4)
    assert BaseRecipe().key() == BaseRecipe().key() != BaseRecipe(steps=1).key()


def test_smoke_run_writes_results_and_resumes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, str(ROOT / "benchmarks" / "learning_pretrained.py"), "--smoke", "--output-dir",
        str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--tag", "smoke", "--pause-file", "",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert "Base spread on the 16 post-training prompts" in completed.stdout
    result = json.loads((tmp_path / "out" / "learning_pretrained_smoke.json").read_text())
    assert {"command", "commit", "versions", "commands", "settings", "base", "runs", "chosen_lr", "summary"} <= set(
        result
    )
    assert result["base"]["spread_check"] == "skipped" and result["base"]["spread"]["n"] == 8
    assert set(result["summary"]) == {"sft", "hpt_g0"}
    for run in result["runs"]:
        assert run["steps"] == 2 and len(run["curves"]["sft_fraction"]) == 2
        assert {"test_greedy", "ood_greedy", "validation_greedy", "test_pass@1", "test_pass@4", "test_pass@16"} <= set(
            run["metrics"]
        )
        assert all(0.0 <= v <= 1.0 for v in run["metrics"].values())
    table = (tmp_path / "out" / "learning_pretrained_smoke.md").read_text()
    assert "| HPT (gamma 0) |" in table and "| SFT |" in table and "spread check skipped" in table
    assert (tmp_path / "out" / "learning_pretrained_smoke_sft_share.png").stat().st_size > 0

    # Resumed: every run is found in the JSON and skipped
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming: 2 finished runs" in again.stdout
    assert not any(line.startswith(("sweep ", "final ")) for line in again.stdout.splitlines())  # nothing re-run
    assert len(json.loads((tmp_path / "out" / "learning_pretrained_smoke.json").read_text())["commands"]) == 2


def test_refuses_a_base_out_of_bounds(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, str(ROOT / "benchmarks" / "learning_pretrained.py"), "--smoke", "--output-dir",
        str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--pause-file", "",
    ]  # fmt: skip
    command.remove("--smoke")
    command += ["--base-steps", "2", "--base-hidden-size", "32", "--max-train", "16", "--num-validation", "8",
                "--num-test", "8", "--num-ood", "8"]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 2, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Refusing to run the comparison" in completed.stdout
    assert not (tmp_path / "out" / "learning_pretrained_cpu.json").exists()

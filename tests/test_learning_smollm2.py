"""The SmolLM2 learning benchmark (`benchmarks/learning_smollm2.py`, `benchmarks/tasks/word_problems.py`): the problem
generator, its splits, demonstrations, prompt and reward, and (slow) a smoke run of the whole pipeline on the tiny model
that is resumed without re-running anything. Offline; no accuracy is asserted."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.tasks.word_problems import (
    EXAMPLES,
    Problem,
    binomial_se,
    build_problem_splits,
    build_splits,
    extract_answer,
    paired_difference,
    prompt_messages,
    word_problem_reward,
)

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark():
    """benchmarks/learning_smollm2.py as a module."""
    return importlib.import_module("benchmarks.learning_smollm2")


def fake_run(key: str, method: str, seed, accuracy: float) -> dict:
    metrics = {name: {"accuracy": accuracy} for name in ("one_step", "two_step", "all")}
    return {"key": key, "method": method, "seed": seed, "metrics": metrics}


def test_merge_adds_only_missing_runs_and_refuses_other_settings():
    bench = load_benchmark()
    settings = {"steps": 10, "data_hash": "abc"}
    result = {"settings": settings, "commands": ["first"], "runs": [fake_run("base", "base", None, 0.3),
                                                                     fake_run("grpo|s0", "grpo", 0, 0.2)]}  # fmt: skip
    other = {"settings": dict(settings), "commands": ["first", "second"],
             "runs": [fake_run("base", "base", None, 0.9), fake_run("grpo|s1", "grpo", 1, 0.4)]}  # fmt: skip
    assert bench.merge_runs(result, other, "other.json") == ["grpo|s1"]
    assert [r["key"] for r in result["runs"]] == ["base", "grpo|s0", "grpo|s1"]
    assert result["runs"][0]["metrics"]["all"]["accuracy"] == 0.3  # the table's own base run is kept
    assert result["commands"] == ["first", "second"]
    assert bench.merge_runs(result, other, "other.json") == []  # merging again adds nothing
    with pytest.raises(ValueError, match="other settings"):
        bench.merge_runs(result, dict(other, settings={"steps": 20, "data_hash": "abc"}), "other.json")


def test_seed_means_average_the_finished_seeds():
    bench = load_benchmark()
    args = bench.parse_args(["--seeds", "0", "1", "--methods", "grpo", "hpt"])
    runs = {}
    for seed, accuracy in ((0, 0.2), (1, 0.4)):
        key = bench.key_of("grpo", seed, args)
        runs[key] = fake_run(key, "grpo", seed, accuracy)
    key = bench.key_of("hpt", 0, args)
    runs[key] = fake_run(key, "hpt", 0, 0.5)
    lines = bench.seed_means(runs, args)
    assert "| GRPO | 0, 1 | 30.0% (20.0%-40.0%) | 30.0% (20.0%-40.0%) | 30.0% (20.0%-40.0%) |" in lines
    assert "| HPT (gamma 0) | 0 | 50.0% (50.0%-50.0%) | 50.0% (50.0%-50.0%) | 50.0% (50.0%-50.0%) |" in lines
    assert bench.seed_means(runs, bench.parse_args(["--seeds", "0"])) == []


def test_the_table_pairs_hpt_with_each_method_on_the_same_problems():
    bench = load_benchmark()
    args = bench.parse_args(["--methods", "hpt", "grpo", "sft"])

    def run(method, seed, one_step, two_step):
        key = bench.key_of(method, seed, args)
        metrics = {"one_step": {"scores": one_step}, "two_step": {"scores": two_step}}
        return key, {"key": key, "method": method, "seed": seed, "metrics": metrics}

    runs = dict([run("base", None, "0000", "0000"), run("hpt", 0, "1100", "1111"), run("grpo", 0, "1100", "0000")])
    lines = bench.paired_versus_hpt(runs, args)
    # one-step: identical answers; two-step: +1 on every problem (no noise); all: half +1, half 0
    assert f"| GRPO | 0 | +0.0 ± 0.0 | +100.0 ± 0.0 | +50.0 ± {100 * (2 / 7 / 8) ** 0.5:.1f} |" in lines
    assert any(line.startswith("| base model (no post-training) | 0 | +50.0 ± ") for line in lines)
    assert not any("SFT" in line for line in lines)  # not run: no row
    assert bench.paired_versus_hpt({k: v for k, v in runs.items() if v["method"] != "hpt"}, args) == []


def test_answers_are_right_and_small():
    splits = build_problem_splits(0, 400, 150, 150)
    assert {name: len(rows) for name, rows in splits.items()} == {"one_step": 150, "two_step": 150, "train": 400}
    for problem in [p for rows in splits.values() for p in rows]:
        value = problem.operands[0]
        for op, x in zip(problem.ops, problem.operands[1:]):
            value = {"+": value + x, "-": value - x, "*": value * x}[op]
            assert value >= 0
        assert problem.answer == value and isinstance(value, int)
        assert all(1 <= x <= 20 for x in problem.operands)
    assert all(p.num_steps == 1 for p in splits["one_step"]) and all(p.num_steps == 2 for p in splits["two_step"])
    assert {p.ops[0] for p in splits["one_step"]} == {"+", "-", "*"}
    assert sum(p.num_steps == 1 for p in splits["train"]) == 200
    assert Problem(("-", "+"), (14, 5, 8)).answer == 17 and Problem(("*",), (3, 4)).answer == 12


def test_splits_are_disjoint_and_seeded():
    splits = build_problem_splits()
    signatures = {name: {p.signature for p in rows} for name, rows in splits.items()}
    assert all(len(signatures[name]) == len(rows) for name, rows in splits.items())  # no repeats within a split
    assert not signatures["train"] & (signatures["one_step"] | signatures["two_step"])
    assert not signatures["one_step"] & signatures["two_step"]
    assert not {e.signature for e in EXAMPLES} & set().union(*signatures.values())  # the prompt's examples
    again = build_problem_splits()
    assert [p.question() for p in again["two_step"]] == [p.question() for p in splits["two_step"]]
    assert [p.question() for p in build_problem_splits(1)["one_step"]] != [p.question() for p in splits["one_step"]]


def test_demonstrations_end_with_the_parsable_answer_and_the_reward_reads_it():
    problem = Problem(("+", "-"), (7, 5, 3), "Tom", "He", "apples", (0, 1))
    assert problem.question() == "Tom has 7 apples. He buys 5 more, then he loses 3. How many apples does Tom have now?"
    assert problem.demonstration() == (
        "Tom starts with 7 apples.\nHe buys 5 more: 7 + 5 = 12.\nThen he loses 3: 12 - 3 = 9.\nThe answer is 9."
    )
    for p in [p for rows in build_problem_splits(0, 40, 20, 20).values() for p in rows]:
        demonstration = p.demonstration()
        assert demonstration.endswith(f"The answer is {p.answer}.")
        assert word_problem_reward([demonstration], [str(p.answer)]) == [1.0]
        assert word_problem_reward([demonstration.replace(f"is {p.answer}.", f"is {p.answer + 1}.")],
                                   [str(p.answer)]) == [0.0]  # fmt: skip
    # conversational completions, formats, the first answer counts, no answer is wrong
    assert word_problem_reward([[{"role": "assistant", "content": "So the answer is: 1,200."}]], ["1200"]) == [1.0]
    assert word_problem_reward(["The answer is 12. The answer is 13."], ["13"]) == [0.0]
    assert word_problem_reward(["12", "The Answer Is $12.0", "answer is twelve"], ["12"] * 3) == [0.0, 1.0, 0.0]
    assert extract_answer("no number here") is None and extract_answer("the answer is -3.") == -3.0
    assert abs(binomial_se(0.2, 300) - 0.0231) < 1e-4 and binomial_se(0.0, 10) == 0.0


def test_paired_difference_and_its_error():
    # differences +1, +1, 0, 0: mean 0.5, sample variance 1/3, SE sqrt(1/12)
    difference, se = paired_difference("1100", "0000")
    assert difference == 0.5 and abs(se - (1 / 12) ** 0.5) < 1e-12
    assert paired_difference("0110", "0110") == (0.0, 0.0)  # the same answers: no difference, no noise
    assert paired_difference("01", "10")[0] == 0.0 and paired_difference("01", "10")[1] > 0
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference("01", "011")


def test_rows_hold_a_two_shot_chat_prompt_and_the_demonstration():
    splits = build_splits(0, 8, 4, 4)
    row = splits["two_step"][0]
    messages = row["prompt"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[2]["content"].endswith("The answer is 15.") and messages[4]["content"].endswith("The answer is 17.")
    assert messages[-1]["content"] == row["question"] and row["steps"] == 2
    assert row["completion"][0]["role"] == "assistant"
    assert row["completion"][0]["content"].endswith(f"The answer is {row['solution']}.")
    assert prompt_messages(EXAMPLES[0])[:-1] == messages[:-1]  # the same instruction and examples for every problem
    assert splits["train"]["steps"].count(1) == 4


@pytest.mark.slow
def test_smoke_run_writes_results_and_resumes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, str(ROOT / "benchmarks" / "learning_smollm2.py"), "--smoke", "--model", "tiny", "--output-dir",
        str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--tag", "smoke", "--pause-file", "",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert "[hpt seed 0] step 2/2" in completed.stdout
    assert "[sft_then_grpo seed 0 stage 2 (grpo)] step 1/1" in completed.stdout
    result = json.loads((tmp_path / "out" / "learning_smollm2_smoke.json").read_text())
    assert {"command", "commit", "versions", "commands", "settings", "model", "runs"} <= set(result)
    runs = {r["key"]: r for r in result["runs"]}
    assert set(runs) == {"base", "hpt|lr=2e-05|seed=0|steps=2", "sft_then_grpo|lr=2e-05+2e-05|seed=0|steps=2"}
    for run in runs.values():
        for name in ("one_step", "two_step", "all"):
            m = run["metrics"][name]
            assert m["n"] == (16 if name == "all" else 8) and 0.0 <= m["accuracy"] <= 1.0 and m["se"] >= 0.0
        assert run["peak_rss_mb"] > 0 and run["eval_seconds"] >= 0
    for key in ("hpt|lr=2e-05|seed=0|steps=2", "sft_then_grpo|lr=2e-05+2e-05|seed=0|steps=2"):
        run = runs[key]
        assert len(run["curves"]["reward"]) == 2 and len(run["curves"]["step_seconds"]) == 2
        assert len(run["curves"]["sft_fraction"]) == 2 and run["train_seconds"] > 0
        check = run["plumbing_check"]
        assert check["identical"] and check["same_prompt_tokens"] and check["prompts"] == 4
    assert [s["algorithm"] for s in runs["sft_then_grpo|lr=2e-05+2e-05|seed=0|steps=2"]["stages"]] == ["sft", "grpo"]
    table = (tmp_path / "out" / "learning_smollm2_smoke.md").read_text()
    assert "| HPT (gamma 0) | 0 |" in table and "| SFT→GRPO | 0 |" in table and "PARTIAL" not in table

    # Resumed: every run is found in the JSON and skipped
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming: 3 finished runs" in again.stdout and "Run " not in again.stdout
    assert len(json.loads((tmp_path / "out" / "learning_smollm2_smoke.json").read_text())["commands"]) == 2

    # Another table (tag) made with the same settings, merged in: its runs are reused, nothing is re-run
    merged = subprocess.run(
        [*command[:-3], "merged", "--pause-file", "", "--merge", str(tmp_path / "out" / "learning_smollm2_smoke.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "Merged from" in merged.stdout and "Run " not in merged.stdout
    assert {
        r["key"] for r in json.loads((tmp_path / "out" / "learning_smollm2_merged.json").read_text())["runs"]
    } == set(runs)

    # --table-only: a second seed is asked for but not run; the table says so, the stored commands are unchanged
    table_only = subprocess.run([*command, "--seeds", "0", "1", "--table-only"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600, check=False)  # fmt: skip
    assert table_only.returncode == 0, table_only.stderr[-3000:]
    assert "Run " not in table_only.stdout and "| HPT (gamma 0) | 1 | (not run yet)" in table_only.stdout
    stored = json.loads((tmp_path / "out" / "learning_smollm2_smoke.json").read_text())
    assert len(stored["commands"]) == 2 and {r["key"] for r in stored["runs"]} == set(runs)
    assert "PARTIAL" in (tmp_path / "out" / "learning_smollm2_smoke.md").read_text()

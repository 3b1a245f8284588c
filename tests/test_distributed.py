"""HPT under the launchers users already use: DDP, DeepSpeed ZeRO-2/3 (and ZeRO-3 with CPU offload), FSDP1 and FSDP2,
2 CPU processes each (FSDP through the test-only `tests/fsdp_on_cpu.py`: Accelerate runs FSDP only on accelerators).

Each test launches `accelerate launch --config_file examples/accelerate_configs/NAME.yaml --num_processes 2` on the
tiny CPU recipe (two CPU processes, gloo backend; see docs/scaling.md) through `tests/distributed_worker.py`, and
compares it with a 1-process run on the same data, seed and global batch:

1. the per-step `hpt/sft_fraction` and the gate log (gathered prompt ids, performance, decisions) are equal;
2. training finishes;
3. the saved model reloads and generates.

The reward (`helpers.half_solved_reward`) depends only on the prompt, so the gate must agree exactly even though the
two processes sample other completions than the single process does. It also gives every RL rollout a zero advantage,
so the update is the SFT update on the gated demonstrations, which does not depend on the sampled completions either:
the trained parameters must then equal the 1-process ones up to float reduction order, which the tests check too.
Under ZeRO-3 and FSDP the demonstration forward pass must go through the sharded model. See docs/distributed.md.

The first DeepSpeed test builds DeepSpeed's CPU ops (about 1-2 minutes, cached in ~/.cache/torch_extensions).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import RESUME_TRAIN_OPTIONS, crash_after_checkpoint_2, free_port, subprocess_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
WORKER = str(REPO / "tests" / "distributed_worker.py")
MAX_STEPS = 3
COMMON = [
    "--config",
    "recipes/tiny_cpu.yaml",
    "--max_steps",
    str(MAX_STEPS),
    "--reward_funcs",
    "helpers.half_solved_reward",
    "--performance_reward",
    "half_solved_reward",
]
GLOBAL_BATCH = 16  # rollouts per step: 8 prompts x 2 rollouts, = per_device_train_batch_size x processes


def run(output_dir, launcher=None, *options, launch_options=()):
    """Run the worker with 1 process (launcher None) or 2 under `accelerate launch` (with `launch_options`); return
    each rank's result."""
    output_dir = str(output_dir)
    if launcher is None:
        command = [sys.executable, WORKER, *COMMON, "--per_device_train_batch_size", str(GLOBAL_BATCH)]
        num_processes = 1
    else:
        num_processes = 2
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            f"examples/accelerate_configs/{launcher}.yaml",
            "--num_processes",
            str(num_processes),
            "--mixed_precision",
            "no",
            "--main_process_port",
            str(free_port()),
            *launch_options,
            WORKER,
            *COMMON,
            "--per_device_train_batch_size",
            str(GLOBAL_BATCH // num_processes),
        ]
    command += ["--output_dir", output_dir, *options]
    process = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    Path(output_dir, "launch.log").write_text(f"{' '.join(command)}\n{process.stdout}\n{process.stderr}")
    assert process.returncode == 0, f"{' '.join(command)}\n{process.stdout[-3000:]}\n{process.stderr[-6000:]}"
    return [json.loads(Path(output_dir, f"worker_rank{rank}.json").read_text()) for rank in range(num_processes)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run: same data, seed and global batch."""
    output_dir = tmp_path_factory.mktemp("one-process")
    (result,) = run(output_dir)
    assert result["num_processes"] == 1 and result["global_step"] == MAX_STEPS
    fractions = result["sft_fraction"]
    assert len(fractions) == MAX_STEPS and any(0.0 < f < 1.0 for f in fractions), "the gate must split some batch"
    return result, output_dir


def assert_same_gate(results, reference_result, reference_dir, output_dir):
    for result in results:  # every process logged the same, global, decisions
        assert result["num_processes"] == 2 and result["backend"] == "gloo"
        assert result["global_step"] == MAX_STEPS  # training finished
        assert result["sft_fraction"] == reference_result["sft_fraction"]
        assert result["gate_history"] == reference_result["gate_history"]
    assert (output_dir / "hpt_gate.jsonl").read_text() == (reference_dir / "hpt_gate.jsonl").read_text()


def assert_reloads_and_generates(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(["1+2+3="], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    return model


@pytest.mark.parametrize(
    "launcher, distributed_type, zero_stage",
    [
        ("ddp", "DistributedType.MULTI_CPU", None),  # MULTI_GPU config, run on CPU: DDP over gloo
        ("zero2", "DistributedType.DEEPSPEED", 2),
        ("zero3", "DistributedType.DEEPSPEED", 3),
        ("zero3_offload", "DistributedType.DEEPSPEED", 3),
    ],
)
def test_two_processes_match_one(reference, tmp_path, launcher, distributed_type, zero_stage):
    reference_result, reference_dir = reference
    results = run(tmp_path, launcher)
    assert_same_gate(results, reference_result, reference_dir, tmp_path)
    for result in results:
        assert result["distributed_type"] == distributed_type and result["deepspeed_zero_stage"] == zero_stage
        calls = result["demonstration_calls"]
        assert len(calls) == MAX_STEPS  # every process runs the demonstration pass at every step
        for call in calls:
            assert call["is_wrapped"], call  # through the DDP module or the DeepSpeed engine, not the bare model
            assert call["module"] == ("DistributedDataParallel" if launcher == "ddp" else "DeepSpeedEngine")
            if zero_stage == 3:  # sharded before the pass, gathered by the engine during it
                assert call["zero3_param"] and call["numel_before"] == 0, call
                assert call["numels_during"] and all(n == call["full_numel"] for n in call["numels_during"]), call

    model = assert_reloads_and_generates(tmp_path)
    expected = load_file(reference_dir / "model.safetensors")
    initial = load_file(reference_dir / "tiny-init" / "model.safetensors")
    state = model.state_dict()
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "the run must train"
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-5, rtol=0, msg=name)


# FSDP on CPU processes (tests/fsdp_on_cpu.py: Accelerate would otherwise run DDP), with what FSDP1 needs on CPU
FSDP_LAUNCH_OPTIONS = {
    "fsdp1": ["--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"],
    "fsdp2": [],
}
FSDP_MODULE = {"fsdp1": "FullyShardedDataParallel", "fsdp2": "FSDPLlamaForCausalLM"}  # FSDP2 shards in place


@pytest.fixture(scope="module", params=["fsdp2", "fsdp1"])
def fsdp(request, tmp_path_factory):
    """examples/accelerate_configs/fsdp{1,2}.yaml on 2 CPU processes, `MAX_STEPS` steps with a checkpoint at step 2;
    then the same run resumed from a copy of checkpoint-2 and its gate log (as if it had crashed after it)."""
    launcher = request.param
    output_dir = tmp_path_factory.mktemp(launcher)
    checkpoints = ["--save_strategy", "steps", "--save_steps", "2"]
    results = run(output_dir, launcher, "--fsdp_on_cpu", *checkpoints, launch_options=FSDP_LAUNCH_OPTIONS[launcher])
    resumed_dir = tmp_path_factory.mktemp(f"{launcher}-resumed")
    shutil.copytree(output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    shutil.copy(output_dir / "hpt_gate.jsonl", resumed_dir / "hpt_gate.jsonl")
    resumed = run(
        resumed_dir,
        launcher,
        "--fsdp_on_cpu",
        *checkpoints,
        "--resume_from_checkpoint",
        "true",
        launch_options=FSDP_LAUNCH_OPTIONS[launcher],
    )
    return launcher, results, output_dir, resumed, resumed_dir


def test_two_cpu_processes_under_fsdp_match_one(reference, fsdp):
    """FSDP1 and FSDP2, 2 CPU processes: the parameters are sharded, the demonstration forward pass goes through the
    sharded model, and the gate decisions, `hpt/sft_fraction`, gate log and trained parameters equal the 1-process
    run's. With `half_solved_reward` every rollout has a zero advantage, so every step trains the demonstrations only:
    equal parameters mean the demonstrations' gradients went through FSDP's gathered layers and sharded optimizer."""
    launcher, results, output_dir, _, _ = fsdp
    reference_result, reference_dir = reference
    assert_same_gate(results, reference_result, reference_dir, output_dir)
    expected = load_file(reference_dir / "model.safetensors")
    layer_numel = sum(t.numel() for k, t in expected.items() if k.startswith("model.layers.0."))
    for result in results:
        assert result["distributed_type"] == "DistributedType.FSDP", "Accelerate fell back to DDP"
        assert result["fsdp_version"] == int(launcher[-1]) and result["is_fsdp_enabled"]
        calls = result["demonstration_calls"]
        assert len(calls) == MAX_STEPS  # every process runs the demonstration pass at every step
        for call in calls:
            assert call["module"] == FSDP_MODULE[launcher], call
            # the first decoder layer: a shard on this process before the pass, gathered whole during it
            assert 0 < call["layer_numel_before"] < layer_numel, call
            assert call["layer_numels_during"] == [layer_numel], call
            if launcher == "fsdp2":  # parameters are DTensor shards, plain tensors while gathered
                assert all(call["layer_dtensor"]) and not any(call["layer_dtensor_during"][0]), call
        if launcher == "fsdp2":
            assert result["all_dtensor_after_training"]
    assert sum(r["demonstration_calls"][0]["layer_numel_before"] for r in results) >= layer_numel

    model = assert_reloads_and_generates(output_dir)
    initial = load_file(reference_dir / "tiny-init" / "model.safetensors")
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "the run must train"
    state = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_resume_under_fsdp_is_exact(fsdp):
    """FSDP1 and FSDP2, 2 CPU processes, resumed from checkpoint-2 (a full state dict of the model and the sharded
    optimizer): the same gate log and the same final parameters as the uninterrupted run."""
    _, results, output_dir, resumed, resumed_dir = fsdp
    assert all(r["global_step"] == MAX_STEPS and r["distributed_type"] == "DistributedType.FSDP" for r in resumed)
    assert len(resumed[0]["demonstration_calls"]) == MAX_STEPS - 2  # only the steps after the checkpoint ran
    assert (resumed_dir / "hpt_gate.jsonl").read_text() == (output_dir / "hpt_gate.jsonl").read_text()
    uninterrupted = load_file(output_dir / "model.safetensors")
    state = load_file(resumed_dir / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_placeholder_and_zero_loss_passes_under_fsdp2_match_ddp(tmp_path):
    """FSDP2 and DDP, 2 CPU processes, `helpers.rank0_unsolved_reward`: process 0 holds only SFT prompts (no rollout
    with a non-zero advantage: it runs TRL's loss on zero-loss rows), process 1 one RL prompt and no demonstration (it
    runs the demonstration pass on a zero-weight placeholder row). FSDP2 needs both passes on both processes; the
    trained parameters equal the DDP run's, where the same rows are trained."""
    options = ["--reward_funcs", "helpers.rank0_unsolved_reward", "--performance_reward", "rank0_unsolved_reward"]
    ddp = run(tmp_path / "ddp", "ddp", *options)
    fsdp2 = run(tmp_path / "fsdp2", "fsdp2", "--fsdp_on_cpu", *options)
    for result in fsdp2:
        assert result["distributed_type"] == "DistributedType.FSDP" and result["all_dtensor_after_training"]
        assert result["sft_fraction"] == ddp[0]["sft_fraction"] == [0.5] * MAX_STEPS
        assert result["skipped_rows_fraction"] == ddp[0]["skipped_rows_fraction"]
        assert len(result["demonstration_calls"]) == MAX_STEPS  # on process 1, placeholder passes
    half = GLOBAL_BATCH // 2 // 2  # prompts per process
    for record in fsdp2[1]["gate_history"]:  # process 1's prompts are all on RL: it has no demonstration
        assert all(record["gated"][:half]) and not any(record["gated"][half:])
    expected = load_file(tmp_path / "ddp" / "model.safetensors")
    initial = load_file(tmp_path / "ddp" / "tiny-init" / "model.safetensors")
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "the run must train"
    state = load_file(tmp_path / "fsdp2" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_lora_under_ddp(reference, tmp_path):
    from peft import AutoPeftModelForCausalLM

    reference_result, reference_dir = reference
    lora = [
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--learning_rate",
        "5e-2",
        "--merge_adapter",
    ]
    results = run(tmp_path, "ddp", *lora)
    assert_same_gate(results, reference_result, reference_dir, tmp_path)
    assert all(result["distributed_type"] == "DistributedType.MULTI_CPU" for result in results)

    # The saved adapter reloads on its base model, was trained, and generates
    assert (tmp_path / "adapter_config.json").is_file() and not (tmp_path / "model.safetensors").exists()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    inputs = tokenizer(["1+2+3="], return_tensors="pt")
    assert peft_model.generate(**inputs, max_new_tokens=6, do_sample=False).shape[1] > inputs["input_ids"].shape[1]

    # The merged model is a plain model with the same outputs
    merged = assert_reloads_and_generates(tmp_path / "merged").eval()
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, peft_model(**inputs).logits, atol=1e-5, rtol=1e-5)


def train_under_ddp(options, *extra):
    """`hpt-trl train OPTIONS EXTRA` in 2 CPU processes under `ddp.yaml` (tests/ importable, for rewards by name)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "examples/accelerate_configs/ddp.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "hpt_trl.cli",
        "train",
        *options,
        *extra,
    ]
    process = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, f"{process.stdout[-3000:]}\n{process.stderr[-6000:]}"


def test_resume_under_ddp(tmp_path):
    """2 processes, interrupted after checkpoint-2 and resumed at an epoch boundary: same as uninterrupted."""
    options = [
        *RESUME_TRAIN_OPTIONS,
        "--per_device_train_batch_size",
        "8",
        "--dataset_limit",
        "16",  # 8 prompts per step: 2 steps per epoch
        "--reward_funcs",
        "helpers.mixed_reward",
        "--output_dir",
        str(tmp_path),
    ]

    train_under_ddp(options)
    uninterrupted = load_file(tmp_path / "model.safetensors")
    gate_log = crash_after_checkpoint_2(tmp_path)  # then resume from the last checkpoint
    assert len(gate_log) == 4
    train_under_ddp(options, "--resume_from_checkpoint", "true")
    assert (tmp_path / "hpt_gate.jsonl").read_text().splitlines() == gate_log
    resumed = load_file(tmp_path / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_skipping_zero_loss_rows_under_ddp_keeps_the_update(tmp_path):
    """2 processes that keep different numbers of non-zero-loss rows (helpers.rank_skewed_reward): skipping is on by
    default, and the trained parameters equal those of the same 2-process run without skipping."""
    options = ["--reward_funcs", "helpers.rank_skewed_reward", "--performance_reward", "rank_skewed_reward"]
    full = run(tmp_path / "full", "ddp", *options, "--skip_zero_loss_rows", "false")
    skipped = run(tmp_path / "skip", "ddp", *options)
    assert all(not r["skip_zero_loss_rows"] for r in full) and all(r["skip_zero_loss_rows"] for r in skipped)
    # process 0 keeps 4 of 8 rows, process 1 keeps 2 and runs 2 zero-loss rows more, so both run 4
    assert skipped[0]["skipped_rows_fraction"] == [0.5] * MAX_STEPS
    assert skipped[0]["sft_fraction"] == full[0]["sft_fraction"]
    expected = load_file(tmp_path / "full" / "model.safetensors")
    initial = load_file(tmp_path / "full" / "tiny-init" / "model.safetensors")
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "the run must train"
    state = load_file(tmp_path / "skip" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=1e-5, msg=name)

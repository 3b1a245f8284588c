"""Several optimizer steps per generation batch (`steps_per_generation > gradient_accumulation_steps`, or
`num_iterations > 1`): what each optimizer step trains, against a hand-computed update, and an exact resume from a
checkpoint written inside a generation buffer."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl.trainer.grpo_trainer as grpo_trainer_module
from helpers import addition_dataset, is_always_solved, tiny_args
from safetensors.torch import load_file
from test_modes import run_and_capture
from transformers import TrainerCallback

from hpt_trl import HPTTrainer
from hpt_trl.demonstrations import demonstration_token_ids
from hpt_trl.generation_buffer import generation_buffer_path, load_generation_buffer, save_generation_buffer
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer

# 1. What each optimizer step trains

# TRL shuffles the generation batch's rows before splitting it into `steps_per_generation` slices. The tests fix the
# shuffle to this permutation (slice i holds rows PERMUTATION[i*B:(i+1)*B] of the batch as generated), so that the
# hand-computed update knows which rows each step trains: the rollouts of every prompt are split across slices, and
# with B=4 the first rollout of prompts 1 and 3 (rows 2, 6) land in slice 0, that of prompts 0 and 2 (rows 0, 4) in
# slice 1.
PERMUTATION = [1, 2, 5, 6, 0, 3, 4, 7]
EPSILON = 0.2  # GRPOConfig's default clipping range


def fixed_shuffle(batch):
    """TRL 1.16's `shuffle_sequence_dict` with `PERMUTATION` instead of `torch.randperm`."""

    def permute(value):
        if value is None or (torch.is_tensor(value) and value.ndim == 0):
            return value
        return value[PERMUTATION] if torch.is_tensor(value) else [value[i] for i in PERMUTATION]

    return {key: permute(value) for key, value in batch.items()}


def alternating_reward(prompts, completions, **kwargs):
    """Odd-`a` prompts score 0 (gated at gamma=0); the rollouts of even-`a` prompts score 0.5 and 1 alternately (both
    succeed at success_threshold=0.5), so each of their rollouts has a non-zero advantage."""
    return [0.5 + 0.5 * (i % 2) if is_always_solved(p) else 0.0 for i, p in enumerate(prompts)]


class ParameterSnapshots(TrainerCallback):
    """The parameters after each optimizer step."""

    def __init__(self):
        self.snapshots = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshots.append([p.detach().clone() for p in model.parameters()])


def completion_logps(model, prompt_ids, completion_ids, completion_mask):
    """Per-token log-probabilities of `completion_ids` after `prompt_ids` (prompts of one length, right padding)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, prompt_ids.size(1) - 1 : -1]
    return logits.log_softmax(dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def hand_computed_steps(
    model, inputs, output, *, batch_size, accumulation, steps, lr, sft_loss_coef, demonstrations, max_completion_length
):
    """The parameters after each SGD step trained on one generation batch, computed from the batch alone.

    Micro-step m trains slice `m % (rows / batch_size)` of the batch. A prompt is gated when none of its rollouts
    succeeds (gamma=0): its rollouts leave the loss, and its demonstration is trained in the micro-batch that holds its
    first rollout's row. One optimizer step is the authors' balance summed over its micro-batches: `sum(Dr. GRPO
    per-token loss) / max_completion_length + sft_loss_coef * token-mean NLL of each demonstration`, divided by the
    rows of a step (TRL's constant, shared by both terms)."""
    n, slices, snapshots = 2, len(PERMUTATION) // batch_size, []
    with torch.no_grad():  # the old log-probabilities: the parameters when the batch is generated
        old_logps = completion_logps(model, output["prompt_ids"], output["completion_ids"], output["completion_mask"])
    for step in range(steps):
        model.zero_grad()
        for micro_step in range(step * accumulation, (step + 1) * accumulation):
            rows = PERMUTATION[(micro_step % slices) * batch_size :][:batch_size]
            gated = [not is_always_solved(inputs[row]["prompt"]) for row in rows]
            rl_rows = torch.tensor([row for row, g in zip(rows, gated) if not g], dtype=torch.long)
            mask = output["completion_mask"][rl_rows]
            logps = completion_logps(model, output["prompt_ids"][rl_rows], output["completion_ids"][rl_rows], mask)
            ratio = torch.exp(logps - old_logps[rl_rows])
            advantages = output["advantages"][rl_rows].unsqueeze(1)
            per_token = -torch.min(ratio * advantages, ratio.clamp(1 - EPSILON, 1 + EPSILON) * advantages)
            loss = (per_token * mask).sum() / max_completion_length
            for row, g in zip(rows, gated):
                if g and row % n == 0:  # the prompt's demonstration, with its first rollout
                    demo = torch.tensor([demonstrations[inputs[row]["prompt"]]])
                    nll = -completion_logps(model, output["prompt_ids"][row : row + 1], demo, torch.ones_like(demo))
                    loss = loss + sft_loss_coef * nll.mean()
            (loss / (batch_size * accumulation)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots


@pytest.mark.parametrize(
    "batch_size, accumulation, steps_per_generation, iterations, steps, gate_steps",
    [
        (4, 1, 2, 1, 4, [0, 2]),  # 2 optimizer steps per generation batch (the authors' ppo_mini_batch_size)
        (8, 1, 1, 2, 4, [0, 2]),  # each generation batch trained twice (num_iterations=2)
        (2, 2, 4, 1, 2, [0]),  # 2 optimizer steps of 2 accumulated micro-batches each
        (4, 1, 2, 2, 4, [0]),  # 2 steps per batch, 2 passes: 4 optimizer steps on one batch
    ],
    ids=["steps_per_generation", "num_iterations", "accumulation", "both"],
)
def test_several_steps_per_generation_match_a_hand_computed_update(
    tmp_path, monkeypatch, batch_size, accumulation, steps_per_generation, iterations, steps, gate_steps
):
    monkeypatch.setattr(grpo_trainer_module, "shuffle_sequence_dict", fixed_shuffle)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).double()
    lr, sft_loss_coef = 0.5, 0.7
    args = tiny_args(
        tmp_path,
        gamma=0.0,
        optim="sgd",
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        sft_loss_coef=sft_loss_coef,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=steps_per_generation,
        num_iterations=iterations,
        max_steps=steps,
    )
    dataset = addition_dataset(size=4)
    trainer = HPTTrainer(
        model=model, reward_funcs=alternating_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    oracle_model = build_tiny_model(tokenizer).double()
    oracle_model.load_state_dict(model.state_dict())
    snapshots = ParameterSnapshots()
    trainer.add_callback(snapshots)
    batches = run_and_capture(trainer)

    # The gate is decided once per generation batch, at the step that generates it
    assert [record["step"] for record in trainer.gate_history] == gate_steps
    assert len(batches) == len(gate_steps)
    # Both terms train: gated prompts (SFT) and rollouts with a non-zero advantage (RL)
    assert all(any(record["gated"]) and not all(record["gated"]) for record in trainer.gate_history)
    for inputs, output in batches:
        solved = torch.tensor([is_always_solved(example["prompt"]) for example in inputs])
        assert output["advantages"][solved].abs().min() > 0

    demonstrations = {
        row["prompt"]: demonstration_token_ids(row["prompt"], row["completion"], tokenizer, trainer.eos_token_ids)
        for row in dataset
    }
    expected = []
    for inputs, output in batches:
        assert output["prompt_mask"].all()  # prompts of one length: no padding to handle
        expected += hand_computed_steps(
            oracle_model,
            inputs,
            output,
            batch_size=batch_size,
            accumulation=accumulation,
            steps=steps_per_generation * iterations // accumulation,
            lr=lr,
            sft_loss_coef=sft_loss_coef,
            demonstrations=demonstrations,
            max_completion_length=args.max_completion_length,
        )
    assert len(snapshots.snapshots) == len(expected) == steps
    # float64 model; TRL's log-probabilities pass through float32 (differences ~2e-8, an update is ~0.1)
    for step, (actual, oracle) in enumerate(zip(snapshots.snapshots, expected)):
        for p, q in zip(actual, oracle):
            torch.testing.assert_close(p, q, atol=2e-7, rtol=1e-6, msg=f"optimizer step {step}")


# 2. Resume inside a generation buffer

# `hpt-trl train` options: 6 steps of the tiny recipe, a checkpoint after step 3, i.e. inside the generation batch of
# steps 2 and 3 (generations at steps 0, 2 and 4)
BUFFER_RESUME_OPTIONS = [
    "--config",
    "recipes/tiny_cpu.yaml",
    "--max_steps",
    "6",
    "--save_strategy",
    "steps",
    "--save_steps",
    "3",
    "--lr_scheduler_type",
    "linear",
    "--reward_funcs",
    "killing_reward.reward",
]
TIMING_KEYS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _train(output_dir, *extra, kill_at=None):
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    env.pop("HPT_KILL_AT_CALL", None)
    if kill_at is not None:
        env["HPT_KILL_AT_CALL"] = str(kill_at)
    command = [sys.executable, "-m", "hpt_trl.cli", "train", *BUFFER_RESUME_OPTIONS, "--output_dir", str(output_dir)]
    return subprocess.run(
        [*command, *extra], env=env, cwd=tests_dir.parent, capture_output=True, text=True, timeout=600
    )


def _log_history(output_dir):
    """Per-step logs of `checkpoint-6` (the resumed run's state carries the logs of steps before its checkpoint)."""
    history = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    return [{key: value for key, value in entry.items() if key not in TIMING_KEYS} for entry in history]


def test_generation_buffer_round_trip_and_fallbacks(tmp_path, caplog):
    buffer = [{"completion_ids": torch.arange(6).view(2, 3), "num_items_in_batch": torch.tensor(5), "images": None}] * 2
    save_generation_buffer(str(tmp_path), 1, 2, step=7, generate_every=4, buffered_inputs=buffer)
    step, restored = load_generation_buffer(str(tmp_path), 1, 2, generate_every=4, device="cpu")
    assert step == 7 and len(restored) == 2 and restored[1]["images"] is None
    assert torch.equal(restored[0]["completion_ids"], buffer[0]["completion_ids"])
    assert restored[0]["num_items_in_batch"].item() == 5

    # At a generation boundary the next micro-step generates: only the counter is kept
    save_generation_buffer(str(tmp_path), 0, 2, step=8, generate_every=4, buffered_inputs=buffer)
    assert load_generation_buffer(str(tmp_path), 0, 2, generate_every=4, device="cpu") == (8, None)

    # Another number of processes, other steps per batch, or no file: not used, TRL regenerates, and the user is told
    with caplog.at_level("WARNING", logger="hpt_trl.generation_buffer"):
        assert load_generation_buffer(str(tmp_path), 1, 1, generate_every=4, device="cpu") is None
        assert "written by 2 process(es)" in caplog.text and "not used" in caplog.text
        assert load_generation_buffer(str(tmp_path), 1, 2, generate_every=2, device="cpu") is None
        assert load_generation_buffer(str(tmp_path / "old"), 0, 1, generate_every=2, device="cpu") is None
        assert "has no generation buffer" in caplog.text
    assert generation_buffer_path("ckpt", 3) == os.path.join("ckpt", "hpt_generation_buffer-3.pt")


@pytest.mark.slow
@pytest.mark.parametrize(
    "buffer_options",
    [["--steps_per_generation", "2"], ["--num_iterations", "2"]],
    ids=["steps_per_generation", "num_iterations"],
)
def test_sigkill_inside_a_generation_buffer_then_resume_is_exact(tmp_path, buffer_options):
    """2 optimizer steps per generation batch, checkpoint-3 written between the 2 steps of the second batch, a real
    SIGKILL in the generation of step 4, then a resume: the remaining step 3 trains on the checkpoint's rollouts, the
    next generation is at step 4, and the gate log, the logged metrics and the model equal an uninterrupted run's."""
    reference = _train(tmp_path / "reference", *buffer_options)
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference_log = (tmp_path / "reference" / "hpt_gate.jsonl").read_text()
    assert [json.loads(line)["step"] for line in reference_log.splitlines()] == [0, 2, 4]

    killed = _train(tmp_path / "run", *buffer_options, kill_at=2)  # the third generation batch, step 4's
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_log = tmp_path / "run" / "hpt_gate.jsonl"
    assert [json.loads(line)["step"] for line in run_log.read_text().splitlines()] == [0, 2]
    assert (tmp_path / "run" / "checkpoint-3").is_dir() and not (tmp_path / "run" / "checkpoint-6").exists()

    resumed = _train(tmp_path / "run", *buffer_options, "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["step"] for line in run_log.read_text().splitlines()] == [0, 2, 4]
    assert run_log.read_text() == reference_log
    # Step 3 logs the loss of the buffered rollouts and no generation metrics, as in the uninterrupted run
    assert _log_history(tmp_path / "run") == _log_history(tmp_path / "reference")
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    actual = load_file(tmp_path / "run" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_resume_inside_a_generation_buffer_under_ddp(tmp_path):
    """2 processes, 2 optimizer steps per generation batch, resumed from checkpoint-3 (between the 2 steps of the
    batch generated at step 2): each process trains step 3 on its own part of the buffered batch, so the gate log and
    the model equal the uninterrupted run's."""
    from test_distributed import train_under_ddp

    options = [
        *BUFFER_RESUME_OPTIONS[:-2],  # the recipe's reward: no kill
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--steps_per_generation",
        "2",
        "--reward_funcs",
        "helpers.mixed_reward",
        "--output_dir",
        str(tmp_path),
    ]

    train_under_ddp(options)
    uninterrupted = load_file(tmp_path / "model.safetensors")
    gate_log = (tmp_path / "hpt_gate.jsonl").read_text()
    assert [json.loads(line)["step"] for line in gate_log.splitlines()] == [0, 2]
    (tmp_path / "model.safetensors").unlink()  # as if killed after checkpoint-3
    for later in tmp_path.glob("checkpoint-4"):
        shutil.rmtree(later)

    train_under_ddp(options, "--resume_from_checkpoint", "true")
    assert (tmp_path / "hpt_gate.jsonl").read_text() == gate_log  # step 3 generates nothing
    resumed = load_file(tmp_path / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)
    for rank in (0, 1):  # each process kept its part of the batch generated at step 2
        assert (tmp_path / "checkpoint-3" / f"hpt_generation_buffer-{rank}.pt").is_file()

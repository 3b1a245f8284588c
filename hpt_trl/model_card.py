"""The HPT part of the model card: the settings a model was trained with, added to TRL's card.

TRL writes the card (`README.md` in `output_dir`) in `create_model_card`, which `push_to_hub` and every checkpoint
save call; [`~hpt_trl.HPTTrainer`] sets its `hpt` tag and the paper's citation, and then calls [`add_hpt_settings`] to
insert an "HPT settings" section before the framework versions.
"""

from __future__ import annotations

import os
from typing import Any

SECTION_TITLE = "## HPT settings"
_SECTION_END = "<!-- end of HPT settings -->"

# (HPTConfig attribute, what it means), in the order of the card's table
SETTINGS = (
    ("algorithm", "training algorithm (hpt, or a baseline: sft, grpo, luffy, srft)"),
    ("gate", "HPT feedback function (switch or linear)"),
    ("gate_linear_upper", "upper threshold of the linear gate"),
    ("gamma_off", "middle band: gamma < P <= gamma_off drops the rollouts and trains the demonstration off-policy"),
    ("gamma", "gate threshold: a prompt with success rate P <= gamma is trained with SFT, otherwise with RL"),
    ("sft_loss_coef", "weight of a demonstration, in full-length rollouts with advantage 1"),
    ("performance_reward", "correctness reward defining success (None: the only one, or the known verifier)"),
    ("success_threshold", "a rollout succeeded when its correctness reward is >= this value (None: 1.0)"),
    ("demonstration_column", "dataset column of the demonstrations"),
    ("max_demonstration_length", "demonstration tokens kept (None: all)"),
    ("num_generations", "rollouts per prompt"),
    ("generation_batch_size", "rollouts per generation batch, all processes"),
    ("loss_type", "RL loss"),
    ("scale_rewards", "advantage scaling"),
    ("beta", "KL coefficient"),
    ("entropy_coef", "entropy bonus"),
    ("temperature", "sampling temperature"),
    ("max_completion_length", "maximum rollout length"),
    ("learning_rate", "learning rate"),
    ("lr_scheduler_type", "learning-rate schedule"),
    ("max_steps", "optimizer steps (-1: set by num_train_epochs)"),
    ("num_train_epochs", "epochs"),
    ("per_device_train_batch_size", "rollouts per device and micro-batch"),
    ("gradient_accumulation_steps", "micro-batches per optimizer step"),
    ("seed", "seed"),
    ("use_vllm", "rollouts generated with vLLM"),
)


def _value(value: Any) -> str:
    if hasattr(value, "value"):  # enums such as lr_scheduler_type
        value = value.value
    return f"`{value}`"


def hpt_settings(args, reward_func_names: list[str] | None = None) -> dict[str, Any]:
    """The HPT settings of `args` (an [`~hpt_trl.HPTConfig`]) as a dict, plus the reward functions' names."""
    settings = {name: getattr(args, name) for name, _ in SETTINGS if hasattr(args, name)}
    if settings.get("gate") != "linear":
        settings.pop("gate_linear_upper", None)
    if settings.get("max_steps", -1) > 0:
        settings.pop("num_train_epochs", None)
    if settings.get("gamma_off") is None:
        settings.pop("gamma_off", None)
    if settings.get("use_vllm"):
        settings["vllm_mode"] = getattr(args, "vllm_mode", None)
    if reward_func_names is not None:
        settings["reward_funcs"] = list(reward_func_names)
    return settings


def hpt_settings_section(args, reward_func_names: list[str] | None = None) -> str:
    """The markdown section of the card: what HPT does, then a table of the settings used."""
    settings = hpt_settings(args, reward_func_names)
    help_text = dict(SETTINGS) | {"vllm_mode": "vLLM mode", "reward_funcs": "reward functions"}
    algorithm = settings.get("algorithm", "hpt")
    baseline = "" if algorithm == "hpt" else f"This run used the `{algorithm}` baseline instead of HPT's gate. "
    rows = "\n".join(f"| `{name}` | {_value(value)} | {help_text[name]} |" for name, value in settings.items())
    return (
        f"{SECTION_TITLE}\n\n"
        "For each prompt, Hybrid Post-Training (HPT) samples `num_generations` rollouts, scores them, and computes "
        "the prompt's performance P (the mean reward of its rollouts). A prompt with `P <= gamma` is trained with "
        "supervised fine-tuning on its demonstration, every other prompt with the RL loss on its rollouts. "
        f"{baseline}The settings used:\n\n"
        "| setting | value | meaning |\n| --- | --- | --- |\n"
        f"{rows}\n{_SECTION_END}\n\n"
    )


def add_hpt_settings(readme_path: str | os.PathLike, args, reward_func_names: list[str] | None = None) -> None:
    """Insert (or replace) the HPT settings section in the model card at `readme_path`.

    The section goes before TRL's "Framework versions" heading (or "Citations", or at the end). Calling it again
    replaces the section, so repeated checkpoint saves keep one copy.
    """
    if not os.path.isfile(readme_path):
        return
    with open(readme_path, encoding="utf-8") as f:
        text = f.read()
    start = text.find(SECTION_TITLE)
    if start >= 0:
        end = text.find(_SECTION_END, start)
        end = len(text) if end < 0 else end + len(_SECTION_END)
        text = text[:start] + text[end:].lstrip("\n")
    section = hpt_settings_section(args, reward_func_names)
    for anchor in ("### Framework versions", "## Citations"):
        position = text.find(anchor)
        if position >= 0:
            text = text[:position] + section + text[position:]
            break
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(text)

"""TRL's generation buffer in a checkpoint, so that a resume inside a generation batch is exact.

With several optimizer steps per generation batch (`steps_per_generation > gradient_accumulation_steps`, or
`num_iterations > 1`), TRL 1.16's `GRPOTrainer._prepare_inputs` generates once, keeps the shuffled and split batch in
`_buffered_inputs`, and trains the next micro-steps on its slices, counting micro-steps in `_step`. Neither is in the
Trainer's checkpoint: a run resumed from a checkpoint written between two steps of one generation batch starts with
`_step = 0` and no buffer, so it generates new rollouts at the checkpoint's step (a new gate decision, other rollouts,
other weights) and from then on generates at other steps than an uninterrupted run.

Each process writes its `_step` and, when the checkpoint falls inside a generation batch, its buffer to
`CHECKPOINT/hpt_generation_buffer-{process_index}.pt`; a resume restores both, so the remaining steps of the batch
train on the same rollouts (the Trainer restores the RNG states and skips the dataloader's consumed batches, which
TRL's sampler repeats once per micro-step of a generation batch).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

GENERATION_BUFFER_NAME = "hpt_generation_buffer-{process_index}.pt"


def generation_buffer_path(checkpoint_dir: str, process_index: int) -> str:
    """The file holding process `process_index`'s generation buffer in `checkpoint_dir`."""
    return os.path.join(checkpoint_dir, GENERATION_BUFFER_NAME.format(process_index=process_index))


def save_generation_buffer(
    checkpoint_dir: str,
    process_index: int,
    num_processes: int,
    step: int,
    generate_every: int,
    buffered_inputs: list[dict[str, Any]] | None,
) -> None:
    """
    Write TRL's micro-step counter and, inside a generation batch, its buffer (`None` at a generation boundary, where
    the next micro-step generates anyway).

    Args:
        checkpoint_dir (`str`):
            The checkpoint folder (`output_dir/checkpoint-N`).
        process_index (`int`), num_processes (`int`):
            This process and the number of processes.
        step (`int`):
            TRL's `_step`: micro-steps trained so far.
        generate_every (`int`):
            Micro-steps per generation batch (`steps_per_generation * num_iterations`).
        buffered_inputs (`list[dict]` or `None`):
            TRL's `_buffered_inputs`.
    """
    inside = step % generate_every != 0 and buffered_inputs is not None
    state = {
        "step": step,
        "generate_every": generate_every,
        "num_processes": num_processes,
        "buffered_inputs": _move(buffered_inputs, "cpu") if inside else None,
    }
    os.makedirs(checkpoint_dir, exist_ok=True)
    torch.save(state, generation_buffer_path(checkpoint_dir, process_index))


def load_generation_buffer(
    checkpoint_dir: str, process_index: int, num_processes: int, generate_every: int, device
) -> tuple[int, list[dict[str, Any]] | None] | None:
    """
    Read what [`save_generation_buffer`] wrote: `(step, buffered_inputs)` with the tensors on `device`, or `None` (with
    a warning) where the checkpoint has no usable buffer for this run: written before this file existed, with another
    number of processes, or with another `steps_per_generation * num_iterations`. A run given `None` keeps TRL's own
    behaviour (regenerate at the checkpoint's step), which is exact only at a generation boundary.
    """
    path = generation_buffer_path(checkpoint_dir, process_index)
    if not os.path.exists(path):
        if generate_every > 1:
            logger.warning(
                f"The checkpoint {checkpoint_dir} has no generation buffer ({os.path.basename(path)}): if it was "
                "written inside a generation batch, the resumed run generates new rollouts at its step and does not "
                "repeat the uninterrupted run."
            )
        return None
    # loaded on the CPU, then moved: `map_location` refuses devices such as DDP-on-CPU's `cpu:0`
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = (state["num_processes"], state["generate_every"])
    if saved != (num_processes, generate_every):
        inside = state["buffered_inputs"] is not None
        logger.warning(
            f"The generation buffer of {checkpoint_dir} was written by {saved[0]} process(es) with "
            f"steps_per_generation * num_iterations = {saved[1]}; this run has {num_processes} and {generate_every}"
            + (": it is not used, and the run generates new rollouts at the checkpoint's step." if inside else ".")
        )
        return None
    return state["step"], _move(state["buffered_inputs"], device)


def _move(value, device):
    """`value` (tensors in dicts, lists and tuples) with its tensors on `device`."""
    if torch.is_tensor(value):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {key: _move(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(item, device) for item in value)
    return value

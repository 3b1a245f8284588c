"""Checks of the training data against what TRL's generation and the reward functions will need, run at construction
before the model loads, so that a bad row or a missing column is named instead of failing at step 1 (inside `generate`
or a reward function)."""

from __future__ import annotations

import inspect

from datasets import Dataset, IterableDataset
from trl.data_utils import is_conversational
from trl.trainer.utils import get_callable_name

PROMPT_COLUMN = "prompt"
# Arguments TRL 1.16 passes to every reward function itself (`GRPOTrainer._calculate_rewards`); the others are
# dataset columns
TRAINER_REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                            "environments")  # fmt: skip
# Dataset columns TRL does not pass to the reward functions
COLUMNS_NOT_PASSED = ("prompt", "completion", "completion_ids")
IMAGE_COLUMNS = ("image", "images")
EXPECTED_PROMPT = (
    "a non-empty string (plain text) or a non-empty list of messages such as [{'role': 'user', 'content': '...'}] "
    "(conversational)"
)


def _conversational_only_rewards() -> tuple:
    """TRL's reward functions that read `completion[0]["content"]`, i.e. need conversational completions."""
    from trl.rewards import accuracy_reward, reasoning_accuracy_reward, think_format_reward

    return accuracy_reward, reasoning_accuracy_reward, think_format_reward


def _content_problem(content, has_image_column: bool) -> tuple[str | None, bool]:
    """`(why the content of a prompt message is not usable or None, whether it holds any text or image)`."""
    if isinstance(content, str):
        return None, bool(content.strip())
    if not isinstance(content, list):
        return f"has content of type {type(content).__name__}, expected a string or a list of content blocks", False
    has_content = False
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                return f"has a text part whose text is {part.get('text')!r:.40}", False
            has_content = has_content or bool(part["text"].strip())
        elif kind == "image":  # TRL reads `part["image"]`, which it fills from an `image`/`images` column
            has_content = True  # something to condition on
            if part.get("image") is None and not has_image_column:
                return (
                    "has an 'image' part with no image in it, and the dataset has no 'image' or 'images' column to "
                    "take it from: remove the part for a text-only model, or add the images as TRL expects"
                ), False
        else:
            return f"has a content part that is not a {{'type': 'text' or 'image', ...}} dict: {part!r:.80}", False
    return None, has_content


def describe_prompt_problem(prompt, has_image_column: bool = False) -> str | None:
    """Why `prompt` cannot be generated from (as it would fail inside `generate` or give the model no problem), or
    `None` if it is usable."""
    if prompt is None:
        return "is None"
    if isinstance(prompt, str):
        return "is an empty string" if not prompt.strip() else None
    if not isinstance(prompt, list):
        return f"is a {type(prompt).__name__}"
    if not prompt:
        return "is an empty list of messages"
    has_content = False
    for index, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"has a message that is not a {{'role': ..., 'content': ...}} dict: {message!r:.80}"
        problem, message_has_content = _content_problem(message["content"], has_image_column)
        if problem is not None:
            return f"its message {index} {problem}"
        has_content = has_content or message_has_content
    return None if has_content else "has no text in any of its messages"  # as empty as ""


def prompt_error(row, problem: str, split: str = "train") -> ValueError:
    return ValueError(
        f"Row {row} of the {split} dataset has an invalid prompt in column {PROMPT_COLUMN!r}: {problem}. Expected "
        f"{EXPECTED_PROMPT}."
    )


def _problem_phrase(problem: str) -> str:
    return problem if problem.startswith("its ") else f"it {problem}"


def reward_columns(reward_func) -> list[str]:
    """The dataset columns a reward function needs: its parameters without a default that TRL does not pass itself."""
    try:
        parameters = inspect.signature(reward_func).parameters.values()
    except (TypeError, ValueError):  # a builtin or a callable without a signature: nothing to check
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        p.name
        for p in parameters
        if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in TRAINER_REWARD_ARGUMENTS
    ]


def check_reward_inputs(columns, first_prompt, reward_funcs, split: str = "train") -> None:
    """Stop when a reward function needs a column the dataset lacks, or conversational completions that plain-text
    prompts will not give.

    Args:
        columns (`list[str]` or `None`):
            The dataset's columns (`None` for a stream whose columns are unknown: not checked).
        first_prompt:
            The first row's prompt (`None` when unknown): conversational prompts give conversational completions.
        reward_funcs (`list`):
            The reward functions; reward models (modules, or model ids as strings) are skipped.
    """
    conversational_only = _conversational_only_rewards()
    for func in reward_funcs:
        if isinstance(func, str) or not callable(func) or hasattr(func, "config"):
            continue
        name = get_callable_name(func)
        if columns is not None:
            passed = [c for c in columns if c not in COLUMNS_NOT_PASSED]
            for column in reward_columns(func):
                if column in COLUMNS_NOT_PASSED:
                    raise ValueError(
                        f"Reward function {name!r} has a required argument {column!r}, which TRL never passes to "
                        f"reward functions (it passes every column except {list(COLUMNS_NOT_PASSED)}): rename the "
                        "argument, or give it a default."
                    )
                if column not in passed:
                    raise ValueError(
                        f"Reward function {name!r} reads the column {column!r}, which the {split} dataset does not "
                        f"have: its columns are {list(columns)}. Add the column (for the math rewards: the gold "
                        "answer), or use a dataset schema that provides it (see `hpt_trl.data`)."
                    )
        plain = first_prompt is not None and not is_conversational({PROMPT_COLUMN: first_prompt})
        if plain and func in conversational_only:
            raise ValueError(
                f"Reward function {name!r} scores conversational completions (lists of messages), but the prompts of "
                f"the {split} dataset are plain text (row 0 of column {PROMPT_COLUMN!r}), so the completions will be "
                "strings. Use conversational prompts (`conversational: true` for the built-in datasets), or a reward "
                "that reads text, such as `math_accuracy_reward`."
            )


def check_training_data(
    dataset: Dataset | IterableDataset | None, reward_funcs, split: str = "train"
) -> Dataset | IterableDataset | None:
    """
    Check the prompts of `dataset` and that `reward_funcs` will find what they read, before the model loads.

    A map-style dataset is checked whole; a streaming dataset has its columns checked now (when known) and its prompts
    as they arrive, through a lazy `map` that raises the same error naming the row.

    Args:
        dataset ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `None`):
            The training data, with a `prompt` column.
        reward_funcs (`list` or a single reward):
            The reward functions (and models), as given to the trainer.
        split (`str`, *optional*, defaults to `"train"`):
            Name used in error messages.

    Returns:
        The dataset to train on: `dataset` itself, or for a streaming dataset the same stream with the check attached.

    Raises:
        `ValueError`: naming the row and column of a bad prompt, or the reward function and the column it reads.
    """
    if dataset is None:
        return None
    columns = dataset.column_names
    if columns is not None and PROMPT_COLUMN not in columns:
        raise ValueError(
            f"The {split} dataset has no {PROMPT_COLUMN!r} column: its columns are {list(columns)}. TRL samples the "
            f"rollouts from it: {EXPECTED_PROMPT}."
        )
    has_image_column = columns is not None and any(c in columns for c in IMAGE_COLUMNS)

    def check(prompt, row) -> None:
        problem = describe_prompt_problem(prompt, has_image_column)
        if problem is not None:
            raise prompt_error(row, _problem_phrase(problem), split)

    funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    first_prompt = None if isinstance(dataset, IterableDataset) or len(dataset) == 0 else dataset[0][PROMPT_COLUMN]
    dataset = check_rows(dataset, PROMPT_COLUMN, check)
    check_reward_inputs(columns, first_prompt, funcs, split)
    return dataset


def check_rows(dataset: Dataset | IterableDataset, column: str, check) -> Dataset | IterableDataset:
    """Call `check(value, row)` on every row's `column`: now for a map-style dataset, as the rows arrive for a stream
    (a lazy `map`, since a stream cannot be read ahead without consuming it). Returns the dataset to train on."""
    if isinstance(dataset, IterableDataset):

        def check_streamed_row(example, index):
            check(example.get(column), index)
            return example

        return dataset.map(check_streamed_row, with_indices=True)
    for row, value in enumerate(dataset[column]):
        check(value, row)
    return dataset

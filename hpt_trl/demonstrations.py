"""Demonstrations: validation at construction and tokenization in the same format as a rollout."""

from collections.abc import Sequence

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template, is_conversational


def _describe_demonstration_problem(demonstration) -> str | None:
    """Return why `demonstration` is not usable, or `None` if it is."""
    if demonstration is None:
        return "is None"
    if isinstance(demonstration, str):
        return "is an empty string" if not demonstration.strip() else None
    if isinstance(demonstration, list):
        if not demonstration:
            return "is an empty list of messages"
        for message in demonstration:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                return f"has a message that is not a {{'role': ..., 'content': ...}} dict: {message!r:.80}"
            if message["role"] != "assistant":
                return f"has a message with role {message['role']!r}; demonstration messages must be 'assistant'"
            content = message["content"]
            if isinstance(content, list):  # content blocks, e.g. [{"type": "text", "text": ...}]
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            if not isinstance(content, str) or not content.strip():
                return f"has an assistant message with empty or non-string content: {message['content']!r:.80}"
        return None
    return f"is a {type(demonstration).__name__}"


def validate_demonstrations(dataset: Dataset | IterableDataset | None, column: str, split: str = "train") -> None:
    """
    Check, before training, that every row of `dataset` has a usable demonstration in `column`.

    Args:
        dataset ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `None`):
            Dataset to check. Iterable datasets are only checked for the column's presence, as reading them would
            consume them.
        column (`str`):
            Name of the demonstration column.
        split (`str`, *optional*, defaults to `"train"`):
            Name used in error messages.

    Raises:
        `ValueError`: naming the column, the row and what is expected.
    """
    if dataset is None:
        return
    expected = (
        "a non-empty string (plain text) or a non-empty list of assistant messages such as "
        "[{'role': 'assistant', 'content': '...'}] (conversational)"
    )
    columns = dataset.column_names
    if columns is not None and column not in columns:
        raise ValueError(
            f"The {split} dataset has no demonstration column {column!r}. Its columns are {columns}. HPT trains a "
            f"prompt with SFT on its demonstration, so each row needs one: {expected}. Set "
            "`HPTConfig(demonstration_column=...)` to the column that holds it."
        )
    if isinstance(dataset, IterableDataset):
        return
    for row, demonstration in enumerate(dataset[column]):
        problem = _describe_demonstration_problem(demonstration)
        if problem is not None:
            raise ValueError(
                f"Row {row} of the {split} dataset has an invalid demonstration in column {column!r}: it {problem}. "
                f"Expected {expected}."
            )


def demonstration_token_ids(
    prompt: str | list[dict],
    demonstration: str | list[dict],
    processing_class: PreTrainedTokenizerBase,
    eos_token_ids: Sequence[int],
    max_length: int | None = None,
    **template_kwargs,
) -> list[int]:
    """
    Tokenize a demonstration as the completion of `prompt`, in the format a rollout has.

    Plain text gets the EOS token appended. A conversational demonstration is rendered with the chat template after the
    prompt's generation prompt, and cut right after the first stop token (the end-of-turn token generation stops on),
    so text the template adds after it, such as a newline, is not trained on.

    Args:
        prompt (`str` or `list[dict]`):
            The prompt, as in the dataset.
        demonstration (`str` or `list[dict]`):
            The demonstration, as in the dataset.
        processing_class ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer (for a processor, its `tokenizer`).
        eos_token_ids (`Sequence[int]`):
            Tokens that end a completion (the trainer's `eos_token_ids`); the first one is appended when the
            demonstration does not end with one.
        max_length (`int` or `None`, *optional*):
            Keep at most this many tokens.
        **template_kwargs:
            Passed to the chat template (e.g. `tools`, `chat_template`, `enable_thinking`).

    Returns:
        `list[int]`: demonstration token ids, without the prompt.
    """
    if is_conversational({"prompt": prompt}):
        if isinstance(demonstration, str):
            demonstration = [{"role": "assistant", "content": demonstration}]
        example = {"prompt": prompt, "completion": demonstration}
        text = apply_chat_template(example, processing_class, **template_kwargs)["completion"]
    else:
        text = demonstration if isinstance(demonstration, str) else demonstration[-1]["content"]
    ids = processing_class(text=text, add_special_tokens=False)["input_ids"]
    stops = [index for index, token in enumerate(ids) if token in eos_token_ids]
    ids = ids[: stops[0] + 1] if stops else ids + [eos_token_ids[0]]
    return ids[:max_length] if max_length is not None else ids

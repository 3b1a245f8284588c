"""Demonstrations: validation at construction and tokenization in the same format as a rollout."""

from collections.abc import Sequence

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template, is_conversational

from .dataset_checks import check_rows


def _describe_demonstration_problem(demonstration) -> str | None:
    """Return why `demonstration` is not usable, or `None` if it is."""
    if demonstration is None:
        return "is None"
    if isinstance(demonstration, str):
        return "is an empty string" if not demonstration.strip() else None
    if isinstance(demonstration, list):
        if not demonstration:
            return "is an empty list of messages"
        if len(demonstration) > 1:
            return (
                f"has {len(demonstration)} messages; a demonstration is one assistant message (the completion the "
                "model should generate after the prompt): join them into one"
            )
        for message in demonstration:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                return f"has a message that is not a {{'role': ..., 'content': ...}} dict: {message!r:.80}"
            if message["role"] != "assistant":
                return f"has a message with role {message['role']!r}; demonstration messages must be 'assistant'"
            other_parts = [
                part.get("type") if isinstance(part, dict) else type(part).__name__
                for part in (message["content"] if isinstance(message["content"], list) else [])
                if not (isinstance(part, dict) and part.get("type", "text") == "text")
            ]
            if other_parts:
                return (
                    f"has an {other_parts[0]!r} part in its content; a demonstration is trained as text, the "
                    "completion the model should generate: keep only its text parts"
                )
            content = message_text(message["content"])
            if not isinstance(content, str) or not content.strip():
                return f"has an assistant message with empty or non-string content: {message['content']!r:.80}"
        return None
    return f"is a {type(demonstration).__name__}"


EXPECTED_DEMONSTRATION = (
    "a non-empty string (plain text) or one assistant message such as [{'role': 'assistant', 'content': '...'}] "
    "(conversational)"
)


def demonstration_error(row, column: str, problem: str, split: str = "train") -> ValueError:
    """The error for an unusable demonstration, naming the row, the column and what is expected."""
    return ValueError(
        f"Row {row} of the {split} dataset has an invalid demonstration in column {column!r}: it {problem}. "
        f"Expected {EXPECTED_DEMONSTRATION}. With `allow_missing_demonstrations=True`, a None or empty demonstration "
        "marks a prompt that is never gated."
    )


def is_missing_demonstration(demonstration) -> bool:
    """A demonstration that is absent: `None`, an empty string or an empty list (allowed with
    `allow_missing_demonstrations`)."""
    return (
        demonstration is None
        or (isinstance(demonstration, (str, list)) and not demonstration)
        or (isinstance(demonstration, str) and not demonstration.strip())
    )


def validate_demonstrations(
    dataset: Dataset | IterableDataset | None, column: str, split: str = "train", allow_missing: bool = False
) -> Dataset | IterableDataset | None:
    """
    Check that every row of `dataset` has a usable demonstration in `column`.

    A map-style dataset is checked whole, before training. An iterable (streaming) dataset cannot be read ahead without
    consuming it: its column is checked now, and its rows as they arrive, through a lazy `map` that raises the same
    error naming the row.

    Args:
        dataset ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `None`):
            Dataset to check.
        column (`str`):
            Name of the demonstration column.
        split (`str`, *optional*, defaults to `"train"`):
            Name used in error messages.
        allow_missing (`bool`, *optional*, defaults to `False`):
            Accept missing demonstrations (`None`, empty); other problems are still errors.

    Returns:
        The dataset to train on: `dataset` itself, or for an iterable dataset the same stream with the check attached.

    Raises:
        `ValueError`: naming the column, the row and what is expected.
    """
    if dataset is None:
        return None
    columns = dataset.column_names
    if columns is not None and column not in columns:
        raise ValueError(
            f"The {split} dataset has no demonstration column {column!r}. Its columns are {columns}. HPT trains a "
            f"prompt with SFT on its demonstration, so each row needs one: {EXPECTED_DEMONSTRATION}. Set "
            "`HPTConfig(demonstration_column=...)` to the column that holds it."
        )

    def check(demonstration, row) -> None:
        if allow_missing and is_missing_demonstration(demonstration):
            return
        problem = _describe_demonstration_problem(demonstration)
        if problem is not None:
            raise demonstration_error(row, column, problem, split)

    return check_rows(dataset, column, check)


def check_demonstration_tokens(ids: Sequence[int], demonstration, row, column: str, split: str = "train") -> None:
    """Stop when a demonstration's token ids (from [`demonstration_token_ids`]) hold only the end-of-turn token: the
    tokenizer dropped every character of its content (or it was only the `<think>` the generation prompt opens), and
    SFT on it would teach the model to stop at once."""
    if len(ids) <= 1:
        raise ValueError(
            f"Row {row} of the {split} dataset has a demonstration in column {column!r} that tokenizes to no token of "
            f"its own (only the end-of-turn token): {demonstration_content(demonstration)!r:.80}. The tokenizer "
            "drops its characters; fix or remove the row."
        )


THINK_OPEN = "<think>"
_SENTINEL = "HPTDEMONSTRATIONSENTINEL"


def message_text(content):
    """The text of a message's content: a string, or the joined text of content blocks such as
    `[{"type": "text", "text": ...}]`. Anything else is returned as is (and rejected by the validation)."""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return content


def demonstration_content(demonstration: str | list[dict]) -> str:
    """The text of a demonstration: the string itself, or its one assistant message's content."""
    return demonstration if isinstance(demonstration, str) else message_text(demonstration[-1]["content"])


def end_of_turn_token_id(
    processing_class: PreTrainedTokenizerBase, eos_token_ids: Sequence[int], **template_kwargs
) -> int:
    """
    The token an assistant turn ends with in the chat template, among the tokens generation stops on: the first of
    `eos_token_ids` that the template puts after an assistant message's content. `eos_token_ids[0]` if it puts none.
    """
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _SENTINEL}]
    text = apply_chat_template({"messages": messages}, processing_class, **template_kwargs)["text"]
    if _SENTINEL in text:
        suffix = processing_class(text=text.split(_SENTINEL)[-1], add_special_tokens=False)["input_ids"]
        for token in suffix:
            if token in eos_token_ids:
                return token
    return eos_token_ids[0]


def demonstration_token_ids(
    prompt: str | list[dict],
    demonstration: str | list[dict],
    processing_class: PreTrainedTokenizerBase,
    eos_token_ids: Sequence[int],
    max_length: int | None = None,
    end_of_turn_id: int | None = None,
    **template_kwargs,
) -> list[int]:
    """
    Tokenize a demonstration as the completion the model would generate after the prompt's generation prompt.

    The trainer puts these ids after the exact prompt ids the rollouts are conditioned on (TRL's generation prompt),
    so the ids are:

    1. the demonstration's content, as text (content blocks joined); text inside it that looks like a special token,
       e.g. an EOS or end-of-turn token, is tokenized as text, never as a cut point. When the generation prompt
       already opens a reasoning block (it ends with `<think>`, as DeepSeek-R1's templates do), a leading `<think>`
       of the content is dropped, since the model generates after it;
    2. then the end-of-turn token generation stops on: for a conversational prompt the first stop token the chat
       template puts after an assistant message (see [`end_of_turn_token_id`]), for plain text `eos_token_ids[0]`.

    The chat template is not applied to the demonstration itself: templates such as DeepSeek-R1's drop everything up to
    `</think>` from assistant messages, which would drop the reasoning trace from the SFT target.

    Args:
        prompt (`str` or `list[dict]`):
            The prompt, as in the dataset.
        demonstration (`str` or `list[dict]`):
            The demonstration: a string, or one assistant message.
        processing_class ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer (for a processor, its `tokenizer`).
        eos_token_ids (`Sequence[int]`):
            Tokens that end a completion (the trainer's `eos_token_ids`).
        max_length (`int` or `None`, *optional*):
            Keep at most this many tokens.
        end_of_turn_id (`int` or `None`, *optional*):
            The end-of-turn token of a conversational prompt, if already known (computed otherwise).
        **template_kwargs:
            Passed to the chat template (e.g. `tools`, `chat_template`, `enable_thinking`).

    Returns:
        `list[int]`: demonstration token ids, without the prompt.
    """
    content = demonstration_content(demonstration)
    if is_conversational({"prompt": prompt}):
        generation_prompt = apply_chat_template({"prompt": prompt}, processing_class, **template_kwargs)["prompt"]
        if generation_prompt.rstrip().endswith(THINK_OPEN) and content.lstrip().startswith(THINK_OPEN):
            content = content.lstrip()[len(THINK_OPEN) :].lstrip("\n")
        if end_of_turn_id is None:
            end_of_turn_id = end_of_turn_token_id(processing_class, eos_token_ids, **template_kwargs)
    else:
        end_of_turn_id = eos_token_ids[0]
    ids = processing_class(text=content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = ids + [end_of_turn_id]
    return ids[:max_length] if max_length is not None else ids

"""Keep access tokens (`hub_token`, ...) out of what a run writes: the pickled training arguments (`training_args.bin`
in `output_dir` and every checkpoint, which `push_to_hub` uploads), their `repr`, and recorded command lines."""

from __future__ import annotations

# transformers' rule (`TrainingArguments.to_dict`, 5.25): a field whose name ends in `_token` holds a secret
SECRET_FIELD_SUFFIX = "_token"
# Keys of `model_init_kwargs` that hold one (passed to `from_pretrained`)
SECRET_KWARGS = ("token", "use_auth_token")
REDACTED = "<redacted>"


def is_secret_option(name: str) -> bool:
    """Whether a field or command-line option (`hub_token`, `--hub-token`, `--token`) holds a token."""
    name = name.lstrip("-").replace("-", "_")
    return name.endswith(SECRET_FIELD_SUFFIX) or name in SECRET_KWARGS


def redacted_arguments(state: dict) -> dict:
    """A copy of the attributes of training arguments (`vars(args)`) with every token set to `None`, in their fields
    and in `model_init_kwargs`."""
    state = {key: None if key.endswith(SECRET_FIELD_SUFFIX) else value for key, value in state.items()}
    return without_secret_kwargs(state)


def without_secret_kwargs(state: dict) -> dict:
    """`state` with the tokens of its `model_init_kwargs` left out (a copy where there are any)."""
    kwargs = state.get("model_init_kwargs")
    if isinstance(kwargs, dict) and any(key in kwargs for key in SECRET_KWARGS):
        state = {**state, "model_init_kwargs": {k: v for k, v in kwargs.items() if k not in SECRET_KWARGS}}
    return state


def redact_command(argv: list[str]) -> list[str]:
    """`argv` with the value of every token option (`--hub_token X`, `--hub_token=X`) replaced by `<redacted>`."""
    redacted, hide_next = [], False
    for token in argv:
        name, equals, _ = token.partition("=")
        if hide_next:
            redacted.append(REDACTED)
        elif name.startswith("--") and is_secret_option(name):
            redacted.append(f"{name}={REDACTED}" if equals else token)
        else:
            redacted.append(token)
        hide_next = name.startswith("--") and is_secret_option(name) and not equals and not hide_next
    return redacted

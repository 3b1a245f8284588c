"""The batched `transformers` generation loop shared by `hpt-trl eval` and the quickstart's greedy accuracy."""

from __future__ import annotations


def generate_batched(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int,
    add_special_tokens: bool = True,
    sort_by_length: bool = False,
    progress=None,
    **generate_kwargs,
) -> list[list[str]]:
    """
    Generate from `prompts` in batches, left-padded, and decode what each prompt's sequences add.

    Args:
        model (`PreTrainedModel`):
            The model; `model.generate` is called under `torch.inference_mode()`.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer. Its `padding_side` is `"left"` during the call and restored after.
        prompts (`list[str]`):
            Prompt texts.
        batch_size (`int`):
            Prompts per `generate` call.
        add_special_tokens (`bool`, *optional*, defaults to `True`):
            Whether tokenizing the prompts adds special tokens (`False` for chat-templated prompts).
        sort_by_length (`bool`, *optional*, defaults to `False`):
            Batch prompts of similar lengths together (longest first) instead of in their order.
        progress (`tqdm` or `None`, *optional*):
            A progress bar, advanced by the number of prompts of each batch.
        **generate_kwargs:
            Passed to `model.generate` (`max_new_tokens`, `do_sample`, `num_return_sequences`, ...).

    Returns:
        `list[list[str]]`: For each prompt, in the order of `prompts`, its decoded completions (special tokens
        skipped): one per returned sequence.
    """
    import torch

    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda i: -len(prompts[i]))
    outputs: list[list[str]] = [[] for _ in prompts]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            encoded = tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
            ).to(model.device)
            with torch.inference_mode():
                sequences = model.generate(**encoded, **generate_kwargs)
            texts = tokenizer.batch_decode(sequences[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            per_prompt = len(texts) // len(batch)
            for j, i in enumerate(batch):
                outputs[i] = texts[j * per_prompt : (j + 1) * per_prompt]
            if progress is not None:
                progress.update(len(batch))
    finally:
        tokenizer.padding_side = padding_side
    return outputs

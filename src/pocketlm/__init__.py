"""pocketlm: train a GPT-2-class model from scratch on a small GPU or a CPU, then generate text."""

from pocketlm.config import PRESETS, ModelConfig, TrainConfig
from pocketlm.model import GPT

__all__ = ["GPT", "Generator", "ModelConfig", "PRESETS", "TrainConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that importing pocketlm stays light; ``pocketlm.generate.generate`` is the one-call API.
    if name == "Generator":
        from pocketlm.generate import Generator

        return Generator
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")

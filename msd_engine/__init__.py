"""msd-engine: fast batch-1 generation for LLaVA-1.5 with Multimodal Speculative Decoding."""
from msd_engine.config import ModelConfig, PRESETS, preset
from msd_engine.engine import Engine, GenerationConfig, GenerationResult

__version__ = "0.1.0"


def load(path, **kwargs) -> Engine:
    """Shorthand for `Engine.load(path, **kwargs)`."""
    return Engine.load(path, **kwargs)


__all__ = ["Engine", "GenerationConfig", "GenerationResult", "ModelConfig", "PRESETS", "load", "preset"]

"""gemma4-coreai: Gemma 4 E4B/E2B text decoders -> verified q4_0 bundles -> Core AI, and a fast runtime."""

from .bundle import Bundle, convert, inspect
from .checkpoint import Checkpoint
from .config import ModelConfig, load_config, preset
from .errors import Gemma4Error
from .synth import synthesize

__version__ = "0.1.0"

__all__ = ["Bundle", "Checkpoint", "Gemma4Error", "ModelConfig", "__version__", "convert", "inspect", "load_config",
           "preset", "synthesize"]

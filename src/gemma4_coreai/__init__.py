"""gemma4-coreai: Gemma 4 E4B/E2B text decoders -> verified q4_0 bundles -> Core AI, and a fast runtime."""

from .errors import Gemma4Error

__version__ = "0.1.0"

# The rest is imported on first use (PEP 562): the `gemma4-coreai` command starts without importing torch, so a
# Ctrl-C during that import lands in cli.main, which exits 130 quietly.
_LAZY = {"Bundle": "bundle", "convert": "bundle", "inspect": "bundle", "Checkpoint": "checkpoint",
         "ModelConfig": "config", "load_config": "config", "preset": "config", "synthesize": "synth"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Bundle", "Checkpoint", "Gemma4Error", "ModelConfig", "__version__", "convert", "inspect", "load_config",
           "preset", "synthesize"]

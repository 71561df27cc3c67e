"""Shared fixtures: synthetic checkpoints and bundles, built once per session (others reuse them).

- `tiny_ckpt`: preset 'tiny', text-only layout, shared-layer k/v tensors present (non-QAT style).
- `tiny_bundle`: `tiny_ckpt` converted.
- `tiny_hub_pruned_ckpt`: preset 'tiny', hub layout (model.language_model.), shared-layer k/v pruned (QAT style).
- `make_ckpt(tmp_path_factory, cfg_or_shape, **synth_kwargs)`: any other synthetic checkpoint (cached per
  arguments for the session), e.g. a custom ModelConfig via dataclasses.replace(preset('tiny'), ...).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma4_coreai.bundle import convert
from gemma4_coreai.config import ModelConfig
from gemma4_coreai.synth import synthesize

_CACHE: dict[tuple, Path] = {}


def make_ckpt(tmp_path_factory: pytest.TempPathFactory, cfg_or_shape: ModelConfig | str, **synth_kwargs) -> Path:
    """A synthetic checkpoint directory for `cfg_or_shape` (preset name, config.json path or ModelConfig)."""
    key = (repr(cfg_or_shape), tuple(sorted(synth_kwargs.items())))
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("ckpt") / "ckpt"
        synthesize(cfg_or_shape, out, progress=False, **synth_kwargs)
        _CACHE[key] = out
    return _CACHE[key]


def make_bundle(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, **convert_kwargs) -> Path:
    """Convert a checkpoint into a fresh bundle directory."""
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    return convert(ckpt, out, progress=False, **convert_kwargs)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ckpt(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    return make_bundle(tmp_path_factory, tiny_ckpt)


@pytest.fixture(scope="session")
def oracle_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    """The tiny bundle with a 16-token fp32 oracle (tests copy it before changing anything)."""
    from gemma4_coreai.oracle import convert_hook

    return make_bundle(tmp_path_factory, tiny_ckpt, max_context=96,
                       oracle_hook=convert_hook(n_tokens=16, log=lambda m: None))


@pytest.fixture(scope="session")
def tiny_hub_pruned_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ckpt(tmp_path_factory, "tiny", hub_layout=True, prune_shared_kv=True)


@pytest.fixture(scope="session")
def tiny_hub_pruned_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_hub_pruned_ckpt: Path) -> Path:
    return make_bundle(tmp_path_factory, tiny_hub_pruned_ckpt)

"""Test helper: tiny fp32 Hugging Face Gemma 4 reference models with lattice-snapped weights, and the
bundle-format weights (what `weights.safetensors` and the PLE table files would hold) built from them.

Weights get a meaningful scale (plain init gives logit ties) and are snapped onto the storage lattices, so the
bundle reproduces the reference exactly and any disagreement is a model bug, not quantization noise:
- linears and the embedding: q4_0 with a 4-significant-bit block scale (then every value is bf16-exact, and
  the 16-bit stored embedding and the int4 head are both lossless);
- the PLE table: int8 rows with a 12-significant-bit row scale (127 * scale is exact, so requantizing
  reproduces the scale bit for bit).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gemma4_coreai.config import FULL, SLIDING, ModelConfig, preset
from gemma4_coreai.quant import int8_rows_quantize, q4_0_dequantize, q4_0_quantize, quantize_weights


def single_thread() -> Iterator[None]:
    """Fixture body: these models are tiny, so extra OpenMP threads only add overhead (and stall badly when
    the machine is loaded)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def round_significant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to `bits` significant binary digits (keeps products with small integers exact)."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 2**bits) / 2**bits, e)


def snap_q4(w: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] -> the nearest point of a q4_0 lattice whose block scales have 4 significant bits."""
    q, d = q4_0_quantize(w)
    return q4_0_dequantize(q, round_significant(d, 4))


def snap_int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PLE table [V, W] -> (snapped fp32 table, int8 q, fp32 scale) with table == q * scale exactly."""
    q, scale = int8_rows_quantize(t)
    scale = round_significant(scale, 12)
    return q.float() * scale.unsqueeze(-1), q, scale


# ---- configs exercising every feature ------------------------------------------------------------------

def tiny() -> ModelConfig:
    """The preset: full layers at 2 and 7, 3 KV-shared layers, head dims 32 (sliding) / 64 (full), window 16."""
    return preset("tiny")


def e2b_like() -> ModelConfig:
    """E2B's quirks in small: one KV head, double-wide MLP on the KV-shared layers."""
    S, F = SLIDING, FULL
    return ModelConfig(vocab_size=384, hidden_size=96, intermediate_size=192, num_layers=7, num_heads=4,
                       num_kv_heads=1, head_dim=32, global_head_dim=64, ple_dim=32, num_kv_shared_layers=3,
                       sliding_window=8, layer_types=(S, S, F, S, S, S, F), double_wide_mlp=True,
                       max_position_embeddings=1024)


def heterogeneous() -> ModelConfig:
    """Sliding head dim larger than the full one, no KV sharing, MHA, half-rotary full layers, other thetas."""
    S, F = SLIDING, FULL
    return ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=192, num_layers=5, num_heads=4,
                       num_kv_heads=4, head_dim=64, global_head_dim=32, ple_dim=64, num_kv_shared_layers=0,
                       sliding_window=8, layer_types=(S, F, S, S, F), partial_rotary_factor_full=0.5,
                       rope_theta_sliding=500.0, rope_theta_full=20_000.0, max_position_embeddings=1024)


def mini() -> ModelConfig:
    """The smallest model with both layer types and KV sharing (quick torch.export checks)."""
    S, F = SLIDING, FULL
    return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=2,
                       num_kv_heads=1, head_dim=32, global_head_dim=64, ple_dim=32, num_kv_shared_layers=2,
                       sliding_window=4, layer_types=(S, F, S, F), max_position_embeddings=1024)


CONFIGS = {"tiny": tiny, "e2b_like": e2b_like, "heterogeneous": heterogeneous}


# ---- reference model + bundle weights ------------------------------------------------------------------

@dataclass
class Reference:
    cfg: ModelConfig
    hf: torch.nn.Module  # Gemma4ForCausalLM, fp32, eager attention
    weights: dict[str, torch.Tensor]  # bundle entries (weights.safetensors keys)
    ple_table: torch.Tensor  # int8 [V, L*P]
    ple_scale: torch.Tensor  # fp32 [V]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """fp32 [S, V] reference logits (full recompute, no cache)."""
        out = self.hf(input_ids=torch.tensor([ids]), use_cache=False)
        return out.logits[0].float()

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> list[int]:
        """Greedy continuation through HF's own KV cache path."""
        out = self.hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                               eos_token_id=None, pad_token_id=self.cfg.pad_token_id)
        return out[0, len(ids):].tolist()


def build_reference(cfg: ModelConfig, seed: int = 0) -> Reference:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    hf_cfg = Gemma4TextConfig(**cfg.to_hf_text_config())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = Gemma4ForCausalLM(hf_cfg).float().eval()
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def uniform(shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    H, P = cfg.hidden_size, cfg.ple_dim
    sd = hf.model.state_dict()
    ple_q = ple_scale = None
    with torch.no_grad():
        for name, t in sd.items():
            if name == "embed_tokens.weight":
                # x0 = E[id] * sqrt(H) with RMS 1.5: large enough to matter, small enough that greedy does not just
                # repeat the input token (the final norm weight ~4 brings the logit std to ~6).
                new = snap_q4(randn(*t.shape) * (1.5 / H**0.5))
            elif name == "embed_tokens_per_layer.weight":
                new, ple_q, ple_scale = snap_int8_rows(randn(*t.shape) / P**0.5)  # tok RMS ~1
            elif name.endswith("layer_scalar"):
                new = uniform(t.shape, 0.6, 1.4)
            elif name == "norm.weight":
                new = uniform(t.shape, 3.6, 4.4)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # Score scale is 1.0: q/k norm weights ~head_dim^-0.25 give scores of std ~1 (plain ~1 weights
                # make attention so sharp that bf16 rounding flips it and bf16 runs become chaotic).
                new = uniform(t.shape, 0.8, 1.2) * t.shape[0] ** -0.25
            elif name.endswith("norm.weight"):
                new = uniform(t.shape, 0.7, 1.3)
            elif t.dim() == 2:  # linear [out, in]
                new = snap_q4(randn(*t.shape) / t.shape[1] ** 0.5)
            else:
                continue
            t.copy_(new)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "lm_head must stay tied"

    def get(name: str) -> torch.Tensor:
        t = sd[name]
        return t.to(torch.bfloat16) if name == "embed_tokens.weight" else t  # the bundle keeps it 16-bit

    weights = dict(quantize_weights(cfg, get))
    assert torch.equal(weights["embed_tokens.weight"].float(), sd["embed_tokens.weight"])
    return Reference(cfg, hf, weights, ple_q, ple_scale)

"""Synthetic QAT-like Gemma 4 checkpoints in the Hugging Face layout (`gemma4-coreai synth`).

Every quantized tensor lies exactly on its lattice (DESIGN §5), so conversion is lossless and any token mismatch
downstream is a real bug:
- linear weights and the token embedding: each 32-block is d*q, q integer in [-8, 7] with at least one -8, and
  d = ±k*2^e with k in [8, 15], so every d*q (|k*q| <= 120) is exact in bf16 and d is exact in fp16;
- the PLE table: each row is s*q, q integer in [-127, 127] with max|q| == 127, s a power of two, so
  max|row|/127 gives back s exactly.
Magnitudes are chosen so the tiny model's logits have clear top-2 gaps: the embedding has unit-RMS rows after
the sqrt(H) scale, linears are ~1/sqrt(fan_in), the final norm weight is ~4 (logit spread of several units).

Tensors are generated per row chunk with a per-tensor torch.Generator (seeded from the seed and the tensor's
name), so output bytes depend only on the seed and the config, and e4b (~16 GB) streams within a few GB of RAM.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import HUB_PREFIX, TEXT_PREFIX, SafetensorsWriter, atomic_dir, progress_bar
from .config import ModelConfig, load_config, preset
from .errors import Gemma4Error

SHARD_BYTES = 3 * 1024**3
CHUNK_ELEMS = 1 << 25  # ~32 M elements per generated chunk

# Gemma 4 special token ids (DESIGN §2).
SPECIAL_IDS = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>",
}
NEWLINE_ID = 107
N_RESERVED = 108  # ids 0..107: specials, "\n" and <unused_N> placeholders
TINY_VOCAB = 512

_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a language: it sees
words, spaces and punctuation, and it learns which pieces come together. This is a short English text for a
tiny tokenizer. It talks about the weather, the river, the city and the people who live there. In the morning
the sun rises over the hills, and the children walk to school. They read books, write stories, and ask many
questions. What is the time? Where are we going? How does this work? The answer is often simple: look, listen
and think. Numbers like 1, 2, 3, 10, 42 and 2026 appear in text too. The model writes one token at a time, and
each token is a piece of a word. When the turn ends, the user speaks again. Hello, world! Thank you very much.
Please tell me a story about a cat and a dog who became friends. Once upon a time there was a little house near
the sea. The wind was cold, but the fire was warm. Every day the old man went out in his boat to catch fish.
"""


# ---- weights ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One checkpoint tensor: canonical name, shape, and how to generate it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # 'q4' (on the q4_0 lattice), 'ple' (int8 row lattice), 'norm', 'scalar'
    gain: float = 1.0  # q4: target RMS * sqrt(fan_in); norm: centre value

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # bf16


def tensor_specs(cfg: ModelConfig, prune_shared_kv: bool = False) -> list[Spec]:
    """Every tensor of the synthetic checkpoint, in file order."""
    H = cfg.hidden_size
    specs = [
        # Unit-RMS rows after the sqrt(H) embedding scale: gain 1 over fan-in H.
        Spec("embed_tokens.weight", (cfg.vocab_size, H), "q4"),
        Spec("embed_tokens_per_layer.weight", (cfg.vocab_size, cfg.ple_width), "ple"),
        Spec("per_layer_model_projection.weight", (cfg.ple_width, H), "q4"),
        Spec("per_layer_projection_norm.weight", (cfg.ple_dim,), "norm"),
    ]
    lin = cfg.linear_shapes()
    norms = cfg.norm_shapes()
    optional = {} if prune_shared_kv else cfg.optional_shared_kv_names()
    for s in cfg.layers:
        p = f"layers.{s.index}."
        names = [n for n in (*lin, *norms, *optional) if n.startswith(p)]
        order = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_feedforward_layernorm",
                 "per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm", "layer_scalar"]
        for part in order:
            for n in names:
                if n[len(p):].removesuffix(".weight") != part:
                    continue
                shape = lin.get(n) or norms.get(n) or optional[n]
                if part == "layer_scalar":
                    specs.append(Spec(n, shape, "scalar"))
                elif part in ("self_attn.q_norm", "self_attn.k_norm"):
                    # Score scale is 1.0: Gemma 4 learns the 1/sqrt(d) into these norms. d^-1/4 on each side
                    # keeps q.k at unit scale; weights near 1 would make attention one-hot and chaotic.
                    specs.append(Spec(n, shape, "norm", gain=shape[0] ** -0.25))
                elif len(shape) == 1:
                    specs.append(Spec(n, shape, "norm"))
                else:
                    specs.append(Spec(n, shape, "q4"))
    # The final norm's weight sets the logit spread: ~4 gives logits over several units (clear top-2 gaps).
    specs.append(Spec("norm.weight", (H,), "norm", gain=4.0))
    return specs


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def q4_lattice_rows(g: torch.Generator, rows: int, k: int, rms: float) -> torch.Tensor:
    """[rows, k] bf16 on the q4_0 lattice: per 32-block bf16(d*q), q in [-8, 7] with one forced -8, d = ±k'*2^e.

    d has bf16's full 8 significant bits (k' in [128, 255]), as trained scales do, so d*q often needs more and the
    checkpoint holds it rounded: the lattice is exact in bf16 (-8d, the block's peak, is exact), not in fp32."""
    nb = k // 32
    q = torch.randint(-8, 8, (rows, nb, 32), dtype=torch.int8, generator=g)
    q.scatter_(-1, torch.randint(0, 32, (rows, nb, 1), generator=g), -8)
    # q is uniform on [-8, 7] (RMS ~4.6); k' in [128, 255] averages ~191.5: pick e so d*q has the target RMS.
    e = math.floor(math.log2(rms / (4.6 * 191.5)) + 0.5)
    kk = torch.randint(128, 256, (rows, nb, 1), generator=g).float()
    sign = torch.randint(0, 2, (rows, nb, 1), generator=g).float() * 2 - 1
    d = (sign * kk * 2.0**e).to(torch.bfloat16)  # 8 significant bits: exact in bf16
    return (q.to(torch.bfloat16) * d).reshape(rows, k)  # bf16 products: rounded where |k'*q| needs > 8 bits


def ple_lattice_rows(g: torch.Generator, rows: int, width: int, rms: float) -> torch.Tensor:
    """[rows, width] bf16 on the int8 row lattice: s*q, q in [-127, 127], max|q| == 127, s a power of two."""
    q = torch.randint(-127, 128, (rows, width), dtype=torch.int8, generator=g)
    pos = torch.randint(0, width, (rows, 1), generator=g)
    peak = (torch.randint(0, 2, (rows, 1), generator=g) * 254 - 127).to(torch.int8)
    q.scatter_(-1, pos, peak)
    e0 = math.floor(math.log2(rms / 73.0) + 0.5)  # uniform q has RMS ~73
    s = torch.pow(2.0, (e0 - torch.randint(0, 2, (rows, 1), generator=g)).float()).to(torch.bfloat16)
    return q.to(torch.bfloat16) * s  # |q| <= 127 fits bf16's 8 significant bits


def generate(spec: Spec, cfg: ModelConfig, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's bf16 values as row chunks (all rows, in order)."""
    g = _generator(seed, spec.name)
    if spec.kind == "norm":
        # Norm weights random around their centre (1, or 4 for the final norm): +-20%.
        yield (spec.gain * (0.8 + 0.4 * torch.rand(spec.shape, generator=g))).to(torch.bfloat16)
        return
    if spec.kind == "scalar":
        yield (0.5 + 0.5 * torch.rand(spec.shape, generator=g)).to(torch.bfloat16)  # in [0.5, 1.0]
        return
    rows, width = spec.shape
    step = max(1, CHUNK_ELEMS // width)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        if spec.kind == "ple":
            # tok = E_ple * sqrt(P) should be ~unit RMS, like the normalized context projection it is added to.
            yield ple_lattice_rows(g, n, width, 1.0 / math.sqrt(cfg.ple_dim))
        else:
            yield q4_lattice_rows(g, n, width, spec.gain / math.sqrt(width))


# ---- tokenizer, chat template, generation config ---------------------------------------------------------

def build_tokenizer(vocab_size: int = TINY_VOCAB):
    """A small real tokenizer (BPE with byte fallback, trained on an embedded English text) with Gemma 4's
    special tokens at their ids; ids past 512 (e2b/e4b vocab) are `<unused_N>` placeholders."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < TINY_VOCAB:
        raise Gemma4Error(f"synth: vocab_size {vocab_size} is too small for the synthetic tokenizer "
                          f"(needs >= {TINY_VOCAB})")
    n_learned = TINY_VOCAB - N_RESERVED - 256
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = meta
    text = " ".join(_TEXT.split())  # no newlines: "\n" is its own token at 107
    trainer = trainers.BpeTrainer(vocab_size=n_learned, limit_alphabet=64, show_progress=False,
                                  initial_alphabet=[], special_tokens=[])
    trainer_tok.train_from_iterator([text], trainer=trainer)
    learned = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])[:n_learned]
    merges = json.loads(trainer_tok.to_str())["model"]["merges"]

    vocab: dict[str, int] = {}
    for i in range(N_RESERVED):
        vocab[SPECIAL_IDS.get(i, "\n" if i == NEWLINE_ID else f"<unused_{i}>")] = i
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = N_RESERVED + b
    for tok, _ in learned:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused_{i}>"] = i
    merges = [m for m in merges if all(p in vocab for p in (m if isinstance(m, list) else m.split(" ")))
              and "".join(m if isinstance(m, list) else m.split(" ")) in vocab]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                    for m in merges],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(SPECIAL_IDS[i], special=True, normalized=False) for i in sorted(SPECIAL_IDS)])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def chat_template() -> str:
    return resources.files("gemma4_coreai").joinpath("chat_template.jinja").read_text()


def tokenizer_config(cfg: ModelConfig) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False,  # the chat template writes <bos>
        "padding_side": "left",
        "model_max_length": cfg.max_position_embeddings,
        "extra_special_tokens": {"sot_token": "<|turn>", "eot_token": "<turn|>", "think_token": "<|think|>",
                                 "soc_token": "<|channel>", "eoc_token": "<channel|>"},
    }


def generation_config(cfg: ModelConfig) -> dict:
    """Like the real IT model's: it samples by default (the oracle must force greedy)."""
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": [1, 106], "pad_token_id": cfg.pad_token_id,
            "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95}


def hf_config(cfg: ModelConfig, hub_layout: bool) -> dict:
    text = cfg.to_hf_text_config()
    if not hub_layout:
        return text
    return {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
            "vision_config": None, "audio_config": None, "tie_word_embeddings": True,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": [1, 106], "pad_token_id": cfg.pad_token_id,
            "torch_dtype": "bfloat16"}


# ---- the checkpoint -------------------------------------------------------------------------------------

def resolve_shape(cfg_or_shape: ModelConfig | str | Path) -> ModelConfig:
    """'tiny' | 'e2b' | 'e4b' | a config.json path | a ModelConfig -> ModelConfig."""
    if isinstance(cfg_or_shape, ModelConfig):
        return cfg_or_shape
    s = str(cfg_or_shape)
    if s in ("tiny", "e2b", "e4b"):
        return preset(s)
    if Path(s).exists():
        return load_config(s)
    return preset(s)  # raises "unknown shape"


def _shards(specs: list[Spec], limit: int) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def synthesize(cfg_or_shape: ModelConfig | str | Path, out_dir: str | Path, seed: int = 0, hub_layout: bool = False,
               prune_shared_kv: bool = False, progress: bool = True, force: bool = False,
               shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a synthetic QAT-like checkpoint (HF layout) to out_dir, atomically; returns out_dir."""
    cfg = resolve_shape(cfg_or_shape)
    out = Path(out_dir)
    if out.exists() and not force:
        raise Gemma4Error(f"{out}: already exists (use --force to overwrite)")
    tokenizer = build_tokenizer(cfg.vocab_size)
    specs = tensor_specs(cfg, prune_shared_kv)
    prefix = HUB_PREFIX if hub_layout else TEXT_PREFIX
    shards = _shards(specs, shard_bytes)
    total = sum(s.nbytes for s in specs)

    def body(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, hub_layout), indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg), indent=2) + "\n")
        (tmp / "chat_template.jinja").write_text(chat_template())
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        bar = progress_bar(total, f"synth {cfg.variant}", progress)
        try:
            for fname, shard in zip(names, shards, strict=True):
                w = SafetensorsWriter(tmp / fname, [(prefix + s.name, torch.bfloat16, s.shape) for s in shard],
                                      metadata={"format": "pt"}, hash=False)
                for s in shard:
                    for chunk in generate(s, cfg, seed):
                        w.write_part(prefix + s.name, chunk)
                        bar(chunk.numel() * 2)
                w.close()
        finally:
            bar(None)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {prefix + s.name: f for f, sh in zip(names, shards, strict=True) for s in sh}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    return atomic_dir(out, body, force=force, marker="config.json")

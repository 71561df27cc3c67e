"""Model spec: a Gemma 4 `config.json` read into one small object, with the derived per-layer tables.

Accepts the hub's multimodal wrapper (`model_type: gemma4`, text model under `text_config`) and the
text-only form (`gemma4_text`). Everything out of scope is refused with a message naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import Gemma4Error

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is: its attention type, geometry, and where its K/V come from."""

    index: int
    kind: str  # SLIDING or FULL
    head_dim: int
    owns_kv: bool  # False on KV-shared layers (no k/v projections)
    kv_source: int  # layer whose post-norm, post-RoPE K/V this layer attends over (itself when owns_kv)
    kv_slot: int  # slot of kv_source in the unified KV cache (one slot per non-shared layer)
    intermediate_size: int
    rope_theta: float
    rope_angles: int  # frequency pairs that rotate; the rest have inv_freq 0 ("proportional" RoPE)

    @property
    def is_sliding(self) -> bool:
        return self.kind == SLIDING


@dataclass(frozen=True)
class ModelConfig:
    """The Gemma 4 text decoder's hyper-parameters (ModelArgs-style) plus derived per-layer tables."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # sliding layers
    global_head_dim: int  # full-attention layers
    ple_dim: int  # hidden_size_per_layer_input (P)
    num_kv_shared_layers: int
    sliding_window: int
    layer_types: tuple[str, ...]
    final_logit_softcap: float | None = 30.0  # None: no softcap (HF's default when the field is absent or null)
    rms_norm_eps: float = 1e-6
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25
    partial_rotary_factor_sliding: float = 1.0
    double_wide_mlp: bool = False
    max_position_embeddings: int = 131_072
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    layers: tuple[LayerSpec, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(_derive_layers(self)))

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    @property
    def kv_layers(self) -> list[int]:
        """The layers that own a KV cache slot, in slot order."""
        return [s.index for s in self.layers if s.owns_kv]

    @property
    def num_kv_slots(self) -> int:
        return len(self.kv_layers)

    @property
    def max_head_dim(self) -> int:
        return max(self.head_dim, self.global_head_dim)

    @property
    def ple_width(self) -> int:
        """Row width of the PLE table: L * P."""
        return self.num_layers * self.ple_dim

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def variant(self) -> str:
        """'e4b', 'e2b' or 'custom', from the shape (used for artifact names)."""
        if (self.hidden_size, self.num_layers) == (2560, 42):
            return "e4b"
        if (self.hidden_size, self.num_layers) == (1536, 35):
            return "e2b"
        return "custom"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every quantized linear weight [out, in] by canonical name (text-only names, no prefix)."""
        H, P, L = self.hidden_size, self.ple_dim, self.num_layers
        shapes: dict[str, tuple[int, int]] = {"per_layer_model_projection.weight": (L * P, H)}
        for s in self.layers:
            p = f"layers.{s.index}."
            q_out = self.num_heads * s.head_dim
            shapes[p + "self_attn.q_proj.weight"] = (q_out, H)
            if s.owns_kv:
                kv_out = self.num_kv_heads * s.head_dim
                shapes[p + "self_attn.k_proj.weight"] = (kv_out, H)
                shapes[p + "self_attn.v_proj.weight"] = (kv_out, H)
            shapes[p + "self_attn.o_proj.weight"] = (H, q_out)
            shapes[p + "mlp.gate_proj.weight"] = (s.intermediate_size, H)
            shapes[p + "mlp.up_proj.weight"] = (s.intermediate_size, H)
            shapes[p + "mlp.down_proj.weight"] = (H, s.intermediate_size)
            shapes[p + "per_layer_input_gate.weight"] = (P, H)
            shapes[p + "per_layer_projection.weight"] = (H, P)
        return shapes

    def norm_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every RMSNorm weight and layer scalar (kept in fp32) by canonical name."""
        H = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"norm.weight": (H,), "per_layer_projection_norm.weight": (self.ple_dim,)}
        for s in self.layers:
            p = f"layers.{s.index}."
            for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm", "post_per_layer_input_norm"):
                shapes[p + n + ".weight"] = (H,)
            shapes[p + "self_attn.q_norm.weight"] = (s.head_dim,)
            if s.owns_kv:
                shapes[p + "self_attn.k_norm.weight"] = (s.head_dim,)
            shapes[p + "layer_scalar"] = (1,)
        return shapes

    def optional_shared_kv_names(self) -> dict[str, tuple[int, ...]]:
        """k_proj / v_proj / k_norm of KV-shared layers: shipped by the non-QAT release, never used."""
        H = self.hidden_size
        names: dict[str, tuple[int, ...]] = {}
        for s in self.layers:
            if not s.owns_kv:
                p = f"layers.{s.index}.self_attn."
                names[p + "k_proj.weight"] = (self.num_kv_heads * s.head_dim, H)
                names[p + "v_proj.weight"] = (self.num_kv_heads * s.head_dim, H)
                names[p + "k_norm.weight"] = (s.head_dim,)
        return names

    def param_count(self) -> dict[str, int]:
        lin = sum(o * i for o, i in self.linear_shapes().values())
        return {
            "linear": lin,
            "embed_tokens": self.vocab_size * self.hidden_size,
            "embed_per_layer": self.vocab_size * self.ple_width,
            "norms": sum(math.prod(s) for s in self.norm_shapes().values()),
        }

    # ---- (de)serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("layers")
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest.json") -> ModelConfig:
        """Inverse of to_dict (the bundle manifest's `config`); every field checked, refused as 'config.X'."""
        if not isinstance(d, dict):
            raise _refuse("config", f"is {_show(d)}, expected an object", source)
        unknown = [k for k in d if k not in _FIELDS]
        if unknown:
            raise _refuse(f"config.{unknown[0]}", "is not a model config field", source)
        kw = {f.name: f.default for f in fields(cls) if f.name in _FIELDS and f.default is not MISSING} | d
        missing = [k for k in _FIELDS if k not in kw]
        if missing:
            raise _refuse(f"config.{missing[0]}", "is missing", source)
        _validate(kw, {k: f"config.{k}" for k in _FIELDS}, source)
        return cls(**(kw | {"layer_types": tuple(kw["layer_types"])}))

    def to_hf_text_config(self) -> dict[str, Any]:
        """The HF `gemma4_text` config dict describing this model (used by synth and the reference)."""
        return {
            "model_type": "gemma4_text",
            "architectures": ["Gemma4ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": True,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": self.partial_rotary_factor_full,
                       "rope_theta": self.rope_theta_full},
            },
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "final_logit_softcapping": self.final_logit_softcap,
            "vocab_size_per_layer_input": self.vocab_size,
            "hidden_size_per_layer_input": self.ple_dim,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.double_wide_mlp,
            "attention_k_eq_v": False,
            "enable_moe_block": False,
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "bfloat16",
        }


def _derive_layers(cfg: ModelConfig) -> list[LayerSpec]:
    first_shared = cfg.first_shared_layer
    # A shared layer borrows from the last non-shared layer of its own type.
    last_owner: dict[str, int] = {}
    for i in range(first_shared):
        last_owner[cfg.layer_types[i]] = i
    kv_layers = list(range(first_shared))
    out = []
    for i, kind in enumerate(cfg.layer_types):
        owns = i < first_shared
        src = i if owns else last_owner[kind]
        is_full = kind == FULL
        hd = cfg.global_head_dim if is_full else cfg.head_dim
        factor = cfg.partial_rotary_factor_full if is_full else cfg.partial_rotary_factor_sliding
        wide = 2 if (cfg.double_wide_mlp and not owns) else 1
        out.append(LayerSpec(
            index=i, kind=kind, head_dim=hd, owns_kv=owns, kv_source=src, kv_slot=kv_layers.index(src),
            intermediate_size=cfg.intermediate_size * wide,
            rope_theta=cfg.rope_theta_full if is_full else cfg.rope_theta_sliding,
            rope_angles=int(factor * hd // 2),
        ))
    return out


def _refuse(field_name: str, why: str, source: str) -> Gemma4Error:
    return Gemma4Error(f"{source}: field '{field_name}' {why}")


# ---- the one check of a config's values, shared by config.json and the bundle manifest ------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "size": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "count": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "positive": ("a positive number", lambda v: _is_num(v) and v > 0),
    "positive_or_none": ("a positive number or null", lambda v: v is None or (_is_num(v) and v > 0)),
    "fraction": ("a number in (0, 1]", lambda v: _is_num(v) and 0 < v <= 1),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "layer_types": (f"a non-empty list of {SLIDING!r} / {FULL!r}",
                    lambda v: isinstance(v, (list, tuple)) and len(v) > 0),
}
# Every ModelConfig field and its kind ("token": an id in [0, vocab_size)); names in config.json where they differ.
_FIELDS = {
    "vocab_size": "size", "hidden_size": "size", "intermediate_size": "size", "num_layers": "size",
    "num_heads": "size", "num_kv_heads": "size", "head_dim": "size", "global_head_dim": "size", "ple_dim": "size",
    "num_kv_shared_layers": "count", "sliding_window": "size", "layer_types": "layer_types",
    "final_logit_softcap": "positive_or_none", "rms_norm_eps": "positive", "rope_theta_sliding": "positive",
    "rope_theta_full": "positive", "partial_rotary_factor_full": "fraction",
    "partial_rotary_factor_sliding": "fraction", "double_wide_mlp": "bool", "max_position_embeddings": "size",
    "bos_token_id": "token", "eos_token_id": "token", "pad_token_id": "token",
}
_HF_NAMES = {
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "ple_dim": "hidden_size_per_layer_input", "final_logit_softcap": "final_logit_softcapping",
    "rope_theta_sliding": f"rope_parameters.{SLIDING}.rope_theta",
    "rope_theta_full": f"rope_parameters.{FULL}.rope_theta",
    "partial_rotary_factor_full": f"rope_parameters.{FULL}.partial_rotary_factor",
    "partial_rotary_factor_sliding": f"rope_parameters.{SLIDING}.partial_rotary_factor",
    "double_wide_mlp": "use_double_wide_mlp",
}


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_field(label: str, value: Any, kind: str, source: str, vocab: int = 0) -> Any:
    """One value against its kind; returns it. `label` is the field's name as the user's file spells it."""
    if kind == "token":
        expect, ok = f"a token id in [0, {vocab})", _is_int(value) and 0 <= value < vocab
    else:
        expect, ok = _KINDS[kind][0], _KINDS[kind][1](value)
    if not ok:
        raise _refuse(label, f"is {_show(value)}, expected {expect}", source)
    if kind == "layer_types":
        bad = [x for x in value if x not in (SLIDING, FULL)]
        if bad:
            raise _refuse(label, f"has unknown layer type {_show(bad[0])}, expected {SLIDING!r} or {FULL!r}", source)
    return value


def _validate(v: dict[str, Any], names: dict[str, str], source: str) -> None:
    """Check every ModelConfig field value in `v` (types, ranges, consistency); refusals use `names` as labels."""
    for f, kind in _FIELDS.items():
        _check_field(names[f], v[f], kind, source, vocab=v["vocab_size"])
    n, n_shared, types = v["num_layers"], v["num_kv_shared_layers"], v["layer_types"]
    if len(types) != n:
        raise _refuse(names["layer_types"], f"has {len(types)} entries for {n} layers", source)
    if n_shared >= n:
        raise _refuse(names["num_kv_shared_layers"], f"is {n_shared}, expected an integer in [0, {n})", source)
    if n_shared and set(types[: n - n_shared]) != set(types):
        raise _refuse(names["num_kv_shared_layers"],
                      "leaves a KV-shared layer type with no non-shared layer to borrow from", source)
    if v["num_heads"] % v["num_kv_heads"]:
        raise _refuse(names["num_kv_heads"], f"({v['num_kv_heads']}) does not divide {names['num_heads']} "
                      f"({v['num_heads']})", source)
    for f in ("hidden_size", "intermediate_size", "head_dim", "global_head_dim", "ple_dim"):
        if v[f] % 32:
            raise _refuse(names[f], f"is {v[f]}: q4_0 needs every linear input dimension to be a multiple of 32",
                          source)


def from_hf_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Read a Gemma 4 HF config dict (hub wrapper or text-only) into a ModelConfig, refusing what is out of scope."""
    mt = raw.get("model_type")
    if mt == "gemma4":
        if not isinstance(raw.get("text_config"), dict):
            raise _refuse("text_config", "is missing: a 'gemma4' config must wrap the text model in text_config",
                          source)
        t = raw["text_config"]
        if t.get("model_type", "gemma4_text") != "gemma4_text":
            raise _refuse("text_config.model_type", f"is {t.get('model_type')!r}, expected 'gemma4_text'", source)
        prefix = "text_config."
    elif mt == "gemma4_text":
        t, prefix = raw, ""
    else:
        raise _refuse("model_type", f"is {mt!r}: not a Gemma 4 model (expected 'gemma4' or 'gemma4_text')", source)

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        if key not in t or t[key] is None:
            if required:
                raise _refuse(prefix + key, "is missing", source)
            return default
        return t[key]

    if get("enable_moe_block", False):
        raise _refuse(prefix + "enable_moe_block", "is true: MoE models are out of scope", source)
    if get("num_experts"):
        raise _refuse(prefix + "num_experts", "is set: MoE models are out of scope", source)
    if get("attention_k_eq_v", False):
        raise _refuse(prefix + "attention_k_eq_v", "is true: K=V attention (the 26B/31B models) is out of scope",
                      source)
    if get("use_bidirectional_attention") not in (None, "vision"):  # "vision" leaves text attention causal
        raise _refuse(prefix + "use_bidirectional_attention",
                      f"is {get('use_bidirectional_attention')!r}: only causal attention is supported", source)
    if get("attention_bias", False):
        raise _refuse(prefix + "attention_bias", "is true: Gemma 4 has no attention bias", source)
    act = get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise _refuse(prefix + "hidden_activation", f"is {act!r}, expected 'gelu_pytorch_tanh'", source)
    if not get("hidden_size_per_layer_input", 256):
        raise _refuse(prefix + "hidden_size_per_layer_input", "is 0: per-layer embeddings are required", source)
    tie = get("tie_word_embeddings", raw.get("tie_word_embeddings", True))
    if not tie:
        raise _refuse("tie_word_embeddings", "is false: Gemma 4 ties the output head to the embedding", source)

    names = {f: prefix + _HF_NAMES.get(f, f) for f in _FIELDS}
    n_layers = _check_field(names["num_layers"], get("num_hidden_layers", 30), "size", source)
    layer_types = get("layer_types")
    if layer_types is None:
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
    layer_types = list(_check_field(names["layer_types"], layer_types, "layer_types", source))
    layer_types[-1] = FULL  # HF forces the last layer to full attention; so do we, silently the same

    global_head_dim = _full_head_dim(t, prefix, layer_types, source)

    for key in ("rope_scaling", "partial_rotary_factor", "rope_theta"):
        if get(key) is not None:
            raise _refuse(prefix + key, "is set: Gemma 4 keeps RoPE settings per layer type in rope_parameters; "
                                        "this legacy form is not supported", source)
    rope = get("rope_parameters", {})
    if not isinstance(rope, dict):
        raise _refuse(prefix + "rope_parameters", f"is {_show(rope)}, expected an object", source)
    rs = rope.get(SLIDING) or {}
    rf = rope.get(FULL) or {}
    for name, r in ((SLIDING, rs), (FULL, rf)):
        if not isinstance(r, dict):
            raise _refuse(f"{prefix}rope_parameters.{name}", f"is {_show(r)}, expected an object", source)
        if r.get("factor", 1.0) not in (1, 1.0):
            raise _refuse(f"{prefix}rope_parameters.{name}.factor", "is not 1.0: scaled RoPE is not supported",
                          source)
        if "type" in r:
            raise _refuse(f"{prefix}rope_parameters.{name}.type", "is set: use rope_type (the legacy key is not "
                                                                  "supported)", source)
        if r.get("rope_type", "default") not in ("default", "proportional"):
            raise _refuse(f"{prefix}rope_parameters.{name}.rope_type", f"is {r.get('rope_type')!r}: not supported",
                          source)

    def token(key: str, default: int) -> Any:  # the hub wrapper keeps token ids at its top level
        if prefix and raw.get(key) is not None:
            names[key] = key
            return raw[key]
        return get(key, default)

    eos = token("eos_token_id", 1)
    if isinstance(eos, list):
        if not eos:
            raise _refuse(names["eos_token_id"], "is [], expected a token id or a non-empty list of them", source)
        eos = eos[0]

    kw = {
        "vocab_size": get("vocab_size", 262_144),
        "hidden_size": get("hidden_size", 2304),
        "intermediate_size": get("intermediate_size", 9216),
        "num_layers": n_layers,
        "num_heads": get("num_attention_heads", 8),
        "num_kv_heads": get("num_key_value_heads", 4),
        "head_dim": get("head_dim", 256),
        "global_head_dim": global_head_dim,
        "ple_dim": get("hidden_size_per_layer_input", 256),
        "num_kv_shared_layers": get("num_kv_shared_layers", 0),
        "sliding_window": get("sliding_window", 512),
        "layer_types": tuple(layer_types),
        "final_logit_softcap": get("final_logit_softcapping"),  # absent or null: none, as in HF
        "rms_norm_eps": get("rms_norm_eps", 1e-6),
        "rope_theta_sliding": rs.get("rope_theta", 10_000.0),
        "rope_theta_full": rf.get("rope_theta", 1_000_000.0),
        "partial_rotary_factor_full": _rotary_factor(rf, default=0.25),
        "partial_rotary_factor_sliding": _rotary_factor(rs, default=1.0),
        "double_wide_mlp": get("use_double_wide_mlp", False),
        "max_position_embeddings": get("max_position_embeddings", 131_072),
        "bos_token_id": token("bos_token_id", 2),
        "eos_token_id": eos,
        "pad_token_id": get("pad_token_id", 0),
    }
    _validate(kw, names, source)
    if get("vocab_size_per_layer_input", kw["vocab_size"]) != kw["vocab_size"]:
        raise _refuse(prefix + "vocab_size_per_layer_input", "differs from vocab_size: not supported", source)
    kw.update({f: float(kw[f]) for f, kind in _FIELDS.items() if kind in ("positive", "fraction")})
    return ModelConfig(**kw)


def _full_head_dim(t: dict[str, Any], prefix: str, layer_types: list[str], source: str) -> Any:
    """The full layers' head dim as HF resolves it: a `per_layer_config` (index -> overrides) decides where
    present, a full layer without a `head_dim` override keeping `head_dim`; otherwise `global_head_dim` (default
    512). Overrides this model cannot express (other fields, sliding layers, unequal full layers) are refused."""
    plc, base = t.get("per_layer_config"), t.get("head_dim") or 256
    if plc is None:
        return t.get("global_head_dim") or 512
    if not isinstance(plc, dict):
        raise _refuse(prefix + "per_layer_config", f"is {_show(plc)}, expected an object", source)
    for k, v in plc.items():
        label = f"{prefix}per_layer_config.{k}"
        if not (str(k).isdigit() and int(k) < len(layer_types)) or not isinstance(v, dict):
            raise _refuse(label, "is not a layer index with an object of overrides", source)
        extra = sorted(set(v) - {"head_dim"} - {f for f in ("num_key_value_heads",) if v.get(f) == t.get(f)})
        if extra or (layer_types[int(k)] != FULL and v.get("head_dim", base) != base):
            raise _refuse(label, f"overrides {', '.join(extra) or 'head_dim'} on a "
                                 f"{layer_types[int(k)].split('_')[0]} layer: not supported", source)
    by_layer = {int(k): v for k, v in plc.items()}  # keys as written: "5", "05" (transformers pads them)
    dims = {by_layer.get(i, {}).get("head_dim", base) for i, kind in enumerate(layer_types) if kind == FULL}
    if len(dims) > 1:
        raise _refuse(prefix + "per_layer_config", f"gives full layers different head dims {sorted(dims)}: "
                                                    "not supported", source)
    return dims.pop() if dims else base


def _rotary_factor(rope: dict[str, Any], default: float) -> Any:
    """HF: absent rope_parameters -> the Gemma 4 defaults; 'default' RoPE rotates every pair."""
    if not rope:
        return default
    if rope.get("rope_type", "default") == "default":
        return 1.0
    return rope.get("partial_rotary_factor", 1.0)


def load_config(path: str | Path) -> ModelConfig:
    """Read config.json (a file, or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise Gemma4Error(f"{p}: config.json not found")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gemma4Error(f"{p}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise Gemma4Error(f"{p}: expected a JSON object")
    return from_hf_config(raw, source=str(p))


# ---- preset shapes (synthetic checkpoints and tests) --------------------------------------------------

def preset(shape: str) -> ModelConfig:
    """Named shapes: 'e4b', 'e2b' (the real models' geometry: E4B full attention every 6th layer, E2B every 5th),
    'tiny' (tests: every feature, small)."""
    if shape == "e4b":
        return ModelConfig(vocab_size=262_144, hidden_size=2560, intermediate_size=10240, num_layers=42, num_heads=8,
                           num_kv_heads=2, head_dim=256, global_head_dim=512, ple_dim=256, num_kv_shared_layers=18,
                           sliding_window=512, layer_types=_every_sixth_full(42))
    if shape == "e2b":
        return ModelConfig(vocab_size=262_144, hidden_size=1536, intermediate_size=6144, num_layers=35, num_heads=8,
                           num_kv_heads=1, head_dim=256, global_head_dim=512, ple_dim=256, num_kv_shared_layers=20,
                           sliding_window=512, layer_types=((SLIDING,) * 4 + (FULL,)) * 7, double_wide_mlp=True)
    if shape == "tiny":
        # 8 layers: full at 2 and 7; 3 KV-shared layers (5, 6 sliding -> borrow 4; 7 full -> borrows 2).
        types = (SLIDING, SLIDING, FULL, SLIDING, SLIDING, SLIDING, SLIDING, FULL)
        return ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=8, num_heads=4,
                           num_kv_heads=2, head_dim=32, global_head_dim=64, ple_dim=32, num_kv_shared_layers=3,
                           sliding_window=16, layer_types=types, max_position_embeddings=4096)
    raise Gemma4Error(f"unknown shape {shape!r}: expected tiny, e2b, e4b or a CONFIG.json path")


def _every_sixth_full(n: int) -> tuple[str, ...]:
    t = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    t[-1] = FULL
    return tuple(t)

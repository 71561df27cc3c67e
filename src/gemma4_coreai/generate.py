"""Generation: chat formatting, sampling, stop tokens and streaming text (mlx-lm's `stream_generate` shape).

A backend is anything with `prefill(ids) -> logits[V]`, `decode(token) -> logits[V]`, `reset()` and
`max_context` (see backends.py). Text streams through an incremental detokenizer that decodes only a small
window per token and holds back an incomplete UTF-8 tail, so a long reply costs O(n), not O(n^2).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import Gemma4Error

EOS, BOS, TURN_OPEN, TURN_CLOSE, NEWLINE = 1, 2, 105, 106, 107
THINK, CHANNEL_OPEN, CHANNEL_CLOSE = 98, 100, 101
DEFAULT_STOP = (TURN_CLOSE, EOS)


def default_stop_ids(generation_config: dict[str, Any] | None) -> tuple[int, ...]:
    """`<turn|>`, `<eos>` and the generation config's `eos_token_id` (an id or a list), as transformers stops."""
    eos = (generation_config or {}).get("eos_token_id")
    extra = [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(dict.fromkeys([*DEFAULT_STOP, *extra]))


class Backend(Protocol):
    max_context: int

    def reset(self) -> None: ...
    def prefill(self, ids: Sequence[int]) -> torch.Tensor: ...
    def decode(self, token: int) -> torch.Tensor: ...


# ---- chat formatting -------------------------------------------------------------------------------------

# Gemma's special tokens, passed to the template as transformers passes the tokenizer's special_tokens_map.
SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` (Jinja's own sorts keys and HTML-escapes, so a template would render other text)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


# The largest string or list a template may build with `*`, and the largest exponent of `**`: a bundle's template
# is untrusted input, and `'a' * 10**10` would otherwise take the process's memory.
TEMPLATE_MAX_ITEMS = 1 << 20
TEMPLATE_MAX_EXPONENT = 1024


class _TemplateSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > TEMPLATE_MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is over the template limit of {TEMPLATE_MAX_EXPONENT}")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_ITEMS:
                raise SecurityError(f"a repetition of {len(seq) * n} items is over the template limit of "
                                    f"{TEMPLATE_MAX_ITEMS}")
        return super().call_binop(context, operator, left, right)


def render_chat(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                enable_thinking: bool = False, **extra: Any) -> str:
    """Render a chat template in a sandbox (no attribute access to Python internals, no file system), in the
    environment transformers' `apply_chat_template` gives it: loop controls, its `tojson`, `strftime_now`,
    `raise_exception` and the special tokens. Any failure is one line."""
    env = _TemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def raise_exception(msg: str) -> None:
        raise TemplateError(msg)

    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
            **(SPECIAL_TOKENS | extra))
    except TemplateError as e:
        raise Gemma4Error(f"chat template: {e}") from None
    except Exception as e:  # a template's own error (e.g. str + int): still one line, naming the template
        raise Gemma4Error(f"chat template: {type(e).__name__}: {e}") from None


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A system turn when `system` is given, even empty (as transformers renders it), then the user turn."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": prompt}]


def encode_chat(tokenizer, template: str, prompt: str, system: str | None = None,
                enable_thinking: bool = False) -> list[int]:
    """Prompt ids for one user turn: `<bos><|turn>user\\n{prompt}<turn|>\\n<|turn>model\\n` (system turn first
    when given; thinking adds `<|think|>` as the template defines)."""
    text = render_chat(template, chat_messages(prompt, system), enable_thinking=enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False).ids


# ---- sampling --------------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from the bundle's generation_config.json; explicit (non-None) overrides win. A sampling
        override (temperature, top_k, top_p, seed) asks for sampling even where the config says do_sample false
        (transformers would ignore it with a warning; a CLI user who types --temperature means it)."""
        p = cls(greedy=not gen.get("do_sample", False), temperature=float(gen.get("temperature", 1.0)),
                top_k=int(gen.get("top_k", 0) or 0), top_p=float(gen.get("top_p", 1.0)))
        for k, v in overrides.items():
            if v is not None:
                setattr(p, k, v)
        if overrides.get("greedy") is None and any(overrides.get(k) is not None
                                                   for k in ("temperature", "top_k", "top_p", "seed")):
            p.greedy = False
        if not (isinstance(p.temperature, int | float) and math.isfinite(p.temperature) and p.temperature >= 0):
            raise Gemma4Error(f"temperature must be a finite number >= 0, got {p.temperature}")
        if not isinstance(p.top_k, int) or isinstance(p.top_k, bool):
            raise Gemma4Error(f"top_k must be an integer, got {p.top_k!r}")
        if p.temperature == 0:
            p.greedy = True
        if not 0 < p.top_p <= 1:
            raise Gemma4Error(f"top_p must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise Gemma4Error(f"top_k must be >= 0, got {p.top_k}")
        return p


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.p = params
        # No seed: a fresh one from the OS, leaving torch's global generator (the caller's) alone.
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        if self.p.greedy:
            return int(torch.argmax(logits))
        # Shifted by the max before dividing (in fp64): a tiny temperature gives -inf, never inf - inf = NaN.
        logits = (logits.double() - logits.max()) / self.p.temperature
        if self.p.top_k:
            kth = torch.topk(logits, min(self.p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1).float()
        if self.p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < self.p.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.gen))


# ---- streaming detokenization --------------------------------------------------------------------------

class StreamDetokenizer:
    """Decodes a growing token list incrementally: each call decodes only the tokens since the last emitted
    boundary (plus a few of context, so merges like leading spaces decode right) and holds back text that
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD) until the next token completes it. The joined pieces
    equal `tokenizer.decode` of the whole list: a run of byte-fallback tokens (`<0xHH>`) is held until it ends,
    since the tokenizer decodes a run as one (a run that is not valid UTF-8 becomes one U+FFFD per byte, valid
    bytes included)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens before this index have been emitted
        # the 256 byte-fallback tokens, looked up by name (a scan of a 262k vocabulary would cost every request)
        self.byte_ids = {i for b in range(256) if (i := tokenizer.token_to_id(f"<0x{b:02X}>")) is not None}
        # special tokens decode to nothing when skipped, so the bytes on both sides of one decode as one run
        self.skipped = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special} if self.skip else set()

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> str:
        self.ids.append(token)
        if token in self.byte_ids or token in self.skipped:
            return ""  # inside a byte-fallback run: a later byte can still change how all of it decodes
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) < len(before):
            return ""  # incomplete UTF-8 tail: wait for more bytes
        delta = now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete tail at the very end), decoded as is."""
        rest = self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
        self.prefix = self.read = len(self.ids)
        return rest


# ---- the generation loop -------------------------------------------------------------------------------

@dataclass
class Step:
    """One streamed token: its id (None for the final flush of held-back text), the text it completed (may be
    empty) and the channel it belongs to."""

    token: int | None
    text: str
    channel: str  # "answer" or "thought"


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    thinking: str = ""
    finish_reason: str = "length"  # "stop", "length" or "context"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # backend.decode calls: every token after the first, the stop token included

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.decode_steps
        return n / self.decode_s if n > 0 and self.decode_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "text": self.text,
                "thinking": self.thinking, "finish_reason": self.finish_reason,
                "timings": {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                            "prefill_tok_s": self.prefill_tps, "decode_tok_s": self.decode_tps}}


def check_prompt(ids: Sequence[int], vocab_size: int, max_context: int) -> None:
    if not ids:
        raise Gemma4Error("the prompt is empty")
    for t in ids:
        if not 0 <= t < vocab_size:
            raise Gemma4Error(f"token id {t} is out of range for the vocabulary of {vocab_size}")
    if len(ids) > max_context:
        raise Gemma4Error(f"the prompt is {len(ids)} tokens; the bundle's max context is {max_context} "
                          f"(shorten the prompt, or convert with a larger --max-context)")


def stream_generate(backend: Backend, tokenizer, prompt_ids: Sequence[int], *, max_new_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop_ids: Sequence[int] = DEFAULT_STOP,
                    vocab_size: int | None = None) -> Iterator[Step | GenerationResult]:
    """Yield a Step per generated token, then one GenerationResult. The stop token is not yielded as text.

    Tokens between `<|channel>` and `<channel|>` stream on the "thought" channel (the channel's own label,
    'thought\\n', is dropped); everything else on "answer"."""
    check_prompt(prompt_ids, vocab_size or 1 << 62, backend.max_context)
    sampler = Sampler(sampling or SamplingParams(greedy=True))
    res = GenerationResult(prompt_tokens=len(prompt_ids))
    if max_new_tokens < 1:
        raise Gemma4Error(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    answer, thought = StreamDetokenizer(tokenizer), StreamDetokenizer(tokenizer)
    channel, raw_thought, shown = "answer", "", 0  # this thought channel's raw text; how much of it streamed
    # The prompt fills len(prompt_ids) KV slots and every token but the last one fed back takes one more.
    budget = min(max_new_tokens, backend.max_context - len(prompt_ids) + 1)

    backend.reset()
    t0 = time.perf_counter()
    logits = backend.prefill(list(prompt_ids))
    token = sampler(logits)
    t1 = time.perf_counter()
    res.prefill_s = t1 - t0
    while True:
        if token in stop_ids:
            res.finish_reason = "stop"
            break
        res.tokens.append(token)
        text = ""
        if token == CHANNEL_OPEN:  # each channel opens with its own 'thought\n' label
            channel, raw_thought, shown, thought = "thought", "", 0, StreamDetokenizer(tokenizer)
        elif channel == "thought":
            raw_thought += thought.flush() if token == CHANNEL_CLOSE else thought.add(token)
            text = _strip_label(raw_thought)[shown:]
            shown += len(text)
            res.thinking += text
            if token == CHANNEL_CLOSE:
                channel = "answer"
        else:
            text = answer.add(token)
            res.text += text
        yield Step(token, text, "thought" if token == CHANNEL_CLOSE else channel)
        if len(res.tokens) >= budget:
            res.finish_reason = "length" if len(res.tokens) >= max_new_tokens else "context"
            break
        logits = backend.decode(token)
        res.decode_steps += 1
        token = sampler(logits)
    res.decode_s = time.perf_counter() - t1
    # An incomplete UTF-8 tail held back at the very end is streamed as is (token None: no new token).
    rest = _strip_label(raw_thought + thought.flush())[shown:]
    if rest:
        res.thinking += rest
        yield Step(None, rest, "thought")
    tail = answer.flush()
    if tail:
        res.text += tail
        yield Step(None, tail, "answer")
    yield res


def _strip_label(raw: str) -> str:
    """Thought text without the 'thought\\n' label that opens the channel (empty while the label streams)."""
    label = "thought\n"
    if label.startswith(raw):
        return ""
    return raw[len(label):] if raw.startswith(label) else raw


def generate(backend: Backend, tokenizer, prompt_ids: Sequence[int], **kw: Any) -> GenerationResult:
    """Non-streaming convenience: run stream_generate to the end and return the result."""
    *_, out = stream_generate(backend, tokenizer, prompt_ids, **kw)
    return out

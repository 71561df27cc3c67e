"""Generation logic: chat formatting, sampling, stop tokens, channels, streaming detokenization."""

import pytest
import torch

from gemma4_coreai.errors import Gemma4Error
from gemma4_coreai.generate import (
    CHANNEL_CLOSE,
    CHANNEL_OPEN,
    EOS,
    TURN_CLOSE,
    GenerationResult,
    Sampler,
    SamplingParams,
    StreamDetokenizer,
    default_stop_ids,
    encode_chat,
    generate,
    render_chat,
    stream_generate,
)
from gemma4_coreai.synth import build_tokenizer, chat_template

V = 512


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class ScriptedBackend:
    """Emits a fixed token script (one-hot logits), recording what it was fed."""

    def __init__(self, script, max_context=64):
        self.script = list(script)
        self.max_context = max_context
        self.fed: list[int] = []

    def _logits(self):
        i = len(self.fed) - self.prompt_len
        t = torch.full((V,), -10.0)
        t[self.script[min(i, len(self.script) - 1)]] = 10.0
        return t

    def reset(self):
        self.fed = []

    def prefill(self, ids):
        self.prompt_len = len(ids)
        self.fed = list(ids)
        return self._logits()

    def decode(self, token):
        self.fed.append(token)
        return self._logits()


def test_chat_prompt_is_exact_gemma4_format(tok):
    tpl = chat_template()
    assert render_chat(tpl, [{"role": "user", "content": "Hi"}]) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    text = render_chat(tpl, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       enable_thinking=True)
    assert text == "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    ids = encode_chat(tok, tpl, "Hi")
    assert ids[:3] == [2, 105, tok.token_to_id("user")] or ids[:2] == [2, 105]
    assert ids[-3:] == [105, tok.token_to_id("model"), 107] or ids[-1] == 107
    assert ids.count(106) == 1 and 1 not in ids


def test_template_cannot_escape_sandbox():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Gemma4Error, match="chat template"):
        render_chat(evil, [{"role": "user", "content": "x"}])


def test_stream_detokenizer_matches_full_decode_and_holds_utf8_tail(tok):
    text = "Hello wörld — naïve café 🌊 done.\nNext line"
    ids = tok.encode(text, add_special_tokens=False).ids
    det = StreamDetokenizer(tok)
    pieces = [det.add(t) for t in ids]
    pieces.append(det.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    # The wave emoji is 4 bytes of byte-fallback tokens: no partial piece may carry U+FFFD.
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some bytes were held back


def test_stream_detokenizer_byte_runs_decode_as_the_tokenizer_does(tok):
    """A valid byte followed by one that makes the run invalid UTF-8: the tokenizer decodes the whole run as
    U+FFFD per byte, so the stream may not have emitted the first one early (it used to emit 'T' here)."""
    byte = {b: tok.token_to_id(f"<0x{b:02X}>") for b in (0x54, 0xF0, 0x86, 0xC3, 0xA9)}
    word = tok.encode(" do", add_special_tokens=False).ids
    for ids in ([*word, byte[0x54], byte[0xF0]], [byte[0x86], byte[0x54], *word, byte[0x54], *word],
                [byte[0xC3], byte[0xA9], *word, byte[0x54]]):
        det = StreamDetokenizer(tok)
        pieces = [det.add(t) for t in ids] + [det.flush()]
        assert "".join(pieces) == tok.decode(ids), ids
    assert tok.decode([byte[0x54], byte[0xF0]]) == "\ufffd\ufffd"  # what made the early 'T' wrong


def test_stream_detokenizer_special_token_inside_a_byte_run(tok):
    """A skipped special token between two byte tokens: decode drops it first, so the bytes on both sides decode
    as one run, and the stream must too."""
    gt, ab, unk = tok.token_to_id("<0x3E>"), tok.token_to_id("<0xAB>"), tok.token_to_id("<unk>")
    ids = [gt, unk, ab]
    det = StreamDetokenizer(tok)
    assert "".join([det.add(t) for t in ids] + [det.flush()]) == tok.decode(ids, skip_special_tokens=True)


def test_stop_tokens_and_result(tok):
    hello = tok.encode("the sea", add_special_tokens=False).ids
    be = ScriptedBackend(hello + [TURN_CLOSE, 7, 7])
    res = generate(be, tok, [2, 105, 107], max_new_tokens=20)
    assert res.finish_reason == "stop"
    assert res.tokens == hello
    assert res.text == "the sea"
    assert be.fed[-1] == hello[-1]  # the stop token is never fed back
    assert res.decode_steps == len(hello)  # the decode call that produced the stop token is timed work too

    be = ScriptedBackend(hello + [EOS])
    assert generate(be, tok, [2], max_new_tokens=20).finish_reason == "stop"
    be = ScriptedBackend(hello + [TURN_CLOSE])
    res = generate(be, tok, [2], max_new_tokens=2)
    assert res.finish_reason == "length" and len(res.tokens) == 2


def test_thought_channel_is_separated(tok):
    thought = tok.encode("thought\nponder waves", add_special_tokens=False).ids
    answer = tok.encode("The sea.", add_special_tokens=False).ids
    be = ScriptedBackend([CHANNEL_OPEN] + thought + [CHANNEL_CLOSE] + answer + [TURN_CLOSE])
    steps = list(stream_generate(be, tok, [2], max_new_tokens=100))
    res = steps[-1]
    assert isinstance(res, GenerationResult)
    assert res.thinking == "ponder waves"
    assert res.text == "The sea."
    streamed_thought = "".join(s.text for s in steps[:-1] if s.channel == "thought")
    streamed_answer = "".join(s.text for s in steps[:-1] if s.channel == "answer")
    assert streamed_thought == "ponder waves" and streamed_answer == "The sea."


def test_every_thought_channel_drops_its_label(tok):
    label = tok.encode("thought\n", add_special_tokens=False).ids
    one, two = (tok.encode(w, add_special_tokens=False).ids for w in ("waves", " tides"))
    answer = tok.encode("The sea.", add_special_tokens=False).ids
    script = [CHANNEL_OPEN, *label, *one, CHANNEL_CLOSE, *answer, CHANNEL_OPEN, *label, *two, CHANNEL_CLOSE]
    steps = list(stream_generate(ScriptedBackend(script + [TURN_CLOSE]), tok, [2], max_new_tokens=100))
    res = steps[-1]
    assert res.thinking == "waves tides" and res.text == "The sea."
    assert "".join(s.text for s in steps[:-1] if s.channel == "thought") == res.thinking


def test_generation_arguments_checked(tok):
    with pytest.raises(Gemma4Error, match="max_new_tokens must be >= 1, got 0"):
        generate(ScriptedBackend([5]), tok, [2], max_new_tokens=0)
    with pytest.raises(Gemma4Error, match="temperature must be a finite number >= 0, got nan"):
        SamplingParams.from_generation_config({"do_sample": True}, temperature=float("nan"))
    with pytest.raises(Gemma4Error, match="top_k must be an integer, got 2.5"):
        SamplingParams.from_generation_config({}, top_k=2.5)


def test_template_repetition_is_bounded():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(Gemma4Error, match="chat template: .*over the template limit"):
        render_chat("{{ 'a' * 10**10 }}", msgs)
    with pytest.raises(Gemma4Error, match="chat template: exponent 100000 is over the template limit"):
        render_chat("{{ 10 ** 100000 }}", msgs)
    assert render_chat("{{ '=' * 3 }}{{ 2 ** 3 }}{{ [0] * 2 }}", msgs) == "===8[0, 0]"


def test_context_limit(tok):
    be = ScriptedBackend([5] * 100, max_context=10)
    res = generate(be, tok, [2, 3, 4], max_new_tokens=50)
    # every KV slot used: 3 prompt tokens + 7 fed back; the 8th token needs no slot
    assert res.finish_reason == "context" and len(res.tokens) == 8 and len(be.fed) == 10
    assert res.decode_steps == 7
    res = generate(be, tok, list(range(10)), max_new_tokens=5)  # a full context still yields its next token
    assert res.finish_reason == "context" and len(res.tokens) == 1 and len(be.fed) == 10
    with pytest.raises(Gemma4Error, match="prompt is 11 tokens; the bundle's max context is 10"):
        generate(be, tok, list(range(11)), max_new_tokens=5)
    with pytest.raises(Gemma4Error, match="token id 600 is out of range for the vocabulary of 512"):
        generate(be, tok, [2, 600], max_new_tokens=5, vocab_size=V)


def test_sampler_greedy_topk_topp_seed():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0, 1.0])
    assert Sampler(SamplingParams(greedy=True))(logits) == 1
    draws = [Sampler(SamplingParams(seed=s, top_k=2))(logits) for s in range(40)]
    assert set(draws) == {1, 2}
    draws = [Sampler(SamplingParams(seed=s, top_p=0.4))(logits) for s in range(40)]
    assert set(draws) == {1}  # top token alone already exceeds 0.4 of the mass
    a = [Sampler(SamplingParams(seed=7, temperature=2.0))(logits) for _ in range(5)]
    b = [Sampler(SamplingParams(seed=7, temperature=2.0))(logits) for _ in range(5)]
    assert a == b


def test_sampling_defaults_from_generation_config():
    gen = {"do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95}
    p = SamplingParams.from_generation_config(gen)
    assert (p.greedy, p.top_k, p.top_p) == (False, 64, 0.95)
    assert SamplingParams.from_generation_config(gen, greedy=True).greedy
    with pytest.raises(Gemma4Error, match="top_p must be in"):
        SamplingParams.from_generation_config(gen, top_p=1.5)


@pytest.mark.parametrize("override", [{"temperature": 1.5}, {"top_k": 5}, {"top_p": 0.9}, {"seed": 3}])
def test_sampling_options_sample_where_the_config_does_not(override):
    """generation_config without do_sample (or false) is greedy, unless the user asks for sampling."""
    for gen in ({}, {"do_sample": False, "temperature": 0.7}):
        assert SamplingParams.from_generation_config(gen).greedy
        assert not SamplingParams.from_generation_config(gen, **override).greedy
        assert SamplingParams.from_generation_config(gen, greedy=True, **override).greedy
    assert SamplingParams.from_generation_config({}, temperature=0.0).greedy  # temperature 0 stays greedy


def test_sampler_leaves_global_rng_alone():
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    Sampler(SamplingParams())  # no seed: one from the OS
    Sampler(SamplingParams(greedy=True))
    assert torch.equal(torch.rand(3), want)


def test_tiny_temperature_is_near_greedy():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0, 1.0])
    for t in (1e-40, 1e-300, 5e-324):
        assert {Sampler(SamplingParams(seed=s, temperature=t))(logits) for s in range(5)} == {1}


def test_default_stop_ids_from_generation_config():
    assert default_stop_ids(None) == (TURN_CLOSE, EOS)
    assert default_stop_ids({"eos_token_id": 391}) == (TURN_CLOSE, EOS, 391)
    assert default_stop_ids({"eos_token_id": [1, 106, 391]}) == (TURN_CLOSE, EOS, 391)


def test_chat_template_environment_matches_transformers():
    """What transformers' apply_chat_template gives a template: loop controls, its tojson (keys in order, no
    escaping), the special tokens, strftime_now; an empty system turn is rendered."""
    msgs = [{"role": "user", "content": "a<b & 'c' é"}]
    assert render_chat("{% for m in messages %}{{ m.role }}{% break %}x{% endfor %}", msgs) == "user"
    assert render_chat("{{ messages[0] | tojson }}", msgs) == '{"role": "user", "content": "a<b & \'c\' é"}'
    assert render_chat("{{ bos_token }}{{ eos_token }}", msgs) == "<bos><eos>"
    assert len(render_chat("{{ strftime_now('%Y-%m-%d') }}", msgs)) == 10
    tpl = chat_template()
    assert render_chat(tpl, [{"role": "system", "content": ""}, *msgs]).startswith("<bos><|turn>system\n<turn|>")


def test_chat_template_errors_are_one_line():
    with pytest.raises(Gemma4Error) as e:
        render_chat("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])
    assert str(e.value).startswith("chat template: TypeError: ") and "\n" not in str(e.value)

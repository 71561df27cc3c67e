#!/usr/bin/env python3
"""Write a synthetic Gemma-4-style tokenizer (tokenizer.json + tokenizer_config.json
+ special_tokens_map.json) with EXACTLY --vocab-size tokens, ids 0..V-1 contiguous.

Why: llama.cpp's Gemma4 converter (conversion/gemma.py, Gemma4Model.set_vocab) uses
gguf.LlamaHfVocab, which requires tokenizer.json with model.type == "BPE",
model.byte_fallback == true and decoder.type == "Sequence", loaded through
transformers.AutoTokenizer (fast). It writes tokenizer.ggml.model = "gemma4"
(llama.cpp BPE vocab: merges REQUIRED). The number of tokens written must equal
the embedding rows (vocab_size) or llama.cpp refuses the token_embd shape, and
Gemma3Model.modify_tensors truncates embed_tokens to len(model.vocab)+len(added_tokens).

Layout (SPM-style BPE like real Gemma): 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>,
then a few Gemma-4 chat specials, 256 byte-fallback tokens <0x00>..<0xFF>, single
characters (incl. U+2581 and '\n'), then tokens produced by BPE merges until V.
Needs only the `tokenizers` package (no sentencepiece, no network).
"""
import argparse
import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
CHAT_SPECIALS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>",
                 "<|tool_response>", "<tool_response|>", "<|\"|>", "<|image>", "<image|>"]


def build(vocab_size: int):
    vocab: dict[str, int] = {}

    def add(tok):
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for t in SPECIALS + CHAT_SPECIALS:
        add(t)
    for b in range(256):
        add(f"<0x{b:02X}>")
    chars = ["\u2581", "\n"] + [chr(c) for c in range(0x21, 0x7F)]  # ▁, newline, printable ASCII
    for c in chars:
        add(c)
    assert len(vocab) < vocab_size, "vocab_size too small"
    merges: list[tuple[str, str]] = []
    # Breadth-first merges: level-1 tokens are chars, level-n tokens = (level n-1 token) + char.
    frontier = [c for c in chars if c != "\n"]  # BPE merges must not contain newlines (llama.cpp asserts)
    base = frontier[:]
    while len(vocab) < vocab_size:
        nxt = []
        for a in frontier:
            for b in base:
                if len(vocab) >= vocab_size:
                    break
                t = a + b
                if t in vocab:
                    continue
                merges.append((a, b))
                add(t)
                nxt.append(t)
            if len(vocab) >= vocab_size:
                break
        frontier = nxt
    assert len(vocab) == vocab_size
    return vocab, merges


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--vocab-size", type=int, default=262144)
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    vocab, merges = build(args.vocab_size)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + CHAT_SPECIALS])
    tok.save(os.path.join(args.outdir, "tokenizer.json"))

    special_map = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
                   "mask_token": "<mask>"}
    cfg = dict(special_map)
    cfg.update({"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                "model_max_length": 131072, "padding_side": "left", "clean_up_tokenization_spaces": False})
    with open(os.path.join(args.outdir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(args.outdir, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2)
    print(f"wrote tokenizer with {len(vocab)} tokens, {len(merges)} merges to {args.outdir}")


if __name__ == "__main__":
    main()

"""The `gemma4-coreai` command: one small `_cmd_<name>(args)` function and one parser block per subcommand.

Every user-facing problem is a Gemma4Error: printed as `error: <message>` on stderr, exit status 2; so is an
OSError (an output path that can't be written: `error: <file>: <reason>`). Numeric options and output paths are
checked before any work (`_check_args`). Ctrl-C exits 130 (outputs are written atomically, so nothing half-written
is left behind); a closed stdout pipe (`... | head`) exits 141 quietly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import Gemma4Error


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---- checks before any work -----------------------------------------------------------------------------

def _check_numbers(args: argparse.Namespace) -> None:
    """Numeric options, by argparse dest (each means the same in every subcommand that has it)."""

    def need(dest: str, ok: Callable[[float], bool], rule: str) -> None:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            opt = "--" + dest.replace("_", "-")
            if isinstance(v, float) and not math.isfinite(v):
                raise Gemma4Error(f"{opt} must be a finite number (got {v})")
            if not ok(v):
                raise Gemma4Error(f"{opt} must be {rule} (got {v})")

    need("seed", lambda v: 0 <= v < 2**63, "in [0, 2**63)")
    for dest in ("max_new_tokens", "tokens", "oracle_tokens", "max_context", "prompt_len", "gen_len", "repeats"):
        need(dest, lambda v: v >= 1, ">= 1")
    need("warmup", lambda v: v >= 0, ">= 0")
    need("temperature", lambda v: v >= 0, ">= 0 (0 = greedy)")
    need("top_k", lambda v: v >= 0, ">= 0 (0 = off)")
    need("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    need("tie_gap", lambda v: v >= 0, ">= 0")


def check_out_path(path: Path, force: bool = False, file: bool = False) -> None:
    """Refuse an output path whose nearest existing parent is not a directory; with file=True (a file output) also
    a directory, or an existing file without force. Never a device, FIFO or socket, with or without force."""
    if str(path) in ("", "."):
        raise Gemma4Error(f"output path {str(path)!r}: name a new file or directory")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise Gemma4Error(f"{path}: not a regular file or directory (a device, FIFO or socket); choose another path")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise Gemma4Error(f"{path}: {parent} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise Gemma4Error(f"{path}: no permission to write in {parent}")
    if file and path.is_dir():
        raise Gemma4Error(f"{path}: is a directory (expected a file name)")
    if file and path.exists() and not force:
        raise Gemma4Error(f"{path}: already exists (use --force to overwrite)")


def _check_args(args: argparse.Namespace) -> None:
    _check_numbers(args)
    for path in (getattr(args, "out", None), getattr(args, "dir", None)):
        if path is not None:
            check_out_path(path)


def _check_checkpoint_src(src: str) -> None:
    """A missing source that looks local (./x, /x, ~/x, or a/b where a/ exists here) is not a hub id."""
    p = Path(src).expanduser()
    if not p.exists() and (src.startswith((".", "/", "~")) or ("/" in src and p.parent.is_dir())):
        raise Gemma4Error(f"{src}: no such checkpoint directory")


def _check_text(args: argparse.Namespace, *dests: str) -> None:
    """Text options must be valid UTF-8 (a shell can pass other bytes; the tokenizer only takes str)."""
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise Gemma4Error(f"--{dest.replace('_', '-')}: not valid UTF-8 text") from None


# ---- synth ----------------------------------------------------------------------------------------------

def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import synthesize

    out = synthesize(args.shape, args.out, seed=args.seed, hub_layout=args.hub_layout,
                     prune_shared_kv=args.prune_shared_kv, progress=not args.quiet, force=args.force)
    print(f"wrote {out} ({_size(out) / 1024**3:.3f} GiB)")
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="write a synthetic QAT-like checkpoint (HF layout)",
        description="Write a synthetic Gemma 4 checkpoint in the Hugging Face layout: config.json, bf16 "
                    "safetensors (sharded for e2b/e4b), tokenizer, chat template, generation config. Every "
                    "quantized tensor lies exactly on its lattice (q4_0 for linears and the embedding, int8 rows "
                    "for the PLE table), so conversion is lossless. Deterministic for a seed.")
    p.add_argument("--shape", required=True, metavar="tiny|e2b|e4b|CONFIG.json",
                   help="a preset shape, or a config.json (HF gemma4 / gemma4_text) for a custom size")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="DIR", help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed in [0, 2**63) (default 0)")
    p.add_argument("--hub-layout", action="store_true",
                   help="the hub's multimodal layout: 'gemma4' config wrapping text_config, tensors under "
                        "model.language_model. (default: text-only 'gemma4_text', tensors under model.)")
    p.add_argument("--prune-shared-kv", action="store_true",
                   help="omit the unused k_proj/v_proj/k_norm of KV-shared layers, like the QAT release "
                        "(default: write them, like the non-QAT release)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is an earlier checkpoint (or empty)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)


# ---- convert --------------------------------------------------------------------------------------------

def _check_oracle_fits(ckpt, args: argparse.Namespace) -> None:
    """verify decodes max(--oracle-tokens, its 24-token determinism probe) greedy tokens after the oracle's prompt:
    they must fit the bundle's max context (checked before converting, not by a failing verify later)."""
    from .bundle import default_max_context, load_tokenizer
    from .generate import encode_chat

    max_context = args.max_context or default_max_context(ckpt.config)
    tpl = ckpt.chat_template_path
    if ckpt.tokenizer_path is None or tpl is None:
        return  # no chat template file: the oracle is skipped (or the template is in tokenizer_config.json)
    tok = load_tokenizer(ckpt.tokenizer_path)
    n, prompt = args.oracle_tokens, len(encode_chat(tok, tpl.read_text(), args.oracle_prompt))
    from .oracle import PROBE_TOKENS

    k = max(n, PROBE_TOKENS)
    if prompt + k > max_context:
        probe = " (verify's determinism probe)" if n < PROBE_TOKENS else ""
        raise Gemma4Error(f"--oracle-tokens {n}: the oracle's {prompt}-token prompt plus {k} greedy tokens{probe} "
                          f"need a context of {prompt + k}, but the max context is {max_context}; raise "
                          "--max-context, lower --oracle-tokens or pass --no-oracle")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .bundle import Bundle, convert
    from .checkpoint import Checkpoint
    from .oracle import convert_hook

    _check_checkpoint_src(args.src)
    src, hook = args.src, None
    if not args.no_oracle:
        if args.out.exists() and not args.force:  # before a hub download
            raise Gemma4Error(f"{args.out}: already exists (use --force to overwrite)")
        src = Checkpoint.open(args.src)
        _check_text(args, "oracle_prompt")
        _check_oracle_fits(src, args)
        hook = convert_hook(n_tokens=args.oracle_tokens, prompt=args.oracle_prompt)
    out = convert(src, args.out, force=args.force, max_context=args.max_context, progress=not args.quiet,
                  oracle_hook=hook)
    b = Bundle.open(out)
    s = b.lattice.get("summary", {})
    print(f"wrote {out} ({_size(out) / 1024**3:.3f} GiB, max context {b.max_context})")
    if s:
        off = s["off_lattice_tensors"]
        print(f"lattice: {100 * s['exact_fraction']:.4f}% of {s['blocks']:,} blocks exact, worst relative error "
              f"{s['worst_rel_err']:.3g}" + (f", {len(off)} off-lattice tensors (see inspect)" if off else ""))
    if b.oracle:
        print(f"oracle: {len(b.oracle['reference_ids'])} fp32 reference tokens stored (run `gemma4-coreai verify "
              f"{out}`)")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="checkpoint -> verified q4_0 bundle",
        description="Stream a Gemma 4 checkpoint (local directory or hub id org/name) into a bundle: q4_0 "
                    "linears and untied int4 head (weights.safetensors), 16-bit embedding, int8 PLE table "
                    "(embed_per_layer.i8 + .scale.f32), tokenizer and manifest with sha256 of every file and the "
                    "lattice report. Written atomically: OUT appears only when complete.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory or hub id (org/name)")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="OUT", help="bundle directory to create")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is an earlier bundle or empty (only after success)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="context length the bundle is built for (default: min(max_position_embeddings, 4096))")
    p.add_argument("--oracle-tokens", type=int, default=32, metavar="N",
                   help="greedy tokens of the fp32 HF reference stored as the bundle's oracle (default 32; with the "
                        "prompt they must fit the max context)")
    from .oracle import DEFAULT_PROMPT

    p.add_argument("--oracle-prompt", default=DEFAULT_PROMPT, metavar="TEXT",
                   help=f"user prompt of the oracle, chat-formatted (default {DEFAULT_PROMPT!r})")
    p.add_argument("--no-oracle", action="store_true",
                   help="skip the fp32 reference (it needs ~4 bytes per parameter of RAM; skipped automatically "
                        "when that does not fit)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)


# ---- inspect --------------------------------------------------------------------------------------------

def _cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import format_inspect, inspect

    _check_checkpoint_src(args.path)
    info = inspect(args.path, progress=not args.json)
    print(json.dumps(info, indent=1) if args.json else format_inspect(info))
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="describe a bundle or a checkpoint",
        description="Print a bundle's or checkpoint's config, parameter and byte counts, the bandwidth model's "
                    "bytes per decode step, and the lattice report (fraction of q4_0 / int8 blocks reproduced "
                    "exactly; for a checkpoint it is computed now, streaming).")
    p.add_argument("path", metavar="SRC|BUNDLE", help="bundle directory, checkpoint directory or hub id")
    p.add_argument("--json", action="store_true", help="machine-readable JSON")
    p.set_defaults(func=_cmd_inspect)


# ---- shared backend options -----------------------------------------------------------------------------

def _add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", default="torch", choices=("torch", "fast", "coreai"),
                   help="torch (stock model on CPU/CUDA, default); fast (CUDA only: int4 GEMV kernels, compiled "
                        "decode with CUDA graphs, compiled prefill, bf16; the first run of a process compiles for 2-4 "
                        "minutes); or coreai (an .aimodel written by export-coreai, on the Core AI runtime)")
    g.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="torch device (default: cpu; fast: cuda)")
    g.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="torch compute dtype (default: fp32 on cpu, bf16 on cuda; fp16 on cuda only)")
    g.add_argument("--ple-mode", default=None, choices=("provider", "tbl"),
                   help="per-layer embeddings: provider = rows gathered from the memory-mapped int8 table each "
                        "step (default on cpu); tbl = table resident on the device, gathered in-graph (default on "
                        "cuda)")
    g.add_argument("--linear", default="stock", choices=("stock", "cpu-int4", "cpu-int4-f32"),
                   help="torch cpu: int4 matmul strategy. stock = dequantize + matmul (reference numerics); "
                        "cpu-int4 = native AVX2 q4_0 kernel with int8 activations like llama.cpp (fast, "
                        "approximate); cpu-int4-f32 = the same kernel with fp32 activations (exact)")
    g.add_argument("--compile", action="store_true",
                   help="torch cpu with --linear cpu-int4[-f32]: compile the one-token decode step with "
                        "torch.compile (E4B on 2 cores: ~9 instead of 6.5 tok/s, after 2-4 minutes of compiling at "
                        "the first decode step; with GEMMA4_COMPILE=regional about 1 minute, for ~7.7 tok/s)")
    g.add_argument("--export", type=Path, default=None, metavar="OUT",
                   help="with --backend coreai: the export-coreai output directory")


def _exported_from(source: dict, manifest: dict) -> bool:
    """Whether an export's metadata `source` names this bundle: its weights' sha256 (exports before that field:
    its creation time)."""
    sha = manifest["files"]["weights.safetensors"].get("sha256")
    if source.get("bundle_weights_sha256") is not None:
        return source["bundle_weights_sha256"] == sha
    return source.get("bundle_created") == manifest.get("created")


def _check_backend_flags(args: argparse.Namespace) -> None:
    """Options the chosen backend would silently ignore."""
    if args.backend == "coreai":
        for flag, value in (("--dtype", args.dtype), ("--linear", None if args.linear == "stock" else args.linear)):
            if value is not None:
                raise Gemma4Error(f"{flag} {value} is for the torch backends; --backend coreai runs the exported "
                                  "graph as it was built")
    elif args.export is not None:
        raise Gemma4Error(f"--export is for --backend coreai (got --backend {args.backend})")


def _backend(args: argparse.Namespace, bundle):
    from .backends import load_backend

    if args.compile and args.backend != "torch":
        raise Gemma4Error(f"--compile is for --backend torch (the {args.backend} backend compiles on its own or not "
                          "at all)")
    if args.backend == "coreai":
        backend = load_backend(bundle, "coreai", export=args.export, ple_mode=args.ple_mode, device=args.device)
        if not _exported_from(backend.metadata.get("source", {}), bundle.manifest):
            raise Gemma4Error(f"{args.export}: exported from another bundle than {bundle.path} (its tokenizer, oracle "
                              "and tables would not match the graph); export this bundle or pass the right one")
        return backend
    if args.backend == "fast":
        backend = load_backend(bundle, "fast", device=args.device, dtype=args.dtype, ple_mode=args.ple_mode,
                               linear_strategy=args.linear)
        print("gemma4-coreai: the first prefill and the first decode step compile the model (2-4 minutes for E4B; "
              "later runs reuse torch's cache; GEMMA4_COMPILE=regional compiles per kind of layer, faster)",
              file=sys.stderr)
        return backend
    backend = load_backend(bundle, "torch", device=args.device or "cpu", dtype=args.dtype, ple_mode=args.ple_mode,
                           linear_strategy=args.linear, compile=args.compile)
    if args.compile:
        print("gemma4-coreai: the first decode step compiles the model (2-4 minutes for E4B on 2 cores; "
              "GEMMA4_COMPILE=regional: about 1 minute, a slower step)", file=sys.stderr)
    return backend


# ---- generate -------------------------------------------------------------------------------------------

def _parse_ids(text: str) -> list[int]:
    ids = []
    for part in text.replace(",", " ").split():  # "2,5,7", "2 5 7" or "2, 5, 7"
        try:
            ids.append(int(part))
        except ValueError:
            raise Gemma4Error(f"--prompt-ids: {part!r} is not an integer token id") from None
    if not ids:
        raise Gemma4Error("--prompt-ids: no token ids given")
    return ids


def _cmd_generate(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .generate import BOS, GenerationResult, SamplingParams, default_stop_ids, encode_chat, stream_generate

    if args.prompt_ids is not None and args.chat:
        raise Gemma4Error("--chat formats --prompt text; --prompt-ids are fed as they are (drop one)")
    for flag, given in (("--system", args.system is not None), ("--think", args.think)):
        if given and not args.chat:
            raise Gemma4Error(f"{flag} is part of the chat template: add --chat (with --prompt)")
    if args.greedy:
        for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
                            ("--seed", args.seed)):
            if value is not None:
                raise Gemma4Error(f"{flag} is for sampling; --greedy takes the argmax (drop one)")
    _check_text(args, "prompt", "system")
    _check_backend_flags(args)
    b = Bundle.open(args.bundle)
    bad_stop = [t for t in args.stop_ids or () if not 0 <= t < b.config.vocab_size]
    if bad_stop:
        raise Gemma4Error(f"--stop-ids: {bad_stop[0]} is out of range for vocab size {b.config.vocab_size}")
    tok = b.tokenizer()
    if args.prompt_ids is not None:
        ids = _parse_ids(args.prompt_ids)
    elif args.chat:
        if not b.chat_template:
            raise Gemma4Error(f"{b.path}: the bundle has no chat template; drop --chat or pass --prompt-ids")
        ids = encode_chat(tok, b.chat_template, args.prompt, system=args.system, enable_thinking=args.think)
    else:
        ids = [BOS] + tok.encode(args.prompt, add_special_tokens=False).ids
    sampling = SamplingParams.from_generation_config(
        b.generation_config or {}, greedy=True if args.greedy else None, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stop = tuple(args.stop_ids) if args.stop_ids else default_stop_ids(b.generation_config)
    backend = _backend(args, b)
    result = None
    in_thought = False
    for ev in stream_generate(backend, tok, ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                              stop_ids=stop, vocab_size=b.config.vocab_size):
        if isinstance(ev, GenerationResult):
            result = ev
        elif not args.json and ev.text:
            if ev.channel == "thought":
                if not in_thought:
                    print("[thinking] ", end="", file=sys.stderr)
                in_thought = True
                print(ev.text, end="", file=sys.stderr, flush=True)
            else:
                if in_thought:
                    print("\n[/thinking]", file=sys.stderr)
                in_thought = False
                print(ev.text, end="", flush=True)
    assert result is not None
    if args.json:
        print(json.dumps({"prompt_ids": ids, **result.to_dict()}, indent=1))
    else:
        print()
        print(f"[{len(result.tokens)} tokens, {result.finish_reason}; prefill {result.prompt_tokens} tokens at "
              f"{result.prefill_tps:.1f} tok/s, decode {result.decode_tps:.1f} tok/s; "
              f"{getattr(backend, 'describe', lambda: args.backend)()}]", file=sys.stderr)
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a bundle (streaming)",
        description="Generate from a bundle, streaming text as it is decoded. --chat formats the prompt with the "
                    "bundle's chat template (a thought channel, if the model opens one, goes to stderr). "
                    "Sampling defaults come from the bundle's generation_config.json; --greedy overrides them.")
    p.add_argument("bundle", metavar="BUNDLE", type=Path, help="bundle directory (from convert)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text")
    src.add_argument("--prompt-ids", metavar="IDS",
                     help="token ids separated by commas or spaces, fed as is (e.g. 2,105,...)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template (one user turn)")
    p.add_argument("--system", metavar="TEXT", default=None, help="with --chat: a system turn first")
    p.add_argument("--think", action="store_true", help="with --chat: ask for thinking (<|think|>)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="at least 1 (default 256)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature >= 0; 0 = greedy (default: the bundle's generation_config, else 1). "
                        "Any of --temperature, --top-k, --top-p, --seed samples even where generation_config "
                        "says do_sample false")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample from the K most likely tokens; 0 = off (default: generation_config, else 0)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling mass in (0, 1]; 1 = off (default: generation_config, else 1)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="sampling seed in [0, 2**63) (reproducible output; default: random)")
    p.add_argument("--stop-ids", type=int, nargs="+", default=None, metavar="ID",
                   help="stop token ids, replacing the default: 106 <turn|>, 1 <eos> and the bundle's "
                        "generation_config eos_token_id")
    p.add_argument("--json", action="store_true", help="print one JSON object: token ids, text, timings")
    _add_backend_args(p)
    p.set_defaults(func=_cmd_generate)


# ---- verify ---------------------------------------------------------------------------------------------

def _cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .oracle import default_tie_gap, format_report, make_oracle, verify

    _check_backend_flags(args)
    b = Bundle.open(args.bundle, verify_hashes=True)  # verify is the integrity check: every file's sha256 too
    if args.reference is not None:
        from .checkpoint import Checkpoint

        _check_checkpoint_src(args.reference)
        ckpt = Checkpoint.open(args.reference).validate()
        if ckpt.config != b.config:
            field = next(k for k, v in b.config.to_dict().items() if ckpt.config.to_dict()[k] != v)
            raise Gemma4Error(f"{args.reference}: not this bundle's model (config field '{field}' is "
                              f"{ckpt.config.to_dict()[field]!r}, the bundle has {b.config.to_dict()[field]!r})")
        if not b.chat_template:
            raise Gemma4Error(f"{b.path}: the bundle has no chat template, which the reference needs to format "
                              "its prompt")
        oracle = make_oracle(ckpt.path, b.tokenizer(), b.chat_template,
                             n_tokens=args.tokens or 32, log=lambda m: print(m, file=sys.stderr))
        if oracle is None:
            raise Gemma4Error("the fp32 reference does not fit in this machine's memory (see the message above)")
    elif b.oracle:
        oracle = b.oracle
        _check_oracle_prompt(b, oracle)
    else:
        raise Gemma4Error(f"{b.path}: the bundle holds no oracle (converted with --no-oracle or without enough "
                          "RAM); pass --reference SRC to run the fp32 reference now")
    backend = _backend(args, b)
    probe = None
    if args.probe_backend:
        from .backends import load_backend

        probe = load_backend(b, "torch", device=args.probe_backend)
    tie_gap = args.tie_gap if args.tie_gap is not None else default_tie_gap(backend)  # --tie-gap: _check_numbers
    report = verify(backend, oracle, tokens=args.tokens, probe_backend=probe, tie_gap=tie_gap)
    report["backend"] = getattr(backend, "describe", lambda: args.backend)()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"verify {b.path} on {report['backend']}")
        print(format_report(report))
    return 0 if report["passed"] else 1


def _check_oracle_prompt(b, oracle: dict) -> None:
    """The stored record's prompt ids must be this bundle's chat encoding of its prompt text: a record from
    another tokenizer or template is refused before anything runs."""
    from .generate import encode_chat

    prompt = oracle.get("prompt") if isinstance(oracle, dict) else None
    if isinstance(prompt, str) and b.chat_template:
        if encode_chat(b.tokenizer(), b.chat_template, prompt) != oracle.get("prompt_ids"):
            raise Gemma4Error(f"{b.path}: the oracle's prompt_ids are not this bundle's chat encoding of its prompt "
                              "(a record from another tokenizer or chat template)")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="check a bundle token-exact against the fp32 HF reference",
        description="Greedy decoding on a backend against the bundle's oracle (recorded from the fp32 Hugging "
                    "Face reference at convert time) or against --reference SRC run now: free-running tokens and "
                    "the teacher-forced argmax at every position must match; a mismatch where the reference's "
                    "top-2 gap is below the tie gap is a tie (reported, not failed): 0.1 on fp32 backends "
                    "(DESIGN's margin rule), 0.75 on bf16/fp16 torch and fast backends, whose logits sit up to "
                    "~0.7 from fp32 on the synthetic models (HF's own bf16 run is as far off). A determinism probe "
                    "(24 greedy tokens twice, or against --probe-backend) must be identical. Exit 0 only on a "
                    "pass.")
    p.add_argument("bundle", metavar="BUNDLE", type=Path, help="bundle directory")
    p.add_argument("--reference", metavar="SRC", default=None,
                   help="run the fp32 reference on this checkpoint now instead of using the stored oracle")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="compare the first N >= 1 tokens (default: all the oracle holds)")
    p.add_argument("--probe-backend", default=None, choices=("cpu", "cuda"),
                   help="determinism probe against the torch backend on this device (default: a second run)")
    p.add_argument("--tie-gap", type=float, default=None, metavar="G",
                   help="margin rule: a mismatch is a tie where the picked token's reference logit is within G "
                        "(finite, >= 0) of the reference's top-1; the record lists the tokens within 1.0 "
                        "(default 0.1; 0.75 for bf16/fp16 backends)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_backend_args(p)
    p.set_defaults(func=_cmd_verify)


# ---- demo -----------------------------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    import time

    from .backends import TorchBackend
    from .bundle import Bundle, convert
    from .generate import GenerationResult, SamplingParams, default_stop_ids, encode_chat, stream_generate
    from .oracle import convert_hook, verify
    from .synth import synthesize

    t0 = time.perf_counter()
    if args.dir is not None and args.dir.exists() and not args.force:
        raise Gemma4Error(f"{args.dir} already exists; pass --force to replace it")
    root = args.dir or Path(tempfile.mkdtemp(prefix="gemma4-coreai-demo-"))
    try:
        print("gemma4-coreai demo: the weights below are SYNTHETIC (random, on the q4_0 QAT lattice), so the\n"
              "reply is gibberish by design; every number is real.\n")
        print("1/4 synth: a tiny Gemma 4 checkpoint (8 layers, KV sharing, sliding + full attention, PLE)")
        ckpt = synthesize("tiny", root / "checkpoint", seed=args.seed, progress=False, force=True)
        print("2/4 convert: q4_0 bundle + fp32 Hugging Face oracle (greedy, 32 tokens)")
        out = convert(ckpt, root / "bundle", force=True, progress=False,
                      oracle_hook=convert_hook(n_tokens=32, log=lambda m: None))
        b = Bundle.open(out)
        print("3/4 verify: torch backend on cpu against the fp32 reference, both PLE modes")
        results = {}
        for mode in ("provider", "tbl"):
            rep = verify(TorchBackend.from_bundle(b, ple_mode=mode), b.oracle)
            fr = rep["free_running"]
            results[mode] = rep["passed"]
            verdict = "PASS" if rep["passed"] else "FAIL"
            print(f"    {mode:8s}: {verdict} - {fr['matched']}/{fr['tokens']} greedy tokens, "
                  f"teacher-forced {rep['teacher_forced']['positions']} positions, max |logit err| "
                  f"{fr['max_top1_logit_err']:.1e}, determinism {rep['determinism']['identical_tokens']}/24")
        prompt = "Write a short poem about the sea."
        print(f"4/4 generate: chat reply to {prompt!r} (streamed, sampled with seed {args.seed})\n")
        ids = encode_chat(b.tokenizer(), b.chat_template, prompt)
        sampling = SamplingParams.from_generation_config(b.generation_config or {}, seed=args.seed)
        res = None
        for ev in stream_generate(TorchBackend.from_bundle(b), b.tokenizer(), ids, max_new_tokens=48,
                                  sampling=sampling, stop_ids=default_stop_ids(b.generation_config),
                                  vocab_size=b.config.vocab_size):
            if isinstance(ev, GenerationResult):
                res = ev
            else:
                print(ev.text, end="", flush=True)
        print("\n")
        lat = b.lattice["summary"]
        size = _size(out)
        print("report")
        print(f"  bundle        {out} ({size / 1024**2:.2f} MiB)")
        print(f"  lattice       {100 * lat['exact_fraction']:.2f}% of {lat['blocks']:,} blocks reproduced exactly")
        verdict = "PASS" if all(results.values()) else "FAIL"
        print(f"  oracle        {verdict} (provider and tbl, token-exact vs fp32 HF)")
        print(f"  speed (cpu)   prefill {res.prefill_tps:.0f} tok/s, decode {res.decode_tps:.0f} tok/s")
        print(f"  total time    {time.perf_counter() - t0:.1f} s")
        print("\nA real checkpoint (needs the weights on disk or a network, and ~30 GB RAM for the fp32 oracle):\n"
              "  gemma4-coreai convert google/gemma-4-E4B-it-qat-q4_0-unquantized -o e4b\n"
              "  gemma4-coreai verify e4b\n"
              "  gemma4-coreai generate e4b --chat --prompt 'Write a short poem about the sea.'")
        return 0 if all(results.values()) else 1
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.dir is None:
            print(f"(kept {root})")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="synth -> convert -> verify -> chat, on a tiny synthetic model (start here)",
        description="The whole pipeline on an embedded tiny synthetic checkpoint, in under two minutes on two CPU "
                    "cores: synthesize, convert (with the fp32 oracle), verify on the torch backend, stream a chat "
                    "reply, and print a short report.")
    p.add_argument("--dir", type=Path, default=None, metavar="DIR",
                   help="work directory to keep (default: a temporary one, removed at the end)")
    p.add_argument("--force", action="store_true",
                   help="use --dir even if it exists: its checkpoint/ and bundle/ are replaced, other files kept")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the synthetic weights and the sampling, in [0, 2**63) (default 0)")
    p.set_defaults(func=_cmd_demo)


# ---- export-coreai and bench (their parsers live next to their code) --------------------------------------

def _add_export(sub: argparse._SubParsersAction) -> None:
    from .export_coreai import add_export_parser, run_export

    add_export_parser(sub).set_defaults(func=run_export)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import add_bench_parser

    add_bench_parser(sub)


# ---- main -----------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_synth, _add_convert, _add_inspect, _add_generate, _add_verify, _add_export, _add_bench]


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (the subcommand parsers are made from the same class)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gemma4-coreai",
        description="Gemma 4 E4B/E2B text decoders: synthetic QAT-like checkpoints, verified q4_0 bundles, "
                    "Core AI export and a fast runtime.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _quiet_third_party() -> None:
    """torchao (pulled in by coreai-opt) logs a warning per CUDA library it can't load on CPU machines; the Core AI
    exporter's pytree specs trigger torch's LeafSpec deprecation (FutureWarning, 2 lines) on every export."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


def _stdout_to_devnull() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush can't raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        _quiet_third_party()
        args = build_parser().parse_args(argv)  # imports torch: Ctrl-C can land here too
        _check_args(args)
        return args.func(args)
    except Gemma4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`generate ... | head`): stop quietly, like SIGPIPE would
        _stdout_to_devnull()
        return 141
    except OSError as e:  # an output that can't be written: parent is a file, no permission, disk full
        print(f"error: {_os_error_path(e, getattr(args, 'out', None))}{e.strerror or e}", file=sys.stderr)
        return 2


def _os_error_path(e: OSError, out: Path | None) -> str:
    """The path to name: the output itself for a failed write (a full disk names no file) or for its temporary
    siblings (`OUT.tmp-PID`, `OUT.old-PID`, `.OUT.tmp-PID`: names the user never asked for), else the file the
    error names."""
    if out is not None:
        temps = (f"{out}.tmp-", f"{out}.old-", str(out.parent / f".{out.name}.tmp-"))
        if not e.filename or str(e.filename).startswith(temps):
            return f"{out}: "
    return f"{e.filename}: " if e.filename else ""


if __name__ == "__main__":
    sys.exit(main())

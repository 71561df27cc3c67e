"""The `gemma4-coreai` command: one small `_cmd_<name>(args)` function and one parser block per subcommand.

Every user-facing problem is a Gemma4Error: printed as `error: <message>` on stderr, exit status 2.
Ctrl-C exits 130 (outputs are written atomically, so nothing half-written is left behind).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import Gemma4Error


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


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
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--hub-layout", action="store_true",
                   help="the hub's multimodal layout: 'gemma4' config wrapping text_config, tensors under "
                        "model.language_model. (default: text-only 'gemma4_text', tensors under model.)")
    p.add_argument("--prune-shared-kv", action="store_true",
                   help="omit the unused k_proj/v_proj/k_norm of KV-shared layers, like the QAT release "
                        "(default: write them, like the non-QAT release)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)


# ---- convert --------------------------------------------------------------------------------------------

def _cmd_convert(args: argparse.Namespace) -> int:
    from .bundle import Bundle, convert

    out = convert(args.src, args.out, force=args.force, max_context=args.max_context, progress=not args.quiet)
    b = Bundle.open(out)
    s = b.lattice.get("summary", {})
    print(f"wrote {out} ({_size(out) / 1024**3:.3f} GiB, max context {b.max_context})")
    if s:
        off = s["off_lattice_tensors"]
        print(f"lattice: {100 * s['exact_fraction']:.4f}% of {s['blocks']:,} blocks exact, worst relative error "
              f"{s['worst_rel_err']:.3g}" + (f", {len(off)} off-lattice tensors (see inspect)" if off else ""))
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
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only after success)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="context length the bundle is built for (default: min(max_position_embeddings, 4096))")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)


# ---- inspect --------------------------------------------------------------------------------------------

def _cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import format_inspect, inspect

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


# ---- main -----------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_synth, _add_convert, _add_inspect]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma4-coreai",
        description="Gemma 4 E4B/E2B text decoders: synthetic QAT-like checkpoints, verified q4_0 bundles, "
                    "Core AI export and a fast runtime.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Gemma4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

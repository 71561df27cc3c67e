#!/usr/bin/env bash
# CPU comparison on this machine's cores, in one run: llama.cpp's CPU build (same sdist source as compare_gpu.sh)
# on a Q4_0 GGUF of the E4B-shaped synthetic checkpoint, then gemma4-coreai bench on the bundle of the same
# checkpoint with the native int4 kernel (--engine cpu-int4: q8 activations, decode step compiled with torch.compile;
# the same with --no-compile: eager decode; cpu-int4-f32: fp32 activations, compiled), then the stock torch engine
# (short: it dequantizes every linear per call), then llama.cpp again (drift check). Compile time is reported
# (compile_s) and excluded from the timings.
#
#   benchmarks/compare_cpu.sh CKPT_DIR BUNDLE_DIR [WORKDIR]
# Environment: LLAMA_BUILD (a llama.cpp CPU build dir holding bin/llama-bench and bin/llama-quantize; default:
# build one from LLAMA_SRC / the sdist like compare_gpu.sh), LLAMA_SRC_DIR, PYTHON, THREADS (default nproc),
# PROMPT (128), GEN (16), REPEATS (2). The GGUF is kept in WORKDIR (e4b-q4_0.gguf, 5.2 GB); making it needs
# ~15 GB of temporary disk (the bf16 GGUF, deleted after quantizing).
set -uo pipefail
CKPT=$(cd "$1" && pwd); BUNDLE=$(cd "$2" && pwd); W=${3:-/tmp/g4cpu}; mkdir -p "$W"; W=$(cd "$W" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
T=${THREADS:-$(nproc)}
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
B=${LLAMA_BUILD:-$W/llama-build}
if [ ! -x "$B/bin/llama-bench" ]; then
  STAGES="fetch" bash "$REPO/benchmarks/compare_gpu.sh" "$W" >/dev/null
  cmake -S "$W/llama-src" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF >/dev/null &&
  cmake --build "$B" --target llama-bench llama-quantize -j "$T" >/dev/null || exit 1
fi
if [ ! -f "$W/e4b-q4_0.gguf" ]; then
  SRC=${LLAMA_SRC_DIR:-$W/llama-src}  # the converter is only needed to make the GGUF
  [ -f "$SRC/convert_hf_to_gguf.py" ] || { STAGES="fetch" bash "$REPO/benchmarks/compare_gpu.sh" "$W" >/dev/null; SRC=$W/llama-src; }
  rm -rf "$W/gguf-src" && mkdir -p "$W/gguf-src"
  for f in "$CKPT"/*; do case "$(basename "$f")" in tokenizer*|special_tokens_map.json) ;; *) ln -s "$f" "$W/gguf-src/";; esac; done
  "$PY" "$REPO/benchmarks/llama_tokenizer.py" "$W/gguf-src" --vocab-size 262144 >/dev/null
  (cd "$SRC" && PYTHONPATH="$SRC/gguf-py:$PYTHONPATH" "$PY" convert_hf_to_gguf.py "$W/gguf-src" --outtype bf16 \
     --outfile "$W/e4b-bf16.gguf") >"$W/gguf-convert.log" 2>&1 || { tail "$W/gguf-convert.log"; exit 1; }
  "$B/bin/llama-quantize" "$W/e4b-bf16.gguf" "$W/e4b-q4_0.gguf" Q4_0 >"$W/quantize.log" 2>&1 || exit 1
  rm -f "$W/e4b-bf16.gguf"
fi
P=${PROMPT:-128}; G=${GEN:-16}; R=${REPEATS:-2}
llama() {
  "$B/bin/llama-bench" -m "$W/e4b-q4_0.gguf" -p "$P" -n "$G" -t "$T" -r "$R" -o json >"$W/llama-cpu$1.json" 2>"$W/llama-cpu$1.log"
  "$PY" -c "import json,sys; [print(f\"llama.cpp {'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']}: {r['avg_ts']:.2f} tok/s\") for r in json.load(open(sys.argv[1]))]" "$W/llama-cpu$1.json"
}
date -u; uname -m; nproc; grep -m1 'model name' /proc/cpuinfo; uptime
echo "=== llama.cpp CPU ($T threads): llama-bench -p $P -n $G -t $T -r $R"
llama ""
for run in cpu-int4 cpu-int4:--no-compile cpu-int4-f32; do
  e=${run%%:*}; extra=${run#"$e"}; extra=${extra#:}; name=$e${extra:+-eager}
  echo "=== gemma4-coreai CPU --engine $e $extra"; uptime
  "$PY" -m gemma4_coreai.bench "$BUNDLE" --device cpu --engine "$e" $extra --prompt-len "$P" --gen-len "$G" \
    --repeats "$R" -o "$W/ours-$name.json" --force
done
echo "=== gemma4-coreai CPU --engine stock (short)"
"$PY" -m gemma4_coreai.bench "$BUNDLE" --device cpu --engine stock ${STOCK_ARGS:---prompt-len 16 --gen-len 3 --repeats 1 --warmup 0} \
  -o "$W/ours-stock.json" --force
echo "=== llama.cpp CPU again (drift check)"; uptime
llama "-2"
"$PY" - "$W" <<'PYEOF'
import json, sys
w = sys.argv[1]
ll = [json.load(open(f"{w}/llama-cpu{s}.json")) for s in ("", "-2")]
lpp = sum(r["avg_ts"] for l in ll for r in l if r["n_prompt"]) / 2
ltg = sum(r["avg_ts"] for l in ll for r in l if r["n_gen"]) / 2
for e in ("cpu-int4", "cpu-int4-eager", "cpu-int4-f32", "stock"):
    r = json.load(open(f"{w}/ours-{e}.json"))
    row = r["results"][0]
    lin = row["bytes_per_decode_step"]["linears"]
    dec = row.get("decode_tps", {}).get("median", float("nan"))
    print(f"{e:>14}: prefill {row['prefill_tps']['median']:.2f} tok/s ({row['prefill_tps']['median'] / lpp:.2f}x llama.cpp "
          f"{lpp:.2f}), decode {dec:.2f} tok/s ({dec / ltg:.2f}x llama.cpp {ltg:.2f}); "
          f"int4 linears {lin * dec / 1e9:.1f} GB/s; compile {r['compile_s']:.0f} s")
PYEOF

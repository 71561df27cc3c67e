#!/usr/bin/env bash
# CPU comparison on this machine's cores: gemma4-coreai bench (stock torch engine) vs llama.cpp's CPU build
# (same sdist source as compare_gpu.sh) on a Q4_0 GGUF of the same E4B-shaped synthetic checkpoint.
#
#   benchmarks/compare_cpu.sh CKPT_DIR BUNDLE_DIR [WORKDIR]
# Environment: LLAMA_BUILD (a llama.cpp CPU build dir holding bin/llama-bench and bin/llama-quantize; default:
# build one from LLAMA_SRC / the sdist like compare_gpu.sh), LLAMA_SRC, PYTHON, THREADS (default nproc).
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
SRC=${LLAMA_SRC_DIR:-$W/llama-src}
[ -f "$SRC/convert_hf_to_gguf.py" ] || { STAGES="fetch" bash "$REPO/benchmarks/compare_gpu.sh" "$W" >/dev/null; SRC=$W/llama-src; }
if [ ! -f "$W/e4b-q4_0.gguf" ]; then
  rm -rf "$W/gguf-src" && mkdir -p "$W/gguf-src"
  for f in "$CKPT"/*; do case "$(basename "$f")" in tokenizer*|special_tokens_map.json) ;; *) ln -s "$f" "$W/gguf-src/";; esac; done
  "$PY" "$REPO/benchmarks/llama_tokenizer.py" "$W/gguf-src" --vocab-size 262144 >/dev/null
  (cd "$SRC" && PYTHONPATH="$SRC/gguf-py:$PYTHONPATH" "$PY" convert_hf_to_gguf.py "$W/gguf-src" --outtype bf16 \
     --outfile "$W/e4b-bf16.gguf") >"$W/gguf-convert.log" 2>&1 || { tail "$W/gguf-convert.log"; exit 1; }
  "$B/bin/llama-quantize" "$W/e4b-bf16.gguf" "$W/e4b-q4_0.gguf" Q4_0 >"$W/quantize.log" 2>&1 || exit 1
  rm -f "$W/e4b-bf16.gguf"
fi
echo "=== llama.cpp CPU ($T threads)"
"$B/bin/llama-bench" -m "$W/e4b-q4_0.gguf" -p 16,64 -n 8 -t "$T" -r 2 -o json >"$W/llama-cpu.json" 2>"$W/llama-cpu.log"
"$PY" -c "import json,sys; [print(f\"llama.cpp pp{r['n_prompt']} tg{r['n_gen']}: {r['avg_ts']:.2f} tok/s\") for r in json.load(open(sys.argv[1]))]" "$W/llama-cpu.json"
echo "=== gemma4-coreai CPU"
"$PY" -m gemma4_coreai.bench "$BUNDLE" --device cpu ${BENCH_ARGS:---prompt-len 16 64 --gen-len 8 --repeats 2} -o "$W/ours-cpu.json"

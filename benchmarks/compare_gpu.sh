#!/usr/bin/env bash
# The whole GPU comparison in one go, on one card: gemma4-coreai's fast CUDA path vs llama.cpp (CUDA, built from
# the llama.cpp that PyPI's llama-cpp-python sdist vendors, Q4_0 GGUF of the same synthetic checkpoint made with
# its own convert_hf_to_gguf.py + llama-quantize) vs Hugging Face transformers bf16. Prints the ratios last.
#
#   benchmarks/compare_gpu.sh [WORKDIR]            (default /tmp/g4bench; needs ~45 GB of disk there)
#
# Environment: PYTHON (default python3); LLAMA_CPP_PYTHON_VERSION (default 0.3.36); LLAMA_SRC = an already
# unpacked (or .tar.gz of the) sdist's vendor/llama.cpp, for machines without network; otherwise the script runs
# `pip download --no-binary :all: llama-cpp-python==VERSION` and unpacks vendor/llama.cpp itself.
# STAGES (default "fetch build synth gguf ours llama hf report"; add "ab" for benchmarks/ab_fast.py) selects
# stages; OURS_PROMPTS (default "128 512 4096") the prompt lengths of our bench. LLAMA_BUILD_TAR: a .tar.gz of an
# earlier run's llama-build/bin (or a glob of its split pieces, quoted) to unpack instead of building (~5 min
# saved).
set -uo pipefail
W=${1:-/tmp/g4bench}
mkdir -p "$W"
W=$(cd "$W" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
STAGES=${STAGES:-"fetch build synth gguf ours llama hf report"}
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
# the tools' shared libraries sit beside them; an unpacked LLAMA_BUILD_TAR keeps its build's rpath, not this one
export LD_LIBRARY_PATH="$W/llama-build/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
JOBS=$(nproc)
stage() { echo "=== $(date +%T) $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

fetch() {  # llama.cpp source from the PyPI sdist of llama-cpp-python
  [ -f "$W/llama-src/CMakeLists.txt" ] && return 0
  if [ -n "${LLAMA_SRC:-}" ]; then
    mkdir -p "$W/llama-src"
    if [ -f "$LLAMA_SRC" ]; then tar xzf "$LLAMA_SRC" -C "$W/llama-src" --strip-components=1
    else cp -r "$LLAMA_SRC"/. "$W/llama-src/"; fi
  else
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$W/sdist" || return 1
    tar xzf "$W/sdist/llama_cpp_python-$VER.tar.gz" -C "$W/sdist" || return 1
    cp -r "$W/sdist/llama_cpp_python-$VER/vendor/llama.cpp" "$W/llama-src"
  fi
}

build() {  # CUDA build of the two tools we need (sm_90; tests, examples, server off)
  [ -x "$W/llama-build/bin/llama-bench" ] && [ -x "$W/llama-build/bin/llama-quantize" ] && return 0
  if [ -n "${LLAMA_BUILD_TAR:-}" ]; then
    # shellcheck disable=SC2086  # a glob of split pieces is allowed
    cat $LLAMA_BUILD_TAR | tar xzf - -C "$W" && [ -x "$W/llama-build/bin/llama-bench" ] && return 0
    echo "LLAMA_BUILD_TAR did not hold llama-build/bin/llama-bench; building"
  fi
  local arch=${CUDA_ARCH:-90}
  cmake -S "$W/llama-src" -B "$W/llama-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_FA_QUANTS=f16-f16 -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON >"$W/llama-cmake.log" 2>&1 || { tail -30 "$W/llama-cmake.log"; return 1; }
  cmake --build "$W/llama-build" --target llama-bench llama-quantize -j "$JOBS" >"$W/llama-build.log" 2>&1 \
    || { tail -30 "$W/llama-build.log"; return 1; }
}

synth() {  # the E4B-shaped synthetic bf16 checkpoint and our q4_0 bundle
  [ -f "$W/bundle/manifest.json" ] && return 0
  [ -f "$W/ckpt/config.json" ] || "$PY" -m gemma4_coreai.cli synth --shape e4b -o "$W/ckpt" -q --force || return 1
  "$PY" -m gemma4_coreai.cli convert "$W/ckpt" -o "$W/bundle" -q --force
}

ours() {  # $1 = output tag
  "$PY" -m gemma4_coreai.bench "$W/bundle" --device cuda --prompt-len ${OURS_PROMPTS:-128 512 4096} --gen-len 256 --repeats 3 \
    -o "$W/ours$1.json" --force  # a rerun replaces its own record
}

gguf() {  # llama.cpp's own converter on the same checkpoint (its tokenizer swapped for one it accepts)
  [ -f "$W/e4b-q4_0.gguf" ] && return 0
  rm -rf "$W/gguf-src" && mkdir -p "$W/gguf-src"
  for f in "$W"/ckpt/*; do
    case "$(basename "$f")" in tokenizer*|special_tokens_map.json) ;; *) ln -s "$f" "$W/gguf-src/";; esac
  done
  "$PY" "$REPO/benchmarks/llama_tokenizer.py" "$W/gguf-src" --vocab-size 262144 >/dev/null || return 1
  (cd "$W/llama-src" && PYTHONPATH="$W/llama-src/gguf-py:$PYTHONPATH" "$PY" convert_hf_to_gguf.py "$W/gguf-src" \
     --outtype bf16 --outfile "$W/e4b-bf16.gguf") >"$W/gguf-convert.log" 2>&1 || { tail -30 "$W/gguf-convert.log"; return 1; }
  "$W/llama-build/bin/llama-quantize" "$W/e4b-bf16.gguf" "$W/e4b-q4_0.gguf" Q4_0 >"$W/quantize.log" 2>&1 \
    || { tail -30 "$W/quantize.log"; return 1; }
  rm -f "$W/e4b-bf16.gguf"
}

llama() {
  "$W/llama-build/bin/llama-bench" -m "$W/e4b-q4_0.gguf" -p 128,4096 -n 256 -ngl 99 -fa 1 -r 3 -o json \
    >"$W/llama.json" 2>"$W/llama-bench.log" || { tail -30 "$W/llama-bench.log"; return 1; }
  "$PY" -c "import json,sys; [print(f\"llama.cpp {'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']}: \"
            f\"{r['avg_ts']:.1f} +- {r['stddev_ts']:.1f} tok/s\") for r in json.load(open(sys.argv[1]))]" "$W/llama.json"
}

hf() {
  "$PY" "$REPO/benchmarks/hf_peer.py" "$W/ckpt" --prompt-len 128 4096 --gen-len 16 --repeats 2 --json "$W/hf.json"
}

ab() {  # same-process A/B of the fast path's switches (optional stage: STAGES="... ab")
  "$PY" "$REPO/benchmarks/ab_fast.py" "$W/bundle" --json "$W/ab.json" 2>&1 | grep -v "warn\|softmax\|^ *$" | tail -12
}

report() {
  "$PY" "$REPO/benchmarks/compare.py" --ours "$W/ours.json" --llama "$W/llama.json" --hf "$W/hf.json" \
    --md "$W/compare.md"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
want fetch && { stage fetch; fetch || echo "fetch FAILED"; }
# CPU work in the background: the llama.cpp build beside the checkpoint synthesis, then its GGUF conversion beside
# our GPU benchmark (the GPU peers never run at the same time).
rm -f "$W/.synth_done"
BG_PID=""
if want build || want gguf; then
  stage "build + gguf (background)"
  ( if want build; then build && echo "build OK" || echo "build FAILED"; fi
    while [ ! -e "$W/.synth_done" ]; do sleep 2; done
    if want gguf; then gguf && echo "gguf OK" || echo "gguf FAILED"; fi ) >"$W/build.status" 2>&1 &
  BG_PID=$!
fi
want synth && { stage synth; synth || echo "synth FAILED"; }
touch "$W/.synth_done"
# GPU_WAIT_FILE: start GPU work only once this file exists (another job may be using the card)
if [ -n "${GPU_WAIT_FILE:-}" ]; then while [ ! -e "$GPU_WAIT_FILE" ]; do sleep 2; done; fi
want ours && { stage ours; ours "" || echo "ours FAILED"; }
[ -n "$BG_PID" ] && { stage "wait build + gguf"; wait "$BG_PID"; cat "$W/build.status"; }
want llama && { stage llama-bench; llama || echo "llama FAILED"; }
want hf && { stage hf; hf || echo "hf FAILED"; }
want report && { stage report; report || echo "report FAILED"; }
want ab && { stage ab; ab || echo "ab FAILED"; }
stage done
touch "$W/DONE"

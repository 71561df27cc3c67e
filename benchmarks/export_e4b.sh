#!/usr/bin/env bash
# Core AI export of the E4B-shaped bundle: wall time and peak RSS (issue 4, target <= 16 GB peak).
#
#   benchmarks/export_e4b.sh BUNDLE OUT [MODE] [MAX_CONTEXT]
#
# BUNDLE: an E4B bundle (e.g. `gemma4-coreai synth --shape e4b` + `gemma4-coreai convert`); MODE provider|tbl|both
# (default provider); MAX_CONTEXT default 4096. Writes OUT and OUT.time (GNU time -v) next to it. PYTHON picks the
# interpreter (default: python). Results: benchmarks/RESULTS.md (Core AI export section).
set -euo pipefail
BUNDLE=${1:?usage: export_e4b.sh BUNDLE OUT [MODE] [MAX_CONTEXT]}
OUT=${2:?usage: export_e4b.sh BUNDLE OUT [MODE] [MAX_CONTEXT]}
MODE=${3:-provider}
CTX=${4:-4096}
PY=${PYTHON:-python}

echo "$(date -u +%FT%TZ) on $(uname -n): $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2 " GB RAM, " $7 " GB available"}')"
/usr/bin/time -v "$PY" -m gemma4_coreai.export_coreai "$BUNDLE" -o "$OUT" --mode "$MODE" --max-context "$CTX" --force \
  2> >(tee "$OUT.time" >&2)
grep -E "Elapsed \(wall clock\)|Maximum resident set size" "$OUT.time"
du -sh "$OUT"/gpu-pipelined/* "$OUT"/ios-frontend/*
ls -l "$OUT"/gpu-pipelined/*/*.aimodel/main.mlirb

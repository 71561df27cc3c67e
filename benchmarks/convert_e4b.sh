#!/usr/bin/env bash
# Synthesize an E4B-shaped checkpoint (~16 GB bf16) and convert it to a bundle, measuring wall time, peak RSS
# and I/O of each step with GNU time. Results go to benchmarks/RESULTS.md (by hand).
# Usage: benchmarks/convert_e4b.sh [WORKDIR]   (default /work/scratch; needs ~25 GB free)
set -euo pipefail
WORK=${1:-/work/scratch}
G4=${G4:-gemma4-coreai}
mkdir -p "$WORK"

/usr/bin/time -v "$G4" synth --shape e4b -o "$WORK/e4b-ckpt" --force 2> "$WORK/synth_e4b.time"
grep -E "Elapsed|Maximum resident|File system (inputs|outputs)|Percent of CPU" "$WORK/synth_e4b.time"
du -sb "$WORK/e4b-ckpt"

# The checkpoint was just written, so much of it is still in the page cache; set DROP_CACHES=1 (root) to
# measure convert reading from disk.
if [ "${DROP_CACHES:-0}" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
/usr/bin/time -v "$G4" convert "$WORK/e4b-ckpt" -o "$WORK/e4b-bundle" --force 2> "$WORK/convert_e4b.time"
grep -E "Elapsed|Maximum resident|File system (inputs|outputs)|Percent of CPU" "$WORK/convert_e4b.time"
du -sb "$WORK/e4b-bundle"
"$G4" inspect "$WORK/e4b-bundle"

#!/usr/bin/env bash
# The GPU acceptance run of the CUDA backend in one go, for a machine that has a GPU but no Rust
# (build here, carry the binary). Prepare on the build machine:
#     cargo build --release && mkdir -p dist && objcopy --strip-debug target/release/protege dist/protege
# then, from the repository root on the GPU machine:
#     tools/gpu_check.sh            # writes $OUT (default gpu-out/): info, selftest, bench
# Each step has its own time limit so that one hang does not lose the others' results.
set -u
BIN="${PROTEGE_BIN:-dist/protege}"
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PROTEGE_CACHE="${PROTEGE_CACHE:-$OUT/cache}"   # compiled kernels land here
step() {  # name, seconds, command...
    local name="$1" secs="$2"; shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
step info 60 "$BIN" info
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
step selftest 300 "$BIN" selftest --device cuda --json "$OUT/selftest.json"
step bench 420 "$BIN" bench --device cuda --json "$OUT/bench.json"
grep -E "^FAIL|selftest:" "$OUT/selftest.txt" | tail -20
tail -25 "$OUT/bench.txt"

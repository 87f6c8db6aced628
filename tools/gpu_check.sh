#!/usr/bin/env bash
# The GPU acceptance run of the CUDA backend in one go, for a machine that has a GPU but no Rust
# (build here, carry the binary). Prepare on the build machine:
#     cargo build --release && mkdir -p dist && objcopy --strip-debug target/release/protege dist/protege
# then, from the repository root on the GPU machine:
#     tools/gpu_check.sh            # writes $OUT (default gpu-out/): info, selftest, bench, sft
# The selftest checks inference and training (forward and backward); the sft step trains the
# tiny model 20 steps with LoRA on the GPU and on the CPU and compares the loss curves; the
# launch step runs the same SFT as a data-parallel run of one rank per GPU (NCCL).
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
# configs/sft-tiny.toml for 20 steps into $OUT, once per device.
for dev in cuda cpu; do
    sed -e "s|^path = \"../|path = \"$PWD/|" -e "s|\"../data/|\"$PWD/data/|" -e "s|^steps = .*|steps = 20|" \
        -e "s|^run_dir = .*|run_dir = \"$PWD/$OUT/sft-$dev\"|" configs/sft-tiny.toml >"$OUT/sft-$dev.toml"
    rm -rf "$OUT/sft-$dev"
done
step sft-cuda 120 "$BIN" sft --config "$OUT/sft-cuda.toml" --device cuda
step sft-cpu 120 "$BIN" sft --config "$OUT/sft-cpu.toml" --device cpu
python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
out = sys.argv[1]
curve = lambda d: [json.loads(l)["loss"] for l in open(f"{out}/sft-{d}/metrics.jsonl")]
try:
    g, c = curve("cuda"), curve("cpu")
    worst = max(abs(a - b) / abs(b) for a, b in zip(g, c))
    print(f"sft 20 steps: gpu {g[0]:.4f} -> {g[-1]:.4f}, cpu {c[0]:.4f} -> {c[-1]:.4f}, worst relative loss gap {worst:.4f}",
          "(ok: <= 0.02)" if worst <= 0.02 and len(g) == len(c) == 20 else "(FAIL: > 0.02)")
except Exception as e:
    print("sft comparison: FAIL:", e)
PY
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
sed -e "s|run_dir = .*|run_dir = \"$PWD/$OUT/sft-launch\"|" "$OUT/sft-cuda.toml" >"$OUT/sft-launch.toml"
rm -rf "$OUT/sft-launch"
step launch 180 "$BIN" launch --gpus "${NGPU:-1}" -- sft --config "$OUT/sft-launch.toml"
grep -E "^FAIL|selftest:" "$OUT/selftest.txt" | tail -20
tail -25 "$OUT/bench.txt"
cat "$OUT/summary.txt"

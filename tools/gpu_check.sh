#!/usr/bin/env bash
# The GPU acceptance run of the CUDA backend in one call, for a machine that has a GPU but no
# Rust (build here, carry the binary). Prepare on the build machine:
#     cargo build --release && mkdir -p dist && objcopy --strip-debug target/release/protege dist/protege
# then, from the repository root on the GPU machine:
#     tools/gpu_check.sh            # writes $OUT (default gpu-out/)
#
# A task lent a GPU has 15 minutes of device time in all, machine start included, and gets at
# most 8 files back; so every step has its own time limit (together 8 minutes: the budget is
# printed and checked below), a failed or hung step does not stop the others, and $OUT ends
# with exactly: summary.txt (each step's exit status and time, the SFT comparison, the
# selftest failures and the bench tables), selftest.json, bench.json, and logs.tar.gz (every
# step's full output, metrics and configs).
#
# Steps: info; selftest (inference and training, forward and backward, against the CPU);
# bench (the kernels and the 7B-shaped phases with PyTorch beside them, fewer iterations);
# the tiny model's 20-step LoRA SFT on the GPU and on the CPU with the loss curves compared;
# the same SFT as a data-parallel run of one rank per GPU (NCCL).
set -u
BIN="${PROTEGE_BIN:-dist/protege}"
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"   # absolute: the SFT configs name their run directories by it
LOGS="$OUT/logs"
export PROTEGE_CACHE="${PROTEGE_CACHE:-$LOGS/cache}"   # compiled kernels land here

# name:seconds, in order; the sum is the whole run's budget.
BUDGET=(info:15 selftest:120 bench:190 sft-cuda:45 sft-cpu:50 launch:60)
TOTAL=0
for s in "${BUDGET[@]}"; do TOTAL=$((TOTAL + ${s#*:})); done
echo "gpu_check: budget ${TOTAL} s over ${#BUDGET[@]} steps (limit 480 s)" | tee "$OUT/summary.txt"
[ "$TOTAL" -le 480 ] || { echo "gpu_check: budget over 8 minutes" | tee -a "$OUT/summary.txt"; exit 2; }
limit() { for s in "${BUDGET[@]}"; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done; }

step() {  # name, command...: runs under the step's limit; never stops the script
    local name="$1"; shift
    local secs t0=$SECONDS rc
    secs=$(limit "$name")
    timeout -k 5 "$secs" "$@" >"$LOGS/$name.txt" 2>&1
    rc=$?
    local what="rc=$rc"
    [ "$rc" = 124 ] && what="TIMED OUT after its $secs s"
    echo "$name: $what in $((SECONDS - t0)) s (limit $secs s)" | tee -a "$OUT/summary.txt"
}

step info "$BIN" info
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || true
step selftest "$BIN" selftest --device cuda --json "$OUT/selftest.json"
step bench "$BIN" bench --device cuda --iters 5 --json "$OUT/bench.json"
# configs/sft-tiny.toml for 20 steps, once per device.
for dev in cuda cpu launch; do
    sed -e "s|^path = \"../|path = \"$PWD/|" -e "s|\"../data/|\"$PWD/data/|" -e "s|^steps = .*|steps = 20|" \
        -e "s|^run_dir = .*|run_dir = \"$LOGS/sft-$dev\"|" configs/sft-tiny.toml >"$LOGS/sft-$dev.toml"
    rm -rf "$LOGS/sft-$dev"
done
step sft-cuda "$BIN" sft --config "$LOGS/sft-cuda.toml" --device cuda
step sft-cpu "$BIN" sft --config "$LOGS/sft-cpu.toml" --device cpu
python3 - "$LOGS" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
logs = sys.argv[1]
curve = lambda d: [json.loads(l)["loss"] for l in open(f"{logs}/sft-{d}/metrics.jsonl")]
try:
    g, c = curve("cuda"), curve("cpu")
    worst = max(abs(a - b) / abs(b) for a, b in zip(g, c))
    print(f"sft 20 steps: gpu {g[0]:.4f} -> {g[-1]:.4f}, cpu {c[0]:.4f} -> {c[-1]:.4f}, worst relative loss gap {worst:.4f}",
          "(ok: <= 0.02)" if worst <= 0.02 and len(g) == len(c) == 20 else "(FAIL: > 0.02)")
except Exception as e:
    print("sft comparison: FAIL:", e)
PY
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
step launch "$BIN" launch --gpus "${NGPU:-1}" -- sft --config "$LOGS/sft-launch.toml"

{
    echo; echo "== selftest failures (of $LOGS/selftest.txt)"
    grep -E "^FAIL|selftest:" "$LOGS/selftest.txt" | tail -20
    echo; echo "== bench (tail of $LOGS/bench.txt)"
    tail -40 "$LOGS/bench.txt"
} >>"$OUT/summary.txt" 2>&1
# Everything else in one archive: the device returns at most 8 files.
tar -czf "$OUT/logs.tar.gz" --exclude logs/cache -C "$OUT" logs
rm -rf "$LOGS"
ls "$OUT" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"

#!/usr/bin/env python3
"""Side-by-side CPU benchmark: protege vs PyTorch/transformers (float32), same machine, one run.

Usage:
    tools/bench_cpu.py --model DIR [--threads 2] [--prefill-tokens 512] [--decode-tokens 64]
        [--rounds 3] [--protege target/release/protege] [--json OUT]
    tools/bench_cpu.py --model DIR --sft full|lora [--lora-rank 16] [--prefill-tokens 512] ...

With --sft, each side times one SFT step (forward, backward, clipping, AdamW) over
--prefill-tokens tokens instead (`protege bench --sft` vs tools/bench_sft_torch.py).

Alternates `protege bench` and `tools/bench_cpu_torch.py` for --rounds rounds, in ABBA order
with a pause before each run: on a shared or burstable VM the first run after idle is the
fastest (seen here: 190 -> 150 tok/s over four back-to-back runs of the same binary), so a
fixed order would favour one side. Both run the same prompt token ids. Prints the median
prefill and decode tokens/s of each with the ratio protege / PyTorch. Build protege first
(`cargo build --release`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd, out):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stdout}")
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--pause", type=float, default=15.0, help="seconds of idle before each run")
    p.add_argument("--protege", default=os.path.join(TOOLS, "..", "target", "release", "protege"))
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--sft", choices=("full", "lora"), help="benchmark one SFT step instead")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if not os.path.exists(a.protege):
        sys.exit(f"error: {a.protege} not found; run `cargo build --release` first")
    if a.sft:
        return bench_sft(a)
    shape = ["--prefill-tokens", str(a.prefill_tokens), "--decode-tokens", str(a.decode_tokens)]
    results = {"protege": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        for r in range(a.rounds):
            ours = [a.protege, "--threads", str(a.threads), "bench", "--model", a.model, "--repeats", "3", "--json", out]
            theirs = [sys.executable, os.path.join(TOOLS, "bench_cpu_torch.py"), "--model", a.model,
                      "--threads", str(a.threads), "--json", out]
            order = [("protege", ours), ("torch", theirs)]
            for name, cmd in order if r % 2 == 0 else order[::-1]:
                time.sleep(a.pause)
                results[name].append(run_json(cmd + shape, out))
            print(f"round {r + 1}: protege {results['protege'][-1]['prefill_tok_s']:.1f} / "
                  f"{results['protege'][-1]['decode_tok_s']:.2f} tok/s, torch "
                  f"{results['torch'][-1]['prefill_tok_s']:.1f} / {results['torch'][-1]['decode_tok_s']:.2f} tok/s",
                  flush=True)
    summary = {"threads": a.threads, "prefill_tokens": a.prefill_tokens, "decode_tokens": a.decode_tokens,
               "rounds": a.rounds, "torch": results["torch"][0].get("torch")}
    print(f"\n{'':10}{'protege':>12}{'pytorch':>12}{'ratio':>8}")
    for phase in ("prefill", "decode"):
        ours = statistics.median(x[f"{phase}_tok_s"] for x in results["protege"])
        theirs = statistics.median(x[f"{phase}_tok_s"] for x in results["torch"])
        summary[phase] = {"protege_tok_s": ours, "torch_tok_s": theirs, "ratio": ours / theirs}
        print(f"{phase + ' tok/s':10}{ours:12.2f}{theirs:12.2f}{ours / theirs:8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")


def bench_sft(a):
    results = {"protege": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        for r in range(a.rounds):
            ours = [a.protege, "--threads", str(a.threads), "bench", "--model", a.model, "--sft", a.sft,
                    "--lora-rank", str(a.lora_rank), "--prefill-tokens", str(a.prefill_tokens),
                    "--repeats", str(a.repeats), "--json", out]
            theirs = [sys.executable, os.path.join(TOOLS, "bench_sft_torch.py"), "--model", a.model,
                      "--mode", a.sft, "--lora-rank", str(a.lora_rank), "--threads", str(a.threads),
                      "--tokens", str(a.prefill_tokens), "--repeats", str(a.repeats), "--json", out]
            order = [("protege", ours), ("torch", theirs)]
            for name, cmd in order if r % 2 == 0 else order[::-1]:
                time.sleep(a.pause)
                results[name].append(run_json(cmd, out))
            print(f"round {r + 1}: protege {results['protege'][-1]['tokens_per_s']:.1f} tok/s "
                  f"({results['protege'][-1]['step_s']:.2f} s/step), torch "
                  f"{results['torch'][-1]['tokens_per_s']:.1f} tok/s ({results['torch'][-1]['step_s']:.2f} s/step)",
                  flush=True)
    ours = statistics.median(x["tokens_per_s"] for x in results["protege"])
    theirs = statistics.median(x["tokens_per_s"] for x in results["torch"])
    mode = results["protege"][0]["mode"]
    print(f"\nsft step {mode}, {a.prefill_tokens} tokens: protege {ours:.1f} tok/s, pytorch {theirs:.1f} tok/s, "
          f"ratio {ours / theirs:.2f}")
    print(f"trainable parameters: protege {results['protege'][0]['trainable_params']}, "
          f"pytorch {results['torch'][0]['trainable_params']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"mode": mode, "tokens": a.prefill_tokens, "threads": a.threads, "rounds": results,
                       "protege_tok_s": ours, "torch_tok_s": theirs, "ratio": ours / theirs}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Per-command and per-grading cost of the sandbox, side by side in one run.

Plays the same replay (N trivial `true` commands, then submit) through `protege eval` for each
binary given and for both isolations (bubblewrap, --no-sandbox), over the fixture suite, and
prints the mean command latency (from the trajectories' timings) and the mean grading time
(episode wall time minus the episode). Ratios are against the first binary's bubblewrap row.

    python3 tools/bench_sandbox.py target/debug/protege [/path/to/older/protege ...] [--commands 40] [--repeat 3]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "tests", "fixtures", "tasks")


def call(name, args):
    return "x\n<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def run(binary, sandbox, commands, tmp):
    replay = os.path.join(tmp, "replay.json")
    with open(replay, "w") as f:
        json.dump({"calc__clamp-above": [call("bash", {"command": "true"})] * commands + [call("submit", {})]}, f)
    out = os.path.join(tmp, "out")
    args = [binary, "eval", "--suite", SUITE, "--policy", "replay", "--replay", replay, "--expert", "none",
            "--tasks", "calc__clamp-above", "--out", out]
    if not sandbox:
        args.append("--no-sandbox")
    started = time.time()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - started
    with open(os.path.join(out, "trajectories.jsonl")) as f:
        t = json.loads(f.readline())
    timing = t["meta"]["timing"]
    return timing["command_s"] / commands, wall - timing["total_s"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("binaries", nargs="+")
    p.add_argument("--commands", type=int, default=40)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    rows = []
    for b in a.binaries:
        for sandbox in (True, False):
            cmd, rest = [], []
            for _ in range(a.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    c, r = run(os.path.abspath(b), sandbox, a.commands, tmp)
                cmd.append(c)
                rest.append(r)
            rows.append((b, "bubblewrap" if sandbox else "plain", min(cmd), min(rest)))
    base = rows[0][2]
    print(f"| binary | isolation | ms / command | ratio | grading + startup, s |")
    print("|---|---|---|---|---|")
    for b, iso, c, r in rows:
        print(f"| {b} | {iso} | {1000 * c:.1f} | {c / base:.2f} | {r:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""PyTorch side of the CPU benchmark: prefill and greedy-decode throughput.

Usage:
    tools/bench_cpu_torch.py --model DIR [--threads 2] [--prefill-tokens 512]
        [--decode-tokens 64] [--attn sdpa|eager] [--json OUT]

Loads the Hugging Face model in DIR in float32 on the CPU and builds a
deterministic prompt of exactly --prefill-tokens ids (a tokenized code snippet,
repeated and truncated). Then:

  prefill  one forward over the whole prompt with use_cache=True, logits for
           the last position only (as generate() does); one warm-up run, then
           the median of 3 timed runs.
  decode   from the last timed prefill's KV cache, --decode-tokens forwards of
           one token each, feeding back the argmax (a manual loop, so only the
           forwards and the argmax are timed).

Prints the results and, with --json, writes
{"prefill_tokens", "prefill_tok_s", "decode_tokens", "decode_tok_s",
 "threads", "torch", "attn_implementation"} to OUT.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: E402  (tools/refenv.py: the pinned reference environment)

refenv.ensure_venv()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PREFILL_RUNS = 3
WARMUP_DECODE_STEPS = 4
# The same text `protege bench` cuts its prompt from, so both run the same token ids.
SNIPPET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "bench_prompt.py.txt")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument(
        "--attn",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="attention implementation (default: %(default)s, the faster on CPU)",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.prefill_tokens < 1 or args.decode_tokens < 1 or args.threads < 1:
        parser.error("--threads, --prefill-tokens and --decode-tokens must be positive")
    return args


def load(model_dir, attn):
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        sys.exit(f"error: {model_dir} has no config.json (run tools/fetch_qwen25_coder_05b --convert)")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn
    )
    model.eval()
    print(f"loaded {model_dir} in {time.perf_counter() - start:.1f}s (attn={attn})")
    return tokenizer, model


def prompt_ids(tokenizer, n_tokens):
    """Exactly n_tokens ids: the snippet's tokens repeated, then truncated."""
    with open(SNIPPET_FILE, encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"]
    repeats = -(-n_tokens // len(ids))
    return torch.tensor([(ids * repeats)[:n_tokens]])


def prefill(model, ids):
    """One forward over ids; returns (seconds, next token, KV cache)."""
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    next_token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start, next_token, out.past_key_values


def decode(model, token, cache, steps):
    """Greedy-decode steps tokens one forward at a time; returns seconds."""
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        cache = out.past_key_values
    return time.perf_counter() - start


def run(model, ids, decode_tokens):
    _, token, cache = prefill(model, ids)
    decode(model, token, cache, WARMUP_DECODE_STEPS)
    times = []
    for _ in range(PREFILL_RUNS):
        seconds, token, cache = prefill(model, ids)
        times.append(seconds)
    return statistics.median(times), decode(model, token, cache, decode_tokens)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, model = load(args.model, args.attn)
    ids = prompt_ids(tokenizer, args.prefill_tokens)
    with torch.inference_mode():
        prefill_s, decode_s = run(model, ids, args.decode_tokens)
    result = {
        "prefill_tokens": args.prefill_tokens,
        "prefill_tok_s": round(args.prefill_tokens / prefill_s, 2),
        "decode_tokens": args.decode_tokens,
        "decode_tok_s": round(args.decode_tokens / decode_s, 2),
        "threads": args.threads,
        "torch": torch.__version__,
        "attn_implementation": args.attn,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

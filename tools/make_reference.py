"""Reference logits / greedy continuations from Hugging Face transformers.

Usage:
    python3 tools/make_reference.py MODEL_DIR --out FILE.safetensors
        (--prompt TEXT [--raw] | --ids ID [ID ...])
        [--positions P [P ...]] [--greedy N --greedy-out FILE.json]

Loads any Hugging Face Qwen2 model directory in float32 with eager attention
(bf16/f16 checkpoints are upcast, so the reference is the exact f32 computation
on the stored weights) and writes the "check-logits" reference format that the
Rust tests and tools compare against:

    input_ids  I64 [n]         the prompt token ids
    logits     F32 [k, vocab]  prefill logits at `positions` (all n rows if absent)
    positions  I64 [k]         only present when not every position is stored

The prompt is rendered with the model directory's chat template as a single
user turn plus the generation prompt, unless --raw (plain text) or --ids is
given. By default every position is stored when that takes < 64 MB, otherwise
the last 16 positions plus 16 evenly spaced ones.

--greedy N continues the prompt greedily for exactly N tokens (end-of-sequence
tokens do not stop it, so runs are comparable token for token) and writes
{"prompt_ids": [...], "new_ids": [...], "text": "..."}.

The script re-executes itself inside the pinned reference venv (see refenv.py:
torch 2.15.0, transformers 5.23.0, tokenizers 0.23.3, safetensors 0.8.0,
numpy 2.4.6, gguf 0.19.0). make_fixtures.py imports its helpers.
"""

from refenv import ensure_venv

ensure_venv()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

FULL_LOGITS_LIMIT_BYTES = 64 * 1024 * 1024
SUBSET_TAIL = 16
SUBSET_SPREAD = 16


def load_model(model_dir):
    """The model in float32, eager attention, eval mode, greedy-only generation config."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    # Replace the checkpoint's sampling defaults (temperature, top-p, EOS ids, ...):
    # generate() falls back to them for every option left unset.
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=None, bos_token_id=None, pad_token_id=None
    )
    return model


def token_ids(encoded):
    """A flat list of ids from encode() or apply_chat_template(tokenize=True).

    In transformers 5 the latter returns a BatchEncoding, not a list.
    """
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def chat_prompt_ids(tokenizer, prompt):
    messages = [{"role": "user", "content": prompt}]
    return token_ids(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    )


@torch.no_grad()
def prefill_logits(model, ids):
    """F32 logits [n, vocab] of one forward pass over `ids`."""
    return model(torch.tensor([ids])).logits[0].float()


def default_positions(n, vocab):
    """All positions if they fit in the size limit, else the tail plus an even spread."""
    if n * vocab * 4 < FULL_LOGITS_LIMIT_BYTES:
        return None
    spread = np.linspace(0, n - 1, SUBSET_SPREAD).round().astype(int)
    tail = range(max(0, n - SUBSET_TAIL), n)
    return sorted(set(spread.tolist()) | set(tail))


def write_logits(path, ids, logits, positions=None):
    """Write the check-logits format; `logits` holds all n rows, `positions` selects some."""
    tensors = {"input_ids": np.asarray(ids, dtype=np.int64)}
    rows = logits.numpy().astype(np.float32)
    if positions is not None:
        tensors["positions"] = np.asarray(positions, dtype=np.int64)
        rows = rows[positions]
    tensors["logits"] = np.ascontiguousarray(rows)
    save_file(tensors, str(path))


@torch.no_grad()
def greedy(model, ids, n_new):
    """Greedy continuation of exactly `n_new` tokens via model.generate (KV cache)."""
    prompt = torch.tensor([ids])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n_new,
        do_sample=False,
    )
    new_ids = out[0, len(ids):].tolist()
    assert len(new_ids) == n_new, f"generate stopped after {len(new_ids)} tokens"
    return new_ids


def greedy_check(model, prompt_ids, new_ids):
    """Compare greedy tokens with the argmax of one cache-free forward pass.

    Returns (tokens that differ, smallest top-1 minus top-2 logit gap); a small
    gap means another implementation may legitimately pick a different token.
    """
    p = len(prompt_ids)
    logits = prefill_logits(model, prompt_ids + new_ids)[p - 1 : p - 1 + len(new_ids)]
    mismatches = sum(a != b for a, b in zip(logits.argmax(-1).tolist(), new_ids))
    top2 = logits.topk(2, dim=-1).values
    return mismatches, (top2[:, 0] - top2[:, 1]).min().item()


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="reference .safetensors to write")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="user message (or plain text with --raw)")
    src.add_argument("--ids", type=int, nargs="+", help="token ids to use as is")
    ap.add_argument("--raw", action="store_true", help="tokenize --prompt without the chat template")
    ap.add_argument("--positions", type=int, nargs="+", help="rows to store (default: see above)")
    ap.add_argument("--greedy", type=int, metavar="N", help="greedy-continue N tokens")
    ap.add_argument("--greedy-out", type=Path, help="JSON file for the --greedy continuation")
    args = ap.parse_args()
    if (args.greedy is None) != (args.greedy_out is None):
        ap.error("--greedy and --greedy-out go together")
    return args


def main():
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = load_model(args.model_dir)
    if args.ids is not None:
        ids = args.ids
    elif args.raw:
        ids = token_ids(tokenizer.encode(args.prompt, add_special_tokens=False))
    else:
        ids = chat_prompt_ids(tokenizer, args.prompt)

    logits = prefill_logits(model, ids)
    positions = args.positions or default_positions(len(ids), logits.shape[-1])
    write_logits(args.out, ids, logits, positions)
    rows = len(ids) if positions is None else len(positions)
    print(f"wrote {args.out}: {len(ids)} ids, logits [{rows}, {logits.shape[-1]}]")

    if args.greedy is not None:
        new_ids = greedy(model, ids, args.greedy)
        mismatches, margin = greedy_check(model, ids, new_ids)
        print(f"greedy: smallest top-1/top-2 logit gap {margin:.2e}")
        if mismatches:
            print(f"warning: {mismatches} greedy tokens differ from a cache-free argmax (near ties?)")
        text = tokenizer.decode(new_ids, skip_special_tokens=False)
        result = {"prompt_ids": ids, "new_ids": new_ids, "text": text}
        args.greedy_out.write_text(json.dumps(result, ensure_ascii=False) + "\n")
        print(f"wrote {args.greedy_out}: {text!r}")


if __name__ == "__main__":
    main()

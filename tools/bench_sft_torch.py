#!/usr/bin/env python3
"""PyTorch side of the SFT-step benchmark: one training step of a causal LM on the CPU.

Usage:
    tools/bench_sft_torch.py --model DIR --mode full|lora [--lora-rank 16] [--threads 2]
        [--tokens 512] [--repeats 3] [--json OUT]

Loads the Hugging Face model in DIR in float32 and times, exactly as `protege bench --sft`
does: one sequence of --tokens ids (the same benchmark text, repeated and cut), every token
trained (labels = input ids); per step: zero the gradients, forward with the cross-entropy
loss, backward, clip the global gradient norm to 1.0, AdamW (lr 1e-5, weight decay 0.01).
`lora` wraps the model with peft (rank r, alpha 2r, dropout 0, all seven linear modules of
each layer). One warm-up step, then the median of --repeats timed steps.
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

from bench_cpu_torch import prompt_ids  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--mode", choices=("full", "lora"), required=True)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        sys.exit(f"error: {a.model} has no config.json (run tools/fetch_qwen25_coder_05b --convert)")
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0, target_modules=MODULES)
        model = get_peft_model(model, cfg)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    decay = [q for q in params if q.dim() >= 2]
    no_decay = [q for q in params if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-5
    )
    ids = prompt_ids(tokenizer, a.tokens)

    def step():
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return time.perf_counter() - start, loss.item()

    step()
    times, losses = zip(*(step() for _ in range(max(1, a.repeats))))
    step_s = statistics.median(times)
    mode = "full" if a.mode == "full" else f"lora-r{a.lora_rank}"
    result = {
        "mode": mode,
        "seq_tokens": a.tokens,
        "trainable_params": sum(q.numel() for q in params),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(a.tokens / step_s, 2),
        "repeats": a.repeats,
        "losses": [losses[0], losses[-1]],
        "threads": a.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch equivalents of `protege bench --device cuda`, run by it in the same invocation.

Prints one JSON object: {"torch": version, "device": name, "ms": {row: milliseconds},
"errors": {row: message}}. Row names and shapes match src/bench_gpu.rs; each op is what a
PyTorch user would run: SDPA for attention (flash backend, GQA), eager ops as transformers
writes them (Qwen2RMSNorm, apply_rotary_pos_emb, SiLU*up), cuBLAS through F.linear, and the
transformers Qwen2 model for the 7B-shaped prefill and decode step (random weights, bf16, SDPA).
Timing: CUDA events around `iters` runs after one warm-up. No network is needed.
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--kernels-only", action="store_true")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print(json.dumps({"torch": torch.__version__, "ms": {}, "errors": {"all": "CUDA not available to PyTorch"}}))
        return
    dev = torch.device("cuda")
    bf = torch.bfloat16
    ms, errors = {}, {}

    def timed(name, fn, iters=args.iters):
        try:
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms[name] = start.elapsed_time(end) / iters
        except Exception as e:  # one failing row must not lose the others
            errors[name] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()

    V, H, I, L, NH, KV, D = 152064, 3584, 18944, 28, 28, 4, 128
    T = 8192
    g = 8192
    with torch.no_grad():
        a, b = torch.randn(g, g, device=dev, dtype=bf), torch.randn(g, g, device=dev, dtype=bf)
        timed("cublas_gemm", lambda: F.linear(a, b))
        del a, b
        src = torch.randn(1 << 30, device=dev, dtype=bf)
        dst = torch.empty_like(src)
        timed("device_copy", lambda: dst.copy_(src))
        del src, dst

        x = torch.randn(T, H, device=dev, dtype=bf)
        w = torch.randn(H, device=dev, dtype=bf)

        def rmsnorm():
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return w * h.to(bf)

        timed("rmsnorm", rmsnorm)
        y = torch.randn(T, H, device=dev, dtype=bf)
        timed("add", lambda: y.add_(x))
        table = torch.randn(V, H, device=dev, dtype=bf)
        ids = (torch.arange(T, device=dev) * 7919) % V
        timed("embedding", lambda: F.embedding(ids, table))
        del table
        q = torch.randn(1, NH, T, D, device=dev, dtype=bf)
        inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
        freqs = torch.arange(T, device=dev).float()[:, None] * inv[None]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos().to(bf)[None, None], emb.sin().to(bf)[None, None]

        def rope():
            q1, q2 = q[..., : D // 2], q[..., D // 2 :]
            return q * cos + torch.cat((-q2, q1), -1) * sin

        timed("rope", rope)
        del q
        gate, up = torch.randn(T, I, device=dev, dtype=bf), torch.randn(T, I, device=dev, dtype=bf)
        timed("swiglu", lambda: F.silu(gate) * up)
        wg = torch.randn(I, H, device=dev, dtype=bf) * 0.02
        timed("linear", lambda: F.linear(x, wg))
        del gate, up, wg
        k, v = torch.randn(T, KV * D, device=dev, dtype=bf), torch.randn(T, KV * D, device=dev, dtype=bf)
        kc, vc = torch.zeros_like(k), torch.zeros_like(v)
        slots = torch.arange(T, device=dev)

        def kv_store():
            kc.index_copy_(0, slots, k)
            vc.index_copy_(0, slots, v)

        timed("kv_store", kv_store)
        del k, v, kc, vc, x, y

        def sdpa(q, k, v, causal):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            except TypeError:  # torch < 2.5: expand the KV heads
                r = q.shape[1] // k.shape[1]
                return F.scaled_dot_product_attention(
                    q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=causal
                )

        q = torch.randn(4, NH, 4096, D, device=dev, dtype=bf)
        k, v = torch.randn(4, KV, 4096, D, device=dev, dtype=bf), torch.randn(4, KV, 4096, D, device=dev, dtype=bf)
        timed("flash_attention", lambda: sdpa(q, k, v, True))
        q = torch.randn(64, NH, 1, D, device=dev, dtype=bf)
        k, v = torch.randn(64, KV, 4096, D, device=dev, dtype=bf), torch.randn(64, KV, 4096, D, device=dev, dtype=bf)
        timed("decode_attention", lambda: sdpa(q, k, v, False))
        del q, k, v

        logits = torch.randn(64, V, device=dev, dtype=bf) * 10
        timed("sample_greedy", lambda: torch.argmax(logits, -1).cpu())

        def top_p():
            s = (logits.float() / 0.7)
            srt, idx = torch.sort(s, descending=True)
            cum = srt.softmax(-1).cumsum(-1)
            srt[(cum - srt.softmax(-1)) > 0.95] = float("-inf")
            pick = torch.multinomial(srt.softmax(-1), 1)
            return idx.gather(-1, pick).cpu()

        timed("sample_top_p", top_p)
        del logits

        if not args.kernels_only:
            try:
                model_rows(timed, args.iters)
            except Exception as e:
                errors["prefill_7b"] = errors["decode_step_7b"] = f"{type(e).__name__}: {e}"

    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "ms": ms, "errors": errors}))


def model_rows(timed, iters):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).eval()
    T = 8192
    ids = (torch.arange(T, device="cuda")[None] * 7919) % cfg.vocab_size

    def prefill():
        try:
            return model(ids, logits_to_keep=1, use_cache=False)
        except TypeError:
            return model(ids, num_logits_to_keep=1, use_cache=False)

    timed("prefill_7b", prefill, iters=min(iters, 5))

    from transformers import DynamicCache

    B, ctx = 64, 4096
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(B, 4, ctx - 1, 128, device="cuda")
        v = torch.randn(B, 4, ctx - 1, 128, device="cuda")
        cache.update(k, v, layer)
    tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    pos = torch.full((B, 1), ctx - 1, dtype=torch.long, device="cuda")

    def decode():
        out = model(tok, past_key_values=cache, position_ids=pos, use_cache=True)
        cache.crop(ctx - 1)
        return torch.argmax(out.logits[:, -1], -1).cpu()

    timed("decode_step_7b", decode)


if __name__ == "__main__":
    sys.exit(main())

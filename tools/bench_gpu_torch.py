#!/usr/bin/env python3
"""PyTorch equivalents of `protege bench --device cuda`, run by it in the same invocation.

Prints one JSON object: {"torch": version, "device": name, "ms": {row: milliseconds},
"peak_mib": {row: MiB}, "notes": {row: what ran}, "errors": {row: message}}. Row names and
shapes match src/diagnostics/bench_gpu.rs and src/diagnostics/ops/; each op is what a PyTorch user would run: SDPA for attention
(flash backend, GQA), eager ops as transformers writes them (Qwen2RMSNorm,
apply_rotary_pos_emb, SiLU*up), cuBLAS through F.linear, and the transformers Qwen2 model for
the 7B-shaped prefill and decode step (random weights, bf16, SDPA).

Training rows: SDPA forward and backward (backward alone: autograd.grad of one saved forward
with retain_graph), F.linear with and without a LoRA branch (forward + backward), the eager
log-prob `log_softmax((h @ W.T).float()).gather` forward + backward (time and peak memory:
max_memory_allocated minus the baseline), torch.optim.AdamW(fused=True) over f32 parameters,
and one LoRA SFT step of the transformers model with peft (skipped when peft is missing).

Timing: inference rows, CUDA events around `iters` runs after one warm-up (mean); training
rows, CUDA events around each of `iters` runs after one warm-up (median). No network is needed.
"""
import argparse
import gc
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--kernels-only", action="store_true")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        out = {"torch": torch.__version__, "ms": {}, "errors": {"all": "CUDA not available to PyTorch"}}
        print(json.dumps(out), file=sys.__stdout__, flush=True)
        return
    dev = torch.device("cuda")
    bf = torch.bfloat16
    ms, errors = {}, {}
    peak_mib, notes = {}, {}

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

    rec = Recorder(ms, errors, peak_mib, notes)
    for rows in (attention_rows, lora_rows, logprob_rows, adamw_rows):
        try:
            rows(rec, args.iters)
        except Exception as e:  # a whole group failing (e.g. out of memory) must not lose the others
            errors[rows.__name__] = f"{type(e).__name__}: {e}"
        rec.free()

    if not args.kernels_only:
        model = None
        try:
            with torch.no_grad():
                model = model_rows(timed, args.iters)
        except Exception as e:
            errors["prefill_7b"] = errors["decode_step_7b"] = f"{type(e).__name__}: {e}"
        rec.free()
        if model is None:
            errors["sft_step_7b_lora"] = "skipped: the transformers model was not built"
        else:
            try:
                sft_row(rec, model, args.iters)
            except Exception as e:
                errors["sft_step_7b_lora"] = f"{type(e).__name__}: {e}"
        del model
        rec.free()

    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(),
                "ms": ms,
                "peak_mib": peak_mib,
                "notes": notes,
                "errors": errors,
            }
        ),
        file=sys.__stdout__,
        flush=True,
    )


# --- training rows -------------------------------------------------------------------------

# The Qwen2.5-7B shape (src/diagnostics/bench_gpu.rs QWEN25_7B) and the training rows' sizes; module
# globals so that a CPU smoke test can shrink them (DEV too).
H7, I7, L7, NH7, KV7, D7, V7 = 3584, 18944, 28, 28, 4, 128, 152064
ATTN_BATCH, ATTN_SEQ = 4, 4096  # packed sequences x tokens
ROWS = 8192  # tokens of the LoRA linear and log-prob rows, and of the SFT step
LOGPROB_VOCAB = 151936
DEV = "cuda"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Recorder:
    """Training rows: the median of per-run CUDA-event times, peak memory, notes, errors."""

    def __init__(self, ms, errors, peak_mib, notes):
        self.ms, self.errors, self.peak_mib, self.notes = ms, errors, peak_mib, notes

    def median(self, name, fn, iters, warmup=1):
        import torch

        try:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(max(1, iters)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            self.ms[name] = statistics.median(times)
            return self.ms[name]
        except Exception as e:  # one failing row must not lose the others
            self.errors[name] = f"{type(e).__name__}: {e}"
            return None

    def peak(self, name, fn):
        """Peak memory of one run of fn beyond what was allocated before it (after a warm-up
        run, so that cuBLAS workspaces and the like are already there)."""
        import torch

        try:
            fn()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            self.peak_mib[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as e:
            self.errors[name + " (memory)"] = f"{type(e).__name__}: {e}"

    def free(self):
        import torch

        gc.collect()
        torch.cuda.empty_cache()


def attention_rows(rec, iters):
    """Flash attention at 4 x 4096, causal, 28/4 heads of 128: SDPA forward (inputs requiring
    grad, as in training) and backward alone. Both GQA forms are timed, enable_gqa=True (torch
    >= 2.5) and K/V expanded with repeat_interleave, and the faster one is reported."""
    import torch
    import torch.nn.functional as F

    dev, bf = DEV, torch.bfloat16
    B, S = ATTN_BATCH, ATTN_SEQ
    # Stored [batch, seq, heads, dim] and viewed [batch, heads, seq, dim], as transformers does.
    qb = torch.randn(B, S, NH7, D7, device=dev, dtype=bf, requires_grad=True)
    kb = torch.randn(B, S, KV7, D7, device=dev, dtype=bf, requires_grad=True)
    vb = torch.randn(B, S, KV7, D7, device=dev, dtype=bf, requires_grad=True)
    rep = NH7 // KV7

    def gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def expanded(q, k, v):
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
        )

    def run(f):
        return f(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2))

    variants = []
    for label, f in (("enable_gqa=True", gqa), ("repeat_interleave K/V", expanded)):
        try:
            out = run(f)
            torch.cuda.synchronize()
            del out
            variants.append((label, f))
        except (TypeError, RuntimeError) as e:  # enable_gqa needs torch >= 2.5
            rec.errors[f"attention_train ({label})"] = f"{type(e).__name__}: {e}"
        rec.free()
    if not variants:
        raise RuntimeError("no SDPA variant ran")
    fwd, bwd = {}, {}
    for label, f in variants:
        t = rec.median("attention_train_fwd", lambda: run(f), iters)
        if t is not None:
            fwd[label] = t
        out = run(f)
        dout = torch.randn_like(out)
        t = rec.median(
            "attention_train_bwd", lambda: torch.autograd.grad(out, (qb, kb, vb), dout, retain_graph=True), iters
        )
        if t is not None:
            bwd[label] = t
        del out, dout
        rec.free()
    for name, times in (("attention_train_fwd", fwd), ("attention_train_bwd", bwd)):
        if not times:
            continue
        best = min(times, key=times.get)
        rec.ms[name] = times[best]
        rec.errors.pop(name, None)
        note = "SDPA " + best + (", inputs requiring grad" if name == "attention_train_fwd" else "")
        if len(times) > 1:
            note += " (faster of: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()) + ")"
        if name == "attention_train_bwd":
            note += "; backward alone: autograd.grad of one saved forward (retain_graph)"
        rec.notes[name] = note


def lora_rows(rec, iters):
    """F.linear at the gate/up shape, forward + dx alone (frozen base), and with a rank-16 LoRA
    branch x@A^T@B^T*scale, forward + backward (grads of x, A, B)."""
    import torch
    import torch.nn.functional as F

    dev, bf = DEV, torch.bfloat16
    M, K, N, R, scale = ROWS, H7, I7, 16, 2.0
    x = torch.randn(M, K, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(N, K, device=dev, dtype=bf) * 0.02
    a = (torch.randn(R, K, device=dev, dtype=bf) * 0.02).requires_grad_()
    b = (torch.randn(N, R, device=dev, dtype=bf) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=bf)

    def base():
        return torch.autograd.grad(F.linear(x, w), (x,), dy)

    def lora():
        y = F.linear(x, w) + F.linear(F.linear(x, a), b) * scale
        return torch.autograd.grad(y, (x, a, b), dy)

    rec.median("linear_fwd_dx", base, iters)
    rec.median("lora_linear_fwd_bwd", lora, iters)
    rec.notes["linear_fwd_dx"] = "F.linear forward + grad of x (W frozen)"
    rec.notes["lora_linear_fwd_bwd"] = "F.linear(x, W) + F.linear(F.linear(x, A), B) * 2, grads of x, A, B (bf16)"


def logprob_rows(rec, iters):
    """Eager log-probs of the target tokens over the full vocabulary, forward + backward: with
    the head frozen (LoRA: grad of h only) and with its gradient."""
    import torch

    dev, bf = DEV, torch.bfloat16
    T, V = ROWS, LOGPROB_VOCAB
    h = torch.randn(T, H7, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(V, H7, device=dev, dtype=bf) * 0.02
    tgt = (torch.arange(T, device=dev) * 7919) % V
    dl = torch.randn(T, device=dev, dtype=torch.float32) / T

    def logp(weight):
        return torch.log_softmax((h @ weight.T).float(), -1).gather(1, tgt[:, None]).squeeze(1)

    def frozen():
        return torch.autograd.grad(logp(w), (h,), dl)

    rec.median("token_logprobs_fwd_bwd", frozen, min(iters, 5))
    rec.peak("token_logprobs_fwd_bwd", frozen)
    rec.notes["token_logprobs_fwd_bwd"] = "log_softmax((h @ W.T).float()).gather, grad of h"
    rec.free()
    wg = w.clone().requires_grad_()
    del w

    def with_dw():
        return torch.autograd.grad(logp(wg), (h, wg), dl)

    rec.median("token_logprobs_fwd_bwd_dw", with_dw, min(iters, 5))
    rec.peak("token_logprobs_fwd_bwd_dw", with_dw)
    rec.notes["token_logprobs_fwd_bwd_dw"] = "grads of h and W (bf16 dW, returned)"


def lora_shapes():
    """The adapters of a rank-16 LoRA on all seven modules of the 7B's 28 layers, as
    src/diagnostics/ops/optimizer.rs lists them: A [16, in], B [out, 16]."""
    qd, kvd = NH7 * D7, KV7 * D7
    dims = [(H7, qd), (H7, kvd), (H7, kvd), (qd, H7), (H7, I7), (H7, I7), (I7, H7)]  # (in, out)
    return [s for _ in range(L7) for i, o in dims for s in ((16, i), (o, 16))]


def layer_shapes(layers):
    """Every weight of the first `layers` layers of the 7B (model/qwen2.rs param_shapes order)."""
    qd, kvd = NH7 * D7, KV7 * D7
    one = [(H7,), (qd, H7), (qd,), (kvd, H7), (kvd,), (kvd, H7), (kvd,), (H7, qd), (H7,), (I7, H7), (I7, H7), (H7, I7)]
    return one * layers


def adamw_rows(rec, iters):
    """torch.optim.AdamW(fused=True) steps over f32 parameters with f32 gradients (the f32
    master weights of mixed-precision training), weight decay on matrices only."""
    import torch

    for name, shapes in (("adamw_lora_7b", lora_shapes()), ("adamw_1b", layer_shapes(4))):
        params = [torch.nn.Parameter(torch.randn(*s, device=DEV) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        kind = "fused"
        try:
            opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except (TypeError, RuntimeError, ValueError):
            opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, foreach=True)
            kind = "foreach"
        rec.median(name, opt.step, iters)
        n = sum(p.numel() for p in params)
        rec.notes[name] = f"torch.optim.AdamW({kind}=True), {len(params)} f32 tensors, {n / 1e6:.1f}M values"
        del opt, groups, params
        rec.free()


def sft_row(rec, model, iters):
    """One LoRA SFT step of the transformers 7B-shaped model (peft, rank 16, alpha 32, no
    dropout, all seven modules) over one sequence of 8192 tokens: zero grads, forward with the
    loss, backward, clip the grad norm to 1, fused AdamW. Without gradient checkpointing when it
    fits; on out-of-memory, again with it (noted)."""
    import torch

    name = "sft_step_7b_lora"
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        rec.errors[name] = f"skipped: peft is not importable ({e})"
        return
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=MODULES, bias="none")
    pm = get_peft_model(model, cfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)
        kind = "fused"
    except (TypeError, RuntimeError, ValueError):
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True)
        kind = "foreach"
    ids = (torch.arange(ROWS, device=DEV)[None] * 7919) % V7

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = pm(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    oom_error = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    checkpointing = False
    oom = False
    try:
        step()
        torch.cuda.synchronize()
    except oom_error as e:
        if "out of memory" not in str(e).lower():
            raise
        oom = True
    if oom:
        opt.zero_grad(set_to_none=True)
        rec.free()
        try:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except TypeError:  # older transformers
            pm.gradient_checkpointing_enable()
            pm.enable_input_require_grads()
        checkpointing = True
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rec.median(name, step, min(iters, 3))
    if name in rec.ms:
        rec.peak_mib[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    rec.notes[name] = (
        f"transformers + peft r16 all modules, SDPA, AdamW({kind}=True); "
        + ("gradient checkpointing (out of memory without)" if checkpointing else "no gradient checkpointing")
    )
    del opt, params, pm


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
    del cache, tok, pos, ids
    return model


if __name__ == "__main__":
    # The JSON (printed to sys.__stdout__) is the only thing on stdout: anything a library
    # prints goes to stderr.
    sys.stdout = sys.stderr
    sys.exit(main())

"""Reference gradients from PyTorch autograd for the Rust training tests.

Run as `python3 tools/make_grad_fixtures.py` (re-executes itself inside the pinned reference
venv, see refenv.py). For the fixture models `tiny` (tied embeddings) and `odd` (untied,
GQA 3:1) it writes `tests/fixtures/<model>/grads.safetensors`:

    input_ids  I64 [total]   three sequences of different lengths, concatenated
    seq_lens   I64 [S]
    trained    I64 [total]   1 where the token is learned (its prediction enters the loss)
    logp       F32 [total]   log p(token t+1 | ..t) at row t; 0 on each sequence's last row
    loss       F32 [1]       -sum(trained[t+1] * logp[t]) / (number of trained targets)
    grad.NAME  F32 [shape]   d loss / d parameter, for every parameter (HF names; a tied
                             head's gradient is part of model.embed_tokens.weight)
    adamw.NAME F32 [shape]   every parameter after ADAMW_STEPS steps of torch.optim.AdamW on
                             the same batch (ADAMW hyper-parameters; weight decay on matrices
                             only; clip_grad_norm_ to MAX_GRAD_NORM before each step)
    adamw_loss F32 [ADAMW_STEPS]  the loss before each of those steps

and `tests/fixtures/<model>/lora_grads.safetensors` for a PEFT LoRA on all seven linear
modules (LORA settings, B initialised non-zero so that A receives gradients too):

    lora.NAME       F32   every adapter tensor (PEFT's adapter_model.safetensors names)
    lora_grad.NAME  F32   d loss / d adapter tensor, same loss and batch as above
    lora_loss       F32 [1]

Everything is float32 with eager attention on the stored (upcast) weights; each sequence is
run on its own, as the Rust side packs them without cross-attention.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refenv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from make_reference import load_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SEQ_LENS = (17, 9, 26)
SEED = 4321
ADAMW_STEPS = 3
# A large eps keeps the comparison well-conditioned: with eps 1e-8, gradients near 0 give
# updates of +-lr whose sign f32 rounding decides.
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1)
MAX_GRAD_NORM = 1.0
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def batch(vocab):
    gen = torch.Generator().manual_seed(SEED)
    seqs = []
    for n in SEQ_LENS:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        trained = torch.rand(n, generator=gen) < 0.6
        trained[0] = False  # the first token is never a target
        seqs.append((ids, trained))
    return seqs


def masked_loss(model, seqs):
    """(loss, per-row logp) of the masked mean cross-entropy over the sequences."""
    n_trained = sum(int(t[1:].sum()) for _, t in seqs)
    loss = torch.zeros(())
    logps = []
    for ids, trained in seqs:
        logits = model(ids[None]).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[1:, None])[:, 0]
        loss = loss - (logp * trained[1:].float()).sum() / n_trained
        logps.append(torch.cat([logp.detach(), torch.zeros(1)]))
    return loss, logps


def adamw_run(model, seqs):
    """ADAMW_STEPS optimiser steps; returns the loss before each."""
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2]},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, foreach=False, **ADAMW)
    losses = []
    for _ in range(ADAMW_STEPS):
        opt.zero_grad()
        loss, _ = masked_loss(model, seqs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        losses.append(loss.item())
    return losses


def reference(model_dir):
    model = load_model(model_dir)
    model.train(False)
    seqs = batch(model.config.vocab_size)
    n_trained = sum(int(t[1:].sum()) for _, t in seqs)
    loss, logps = masked_loss(model, seqs)
    loss.backward()
    out = {
        "input_ids": torch.cat([s[0] for s in seqs]).numpy().astype(np.int64),
        "seq_lens": np.asarray(SEQ_LENS, dtype=np.int64),
        "trained": torch.cat([s[1] for s in seqs]).numpy().astype(np.int64),
        "logp": torch.cat(logps).numpy().astype(np.float32),
        "loss": np.asarray([loss.item()], dtype=np.float32),
    }
    for name, p in model.named_parameters():
        out[f"grad.{name}"] = p.grad.detach().numpy().astype(np.float32)
    out["adamw_loss"] = np.asarray(adamw_run(model, seqs), dtype=np.float32)
    for name, p in model.named_parameters():
        out[f"adamw.{name}"] = p.detach().numpy().astype(np.float32)
    path = model_dir / "grads.safetensors"
    save_file(out, str(path))
    path.chmod(0o644)  # safetensors writes 0600
    print(f"{model_dir.name}: loss {loss.item():.6f}, adamw losses {out['adamw_loss'].tolist()}, "
          f"trained targets {n_trained}")


def lora_reference(model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(load_model(model_dir), LoraConfig(**LORA))
    model.train(False)
    seqs = batch(model.config.vocab_size)
    loss, _ = masked_loss(model, seqs)
    loss.backward()
    out = {"lora_loss": np.asarray([loss.item()], dtype=np.float32)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")  # the adapter file's names
            out[f"lora.{key}"] = p.detach().numpy().astype(np.float32)
            out[f"lora_grad.{key}"] = p.grad.detach().numpy().astype(np.float32)
    path = model_dir / "lora_grads.safetensors"
    save_file(out, str(path))
    path.chmod(0o644)
    print(f"{model_dir.name}: LoRA loss {loss.item():.6f}, {(len(out) - 1) // 2} adapter tensors")


def main():
    torch.manual_seed(0)
    for name in ("tiny", "odd"):
        reference(FIXTURES / name)
        lora_reference(FIXTURES / name)


if __name__ == "__main__":
    main()

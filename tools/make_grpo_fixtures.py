"""A PyTorch reference of protege's GRPO objective for the Rust tests.

Run as `python3 tools/make_grpo_fixtures.py` (re-executes itself inside the pinned reference
venv, see refenv.py). For the tiny fixture model it writes `tests/fixtures/tiny/grpo.safetensors`:
two groups of three "episodes" (random token sequences with a random policy-token mask), fixed
rewards, old and reference log-probs near the current ones (so that some ratios are clipped on
either side), and for each loss aggregation the loss and the gradient of every parameter:

    input_ids   I64 [total]   the six sequences, concatenated
    seq_lens    I64 [6]
    policy      I64 [total]   1 where the token is the policy's own (its prediction is trained)
    rewards     F32 [6]
    group       I64 [6]
    old_logp    F32 [total]   row t: log p_old(token t+1); 0 on each sequence's last row
    ref_logp    F32 [total]   same for the reference
    adv         F32 [6]       (r - mean) / (std + 1e-6) per group, std with Bessel's correction
    logp        F32 [total]   the current model's log p (temperature TEMPERATURE)
    loss.AGG    F32 [1]       AGG in token-mean, seq-mean-token-sum, seq-mean-token-mean
    grad.AGG.NAME F32         d loss / d parameter (HF names): every parameter for token-mean,
                              a few (SOME_GRADS) for the other aggregations (fixture size)

The objective per policy token t of episode i (advantage A_i):

    r_t  = exp(logp_t - old_t)
    pg_t = max(-A_i r_t, -A_i clamp(r_t, 1 - CLIP_LOW, 1 + CLIP_HIGH))
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    loss = aggregate(pg_t + KL_BETA kl_t)

with logp computed from logits / TEMPERATURE, in float32 with eager attention.
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
SEQ_LENS = (21, 14, 30, 9, 25, 17)
GROUPS = (0, 0, 0, 1, 1, 1)
REWARDS = (1.0, -0.5, 0.25, -3.0, 2.0, 0.0)
SEED = 2468
TEMPERATURE = 0.8
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
KL_BETA = 0.05
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
SOME_GRADS = ("model.norm.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.bias")


def advantages():
    r = torch.tensor(REWARDS, dtype=torch.float64)
    g = torch.tensor(GROUPS)
    adv = torch.zeros_like(r)
    for k in g.unique():
        m = g == k
        adv[m] = (r[m] - r[m].mean()) / (r[m].std() + 1e-6)
    return adv


def row_logp(model, ids):
    logits = model(ids[None]).logits[0, :-1].float() / TEMPERATURE
    lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
    return torch.cat([lp, torch.zeros(1)])


def objective(model, seqs, adv, agg):
    total = sum(int(p[1:].sum()) for _, p, _, _ in seqs)
    n_seq = len(seqs)
    loss = torch.zeros(())
    for i, (ids, policy, old, ref) in enumerate(seqs):
        lp = row_logp(model, ids)
        mask = torch.cat([policy[1:], torch.zeros(1, dtype=torch.bool)]).float()
        ratio = torch.exp(lp - old)
        pg = torch.maximum(-adv[i] * ratio, -adv[i] * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH))
        diff = ref - lp
        kl = torch.exp(diff) - diff - 1
        per = (pg + KL_BETA * kl) * mask
        if agg == "token-mean":
            loss = loss + per.sum() / total
        elif agg == "seq-mean-token-sum":
            loss = loss + per.sum() / n_seq
        else:
            loss = loss + per.sum() / (n_seq * mask.sum())
    return loss


def main():
    model = load_model(FIXTURES / "tiny")
    model.train(False)
    gen = torch.Generator().manual_seed(SEED)
    vocab = model.config.vocab_size
    adv = advantages().float()
    seqs = []
    with torch.no_grad():
        for n in SEQ_LENS:
            ids = torch.randint(0, vocab, (n,), generator=gen)
            policy = torch.rand(n, generator=gen) < 0.5
            policy[0] = False
            lp = row_logp(model, ids)
            # Perturbed so that ratios reach both sides of the clip range.
            old = lp + 0.3 * torch.randn(n, generator=gen)
            ref = lp + 0.2 * torch.randn(n, generator=gen)
            old[-1] = 0.0
            ref[-1] = 0.0
            seqs.append((ids, policy, old, ref))
    out = {
        "input_ids": torch.cat([s[0] for s in seqs]).numpy().astype(np.int64),
        "seq_lens": np.asarray(SEQ_LENS, dtype=np.int64),
        "policy": torch.cat([s[1] for s in seqs]).numpy().astype(np.int64),
        "rewards": np.asarray(REWARDS, dtype=np.float32),
        "group": np.asarray(GROUPS, dtype=np.int64),
        "old_logp": torch.cat([s[2] for s in seqs]).numpy().astype(np.float32),
        "ref_logp": torch.cat([s[3] for s in seqs]).numpy().astype(np.float32),
        "adv": adv.numpy().astype(np.float32),
        "temperature": np.asarray([TEMPERATURE], dtype=np.float32),
        "hyper": np.asarray([CLIP_LOW, CLIP_HIGH, KL_BETA], dtype=np.float32),
    }
    with torch.no_grad():
        out["logp"] = torch.cat([row_logp(model, s[0]) for s in seqs]).numpy().astype(np.float32)
    for agg in AGGS:
        model.zero_grad()
        loss = objective(model, seqs, adv, agg)
        loss.backward()
        out[f"loss.{agg}"] = np.asarray([loss.item()], dtype=np.float32)
        for name, p in model.named_parameters():
            if agg == "token-mean" or name in SOME_GRADS:
                out[f"grad.{agg}.{name}"] = p.grad.detach().numpy().astype(np.float32)
        print(f"{agg}: loss {loss.item():.6f}")
    path = FIXTURES / "tiny" / "grpo.safetensors"
    save_file(out, str(path))
    path.chmod(0o644)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

"""Thread-level numpy emulation of kernels/flash_attn.cu, decode_attn.cu, attention_generic.cu,
launched as src/backend/cuda/mod.rs (prepare + attention) does."""
import numpy as np, math, sys

F32 = np.float32
NEG_INF = F32(-np.inf)
BF_NAN = np.uint16(0x7FC0)

# ---------------- bf16 helpers ----------------
def f2bf(x):
    """float32 -> bf16 bits, round to nearest even (cuda __float2bfloat16 / _rn)."""
    x = np.asarray(x, dtype=F32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r = np.where(np.isnan(x), np.uint16(0x7FFF), r)
    return r.astype(np.uint16)

def bf2f(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(F32)

def pack(lo, hi):  # two bf16 bits -> u32, lo in low half
    return lo.astype(np.uint32) | (hi.astype(np.uint32) << 16)

def unpack(u):
    return (u & 0xFFFF).astype(np.uint16), (u >> 16).astype(np.uint16)

# ---------------- checked global memory ----------------
class Mem:
    def __init__(self, name, arr, writable=False):
        self.name, self.a, self.writable = name, arr, writable
        self.writes = np.zeros(arr.shape[0], dtype=np.int32) if writable else None
    def _chk(self, idx, n, align):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() + n > self.a.shape[0]):
            raise IndexError(f"OOB {self.name}: idx range [{idx.min()},{idx.max()+n}) size {self.a.shape[0]}")
        if align and idx.size and np.any(idx % align):
            raise ValueError(f"misaligned {self.name} access (elements align {align})")
        return idx
    def ld(self, idx, n=1, align=1):
        idx = self._chk(idx, n, align)
        if n == 1:
            return self.a[idx]
        return self.a[idx[..., None] + np.arange(n)]
    def st(self, idx, vals, n=1, align=1):
        idx = self._chk(idx, n, align)
        if n == 1:
            np.add.at(self.writes, idx, 1); self.a[idx] = vals
        else:
            full = idx[..., None] + np.arange(n)
            np.add.at(self.writes, full.ravel(), 1); self.a[full] = vals

# ---------------- mma.m16n8k16.row.col.f32.bf16.bf16.f32 ----------------
lane = np.arange(32); G_ = lane >> 2; T4 = lane & 3
# A: 4 regs x 2 halves -> element i = 2*reg + half
A_row = np.zeros((32, 4, 2), int); A_col = np.zeros((32, 4, 2), int)
for r in range(4):
    for hh in range(2):
        i = 2 * r + hh
        A_row[:, r, hh] = G_ if (i < 2 or 4 <= i < 6) else G_ + 8
        A_col[:, r, hh] = T4 * 2 + (i & 1) + (8 if i >= 4 else 0)
B_row = np.zeros((32, 2, 2), int); B_col = np.zeros((32, 2, 2), int)
for r in range(2):
    for hh in range(2):
        i = 2 * r + hh
        B_row[:, r, hh] = T4 * 2 + (i & 1) + (8 if i >= 2 else 0)
        B_col[:, r, hh] = G_
C_row = np.zeros((32, 4), int); C_col = np.zeros((32, 4), int)
for i in range(4):
    C_row[:, i] = G_ + (8 if i >= 2 else 0); C_col[:, i] = T4 * 2 + (i & 1)
# coverage sanity
assert len(set(zip(A_row.ravel(), A_col.ravel()))) == 256
assert len(set(zip(B_row.ravel(), B_col.ravel()))) == 128
assert len(set(zip(C_row.ravel(), C_col.ravel()))) == 128

def mma(c, a, b0, b1):
    """c: (W,32,4) f32, a: (W,32,4) u32, b0,b1: (W,32) u32 -> new c. One mma per warp."""
    W = c.shape[0]
    lo, hi = unpack(a)                       # (W,32,4)
    av = np.stack([bf2f(lo), bf2f(hi)], -1)  # (W,32,4,2)
    A = np.zeros((W, 16, 16), np.float64)
    A[:, A_row, A_col] = av
    b = np.stack([b0, b1], -1)               # (W,32,2)
    blo, bhi = unpack(b)
    bv = np.stack([bf2f(blo), bf2f(bhi)], -1)  # (W,32,2,2)
    B = np.zeros((W, 16, 8), np.float64)
    B[:, B_row, B_col] = bv
    Cm = np.zeros((W, 16, 8), np.float64)
    Cm[:, C_row, C_col] = c
    D = (A @ B + Cm).astype(F32)
    return D[:, C_row, C_col]

def shfl_xor(v, o):  # v: (W,32,...) per-lane values
    return v[:, lane ^ o]

# ---------------- flash_prefill<D> ----------------
BR = BC = 64

def flash_block(D, tile, h, gm, scale_log2, block_size, heads, kv_heads, stats):
    q, kc, vc, out, tiles, srs, snn, snc, sbo, bts = gm
    NT = 128
    tid = np.arange(NT); warp = (tid >> 5).reshape(4, 32); ln = (tid & 31).reshape(4, 32)
    g = ln >> 2; t4 = ln & 3
    ks = np.full((BC, D + 8), BF_NAN, np.uint16)  # uninitialised shared memory = NaN
    vt = np.full((D, BC + 8), BF_NAN, np.uint16)
    s = int(tiles.ld(2 * tile)); q0 = int(tiles.ld(2 * tile + 1))
    n_new = int(snn.ld(s)); past = int(snc.ld(s)) - n_new
    row0 = int(srs.ld(s)); bt_off = int(sbo.ld(s))
    kvh = h // (heads // kv_heads)
    qd, kvd = heads * D, kv_heads * D
    ra = q0 + warp * 16 + g; rb = ra + 8
    va = ra < n_new; vb = rb < n_new
    pa = past + ra; pb = past + rb
    qf = np.zeros((4, 32, D // 16, 4), np.uint32)
    qa = (row0 + ra) * qd + h * D; qb = (row0 + rb) * qd + h * D
    def ldu32(mem, base, mask):
        r = np.zeros(base.shape, np.uint32)
        if mask.any():
            v = mem.ld(base[mask], 2, align=2); r[mask] = pack(v[..., 0], v[..., 1])
        return r
    for kk in range(D // 16):
        c = kk * 16 + t4 * 2
        qf[:, :, kk, 0] = ldu32(q, qa + c, va)
        qf[:, :, kk, 1] = ldu32(q, qb + c, vb)
        qf[:, :, kk, 2] = ldu32(q, qa + c + 8, va)
        qf[:, :, kk, 3] = ldu32(q, qb + c + 8, vb)
    o = np.zeros((4, 32, D // 8, 4), F32)
    m_a = np.full((4, 32), NEG_INF, F32); m_b = m_a.copy(); l_a = np.zeros((4, 32), F32); l_b = l_a.copy()
    kv_end = past + min(q0 + BR, n_new)
    seq_blocks = stats['seq_nblocks'][s]
    for k0 in range(0, kv_end, BC):
        # cooperative load, c = threadIdx.x + it*blockDim
        for it in range((BC * D // 8 + NT - 1) // NT):
            c = tid + it * NT
            act = c < BC * D // 8
            c = c[act]
            j = c // (D // 8); d = (c % (D // 8)) * 8
            pos = k0 + j
            kv = np.zeros((c.size, 8), np.uint16); vv = kv.copy()
            inb = pos < kv_end
            if inb.any():
                p = pos[inb]
                if np.any(p // block_size >= seq_blocks):
                    stats['issues'].add('flash: block table index beyond sequence table')
                slot = bts.ld(bt_off + p // block_size).astype(np.int64) * block_size + p % block_size
                kv[inb] = kc.ld(slot * kvd + kvh * D + d[inb], 8, align=8)
                vv[inb] = vc.ld(slot * kvd + kvh * D + d[inb], 8, align=8)
            assert np.all(d % 8 == 0)
            ks[j[:, None], d[:, None] + np.arange(8)] = kv
            rows = d[:, None] + np.arange(8)
            vt[rows, j[:, None] ^ (((rows >> 3) & 7) << 3)] = vv  # vt_col
        # S = Q K^T
        sc = np.zeros((4, 32, BC // 8, 4), F32)
        def ldsm_u32(arr, r, cidx):
            assert np.all(cidx % 2 == 0)
            return pack(arr[r, cidx], arr[r, cidx + 1])
        for nb in range(BC // 8):
            cc = np.zeros((4, 32, 4), F32)
            for kk in range(D // 16):
                col = kk * 16 + t4 * 2
                assert col.max() + 9 < D + 0 + 1  # never touch padding
                b0 = ldsm_u32(ks, nb * 8 + g, col); b1 = ldsm_u32(ks, nb * 8 + g, col + 8)
                cc = mma(cc, qf[:, :, kk], b0, b1)
            sc[:, :, nb] = cc
        mx_a = m_a.copy(); mx_b = m_b.copy()
        for nb in range(BC // 8):
            for e in range(2):
                key = k0 + nb * 8 + t4 * 2 + e
                sc[:, :, nb, e] = np.where(va & (key <= pa), sc[:, :, nb, e] * F32(scale_log2), NEG_INF)
                sc[:, :, nb, 2 + e] = np.where(vb & (key <= pb), sc[:, :, nb, 2 + e] * F32(scale_log2), NEG_INF)
                mx_a = np.fmax(mx_a, sc[:, :, nb, e]); mx_b = np.fmax(mx_b, sc[:, :, nb, 2 + e])
        mx_a = np.fmax(mx_a, shfl_xor(mx_a, 1)); mx_a = np.fmax(mx_a, shfl_xor(mx_a, 2))
        mx_b = np.fmax(mx_b, shfl_xor(mx_b, 1)); mx_b = np.fmax(mx_b, shfl_xor(mx_b, 2))
        base_a = np.where(mx_a == NEG_INF, F32(0), mx_a); base_b = np.where(mx_b == NEG_INF, F32(0), mx_b)
        with np.errstate(invalid='raise'):
            alpha_a = np.exp2(m_a - base_a).astype(F32); alpha_b = np.exp2(m_b - base_b).astype(F32)
        m_a, m_b = mx_a, mx_b
        l_a = (l_a * alpha_a).astype(F32); l_b = (l_b * alpha_b).astype(F32)
        o[..., 0] *= alpha_a[..., None]; o[..., 1] *= alpha_a[..., None]
        o[..., 2] *= alpha_b[..., None]; o[..., 3] *= alpha_b[..., None]
        for nb in range(BC // 8):
            for e in range(2):
                sc[:, :, nb, e] = np.exp2(sc[:, :, nb, e] - base_a)
                sc[:, :, nb, 2 + e] = np.exp2(sc[:, :, nb, 2 + e] - base_b)
                l_a = l_a + sc[:, :, nb, e]; l_b = l_b + sc[:, :, nb, 2 + e]
        for j in range(BC // 16):
            a = np.stack([pack(f2bf(sc[:, :, 2 * j, 0]), f2bf(sc[:, :, 2 * j, 1])),
                          pack(f2bf(sc[:, :, 2 * j, 2]), f2bf(sc[:, :, 2 * j, 3])),
                          pack(f2bf(sc[:, :, 2 * j + 1, 0]), f2bf(sc[:, :, 2 * j + 1, 1])),
                          pack(f2bf(sc[:, :, 2 * j + 1, 2]), f2bf(sc[:, :, 2 * j + 1, 3]))], -1)
            for nb in range(D // 8):
                col = j * 16 + t4 * 2
                assert col.max() + 9 < BC + 1
                r = nb * 8 + g
                swz = (nb & 7) << 3  # vt_col(nb * 8, base) = base ^ swz; the lane adds t4 * 2
                b0 = ldsm_u32(vt, r, ((j * 16) ^ swz) + t4 * 2); b1 = ldsm_u32(vt, r, ((j * 16 + 8) ^ swz) + t4 * 2)
                o[:, :, nb] = mma(o[:, :, nb], a, b0, b1)
    l_a = l_a + shfl_xor(l_a, 1); l_a = l_a + shfl_xor(l_a, 2)
    l_b = l_b + shfl_xor(l_b, 1); l_b = l_b + shfl_xor(l_b, 2)
    with np.errstate(divide='ignore'):
        inv_a = np.where(l_a > 0, F32(1) / l_a, F32(0)).astype(F32)
        inv_b = np.where(l_b > 0, F32(1) / l_b, F32(0)).astype(F32)
    if np.any(va & (l_a <= 0)) or np.any(vb & (l_b <= 0)):
        stats['issues'].add('flash: valid row with l == 0')
    for nb in range(D // 8):
        col = h * D + nb * 8 + t4 * 2
        for valid, r, i0, inv in ((va, ra, 0, inv_a), (vb, rb, 2, inv_b)):
            if valid.any():
                idx = ((row0 + r) * qd + col)[valid]
                vals = np.stack([f2bf(o[:, :, nb, i0] * inv), f2bf(o[:, :, nb, i0 + 1] * inv)], -1)[valid]
                out.st(idx, vals, 2, align=2)

# ---------------- decode_partial<D> + decode_combine ----------------
DECODE_WARPS = 4; MAX_GROUP = 16

def warp_sum(v):  # v (W,32)
    for o_ in (16, 8, 4, 2, 1):
        v = (v + shfl_xor(v, o_)).astype(F32)
    return v

def decode_block(D, di, kvh, sp, splits, gm, part_o, part_ml, block_size, heads, kv_heads, split_len, scale_log2, stats):
    q, kc, vc, dseqs, srs, snc, sbo, bts = gm
    PER = D // 32
    sm_m = np.full((4, MAX_GROUP), np.nan, F32); sm_l = sm_m.copy()
    sm_o = np.full((4, MAX_GROUP, D), np.nan, F32)
    s = int(dseqs.ld(di)); G = heads // kv_heads
    n_ctx = int(snc.ld(s)); row = int(srs.ld(s)); bt_off = int(sbo.ld(s))
    ln = np.arange(32)[None, :].repeat(4, 0); d0 = ln * PER
    qd, kvd = heads * D, kv_heads * D
    start = sp * split_len; end = min(n_ctx, start + split_len)
    qv = np.zeros((4, 32, MAX_GROUP, PER), F32); o = np.zeros_like(qv)
    m = np.full((4, 32, MAX_GROUP), NEG_INF, F32); l = np.zeros((4, 32, MAX_GROUP), F32)
    for gi in range(G):
        for e in range(PER):
            qv[:, :, gi, e] = bf2f(q.ld(row * qd + (kvh * G + gi) * D + d0 + e)) * F32(scale_log2)
    wv = np.arange(4)
    it = 0
    while True:
        pos = start + wv + DECODE_WARPS * it
        act = pos < end
        if not act.any():
            break
        W = np.nonzero(act)[0]; p = pos[W]
        if np.any(p // block_size >= stats['seq_nblocks'][s]):
            stats['issues'].add('decode: block table index beyond sequence table')
        slot = bts.ld(bt_off + p // block_size).astype(np.int64) * block_size + p % block_size
        base = (slot * kvd + kvh * D)[:, None] + d0[W]  # (w,32)
        kf = np.stack([bf2f(kc.ld(base + e)) for e in range(PER)], -1)
        vf = np.stack([bf2f(vc.ld(base + e)) for e in range(PER)], -1)
        for gi in range(G):
            dot = np.zeros((len(W), 32), F32)
            for e in range(PER):
                dot = (dot + qv[W, :, gi, e] * kf[..., e]).astype(F32)
            dot = warp_sum(dot)
            mo = m[W, :, gi]
            mn = np.fmax(mo, dot)
            alpha = np.exp2(mo - mn).astype(F32); pp = np.exp2(dot - mn).astype(F32)
            l[W, :, gi] = l[W, :, gi] * alpha + pp
            o[W, :, gi, :] = o[W, :, gi, :] * alpha[..., None] + pp[..., None] * vf
            m[W, :, gi] = mn
        it += 1
    for gi in range(G):
        sm_m[:, gi] = m[:, 0, gi]; sm_l[:, gi] = l[:, 0, gi]
        for e in range(PER):
            sm_o[:, gi, :][np.arange(4)[:, None], d0 + e] = o[:, :, gi, e]
    for idx0 in range(0, G * D, 128):
        idx = np.arange(idx0, min(idx0 + 128, G * D))
        gi = idx // D; d = idx % D
        M = np.full(idx.shape, NEG_INF, F32)
        for w in range(4):
            M = np.fmax(M, sm_m[w, gi])
        L = np.zeros(idx.shape, F32); O = np.zeros(idx.shape, F32)
        ok = M != NEG_INF
        for w in range(4):
            f = np.exp2(sm_m[w, gi] - M).astype(F32)
            L = np.where(ok, L + sm_l[w, gi] * f, L); O = np.where(ok, O + sm_o[w, gi, d] * f, O)
        if np.isnan(L).any() or np.isnan(O).any():
            stats['issues'].add('decode_partial: NaN in merge')
        part = ((di * heads + kvh * G + gi) * splits + sp).astype(np.int64)
        part_o.st(part * D + d, O)
        sel = d == 0
        part_ml.st(2 * part[sel], M[sel]); part_ml.st(2 * part[sel] + 1, L[sel])

def decode_combine(di, h, head_dim, splits, gm, out, heads, stats):
    part_o, part_ml, dseqs, srs = gm
    d = np.arange(head_dim)  # blockDim == head_dim, all threads pass d<head_dim
    base = (di * heads + h) * splits
    M = NEG_INF
    for sp in range(splits):
        M = np.fmax(M, part_ml.ld(2 * (base + sp)))
    L = F32(0); O = np.zeros(head_dim, F32)
    for sp in range(splits):
        mm_ = part_ml.ld(2 * (base + sp))
        if mm_ == NEG_INF:
            continue
        f = np.exp2(F32(mm_ - M)).astype(F32)
        L = F32(L + part_ml.ld(2 * (base + sp) + 1) * f)
        O = (O + part_o.ld((base + sp) * head_dim + d) * f).astype(F32)
    row = int(srs.ld(int(dseqs.ld(di))))
    res = O / L if L > 0 else np.zeros(head_dim, F32)
    if not L > 0:
        stats['issues'].add('decode_combine: L == 0')
    out.st(row * heads * head_dim + h * head_dim + d, f2bf(res.astype(F32)))

# ---------------- attention_generic (vectorised over all warps = (row, head)) ----------------
def generic_all(gm, out, rows, heads, kv_heads, head_dim, block_size, scale_log2, stats):
    q, kc, vc, row_seq, srs, snn, snc, sbo, bts = gm
    R = np.repeat(np.arange(rows), heads); H = np.tile(np.arange(heads), rows)
    s = row_seq.ld(R).astype(np.int64)
    pos = snc.ld(s) - snn.ld(s) + (R - srs.ld(s))
    bt_off = sbo.ld(s).astype(np.int64)
    kvh = H // (heads // kv_heads); kvd = kv_heads * head_dim
    qoff = R.astype(np.int64) * heads * head_dim + H * head_dim
    ln = np.arange(32)
    dd = ln[None, :] + 32 * np.arange(8)[:, None]  # (8,32) d for j
    qv = np.zeros((R.size, 32, 8), F32); o = np.zeros_like(qv)
    for j in range(8):
        d = ln + 32 * j; ok = d < head_dim
        if ok.any():
            qv[:, ok, j] = bf2f(q.ld(qoff[:, None] + d[ok])) * F32(scale_log2)
    m = np.full(R.size, NEG_INF, F32); l = np.zeros(R.size, F32)
    for key in range(int(pos.max()) + 1):
        A = np.nonzero(key <= pos)[0]
        if np.any(key // block_size >= stats['seq_nblocks'][s[A]]):
            stats['issues'].add('generic: block table index beyond sequence table')
        base = (bts.ld(bt_off[A] + key // block_size).astype(np.int64) * block_size + key % block_size) * kvd + kvh[A] * head_dim
        dot = np.zeros((A.size, 32), F32)
        vfs = []
        for j in range(8):
            d = ln + 32 * j; ok = d < head_dim
            if ok.any():
                kf = np.zeros((A.size, 32), F32); kf[:, ok] = bf2f(kc.ld(base[:, None] + d[ok]))
                dot = np.where(ok, (dot + qv[A, :, j] * kf).astype(F32), dot)
        dot = _wsum(dot)
        mn = np.fmax(m[A], dot[:, 0]); alpha = np.exp2(m[A] - mn).astype(F32); p = np.exp2(dot[:, 0] - mn).astype(F32)
        l[A] = l[A] * alpha + p
        for j in range(8):
            d = ln + 32 * j; ok = d < head_dim
            if ok.any():
                vf = bf2f(vc.ld(base[:, None] + d[ok]))
                o[A[:, None], np.nonzero(ok)[0][None, :], j] = o[A][:, ok, j] * alpha[:, None] + p[:, None] * vf
        m[A] = mn
    for j in range(8):
        d = ln + 32 * j; ok = d < head_dim
        if ok.any():
            out.st((qoff[:, None] + d[ok]).ravel(), f2bf((o[:, ok, j] / l[:, None]).astype(F32)).ravel())

def _wsum(v):  # (N,32)
    for o_ in (16, 8, 4, 2, 1):
        v = (v + v[:, np.arange(32) ^ o_]).astype(F32)
    return v

# =====================================================================================
# kernels/flash_attn_train.cu
# =====================================================================================
LOG2E = F32(1.4426950408889634); LN2 = F32(0.6931471805599453)
MUTATE = set()  # deliberate kernel bugs, to show the emulation has teeth (run_train.py --teeth)

def atomic_add(mem, idx, vals):
    """atomicAdd(float*, float) per lane, in lane order (f32 adds); counts adds per element."""
    idx = mem._chk(idx, 1, 1)
    if not hasattr(mem, 'adds'):
        mem.adds = np.zeros(mem.a.shape[0], np.int32)
    np.add.at(mem.a, idx, np.asarray(vals, F32))
    np.add.at(mem.adds, idx, 1)

def ldsm_x4(arr, width, rows, cols, trans=False):
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 over a 2D shared bf16 array `arr`
    (row stride arr.shape[1] elements, `width` of them holding data, the rest padding).
    rows, cols: (W,32) the row and first column each lane addresses (lane l: row l%8 of matrix
    l/8). Returns (W,32,4) u32: register i = matrix i; lane l gets row l/4, columns 2(l%4)+{0,1},
    or with .trans rows 2(l%4)+{0,1} of column l/4."""
    rows = np.asarray(rows); cols = np.asarray(cols)
    assert (arr.shape[1] * 2) % 16 == 0
    if np.any(cols % 8) or np.any(cols < 0) or np.any(cols + 8 > width) or np.any(rows < 0) or np.any(rows >= arr.shape[0]):
        raise IndexError('ldmatrix: misaligned, out of bounds or padding address')
    L = np.arange(32)
    out = np.zeros(rows.shape + (4,), np.uint32)
    for i in range(4):
        R = rows[:, 8 * i:8 * i + 8]; C = cols[:, 8 * i:8 * i + 8]
        M = arr[R[..., None], C[..., None] + np.arange(8)]  # (W,8,8): row r of matrix i
        if not trans:
            lo, hi = M[:, L // 4, 2 * (L % 4)], M[:, L // 4, 2 * (L % 4) + 1]
        else:
            lo, hi = M[:, 2 * (L % 4), L // 4], M[:, 2 * (L % 4) + 1, L // 4]
        out[..., i] = pack(lo, hi)
    return out

def _ldu32(mem, base, mask):
    r = np.zeros(base.shape, np.uint32)
    if mask.any():
        v = mem.ld(base[mask], 2, align=2); r[mask] = pack(v[..., 0], v[..., 1])
    return r

def train_fwd_block(D, tile, h, gm, scale_log2, heads, kv_heads, stats):
    """flash_train_fwd<D>: block (tile, h), 128 threads = 4 warps x 32 lanes, vectorised."""
    q, k, v, out, lse, tiles, srs, snn = gm
    NT = 128
    tid = np.arange(NT); warp = (tid >> 5).reshape(4, 32); ln = (tid & 31).reshape(4, 32)
    g = ln >> 2; t4 = ln & 3
    ks = np.full((BC, D + 8), BF_NAN, np.uint16)
    vt = np.full((D, BC + 8), BF_NAN, np.uint16)
    s = int(tiles.ld(2 * tile)); q0 = int(tiles.ld(2 * tile + 1))
    n_new = int(snn.ld(s)); row0 = int(srs.ld(s))
    kvh = h // (heads // kv_heads)
    qd, kvd = heads * D, kv_heads * D
    ra = q0 + warp * 16 + g; rb = ra + 8
    va = ra < n_new; vb = rb < n_new
    qf = np.zeros((4, 32, D // 16, 4), np.uint32)
    qa = (row0 + ra) * qd + h * D; qb = (row0 + rb) * qd + h * D
    for kk in range(D // 16):
        c = kk * 16 + t4 * 2
        qf[:, :, kk, 0] = _ldu32(q, qa + c, va); qf[:, :, kk, 1] = _ldu32(q, qb + c, vb)
        qf[:, :, kk, 2] = _ldu32(q, qa + c + 8, va); qf[:, :, kk, 3] = _ldu32(q, qb + c + 8, vb)
    if 'fwd_swap_q' in MUTATE:
        qf[..., [1, 2]] = qf[..., [2, 1]]
    o = np.zeros((4, 32, D // 8, 4), F32)
    m_a = np.full((4, 32), NEG_INF, F32); m_b = m_a.copy(); l_a = np.zeros((4, 32), F32); l_b = l_a.copy()
    kv_end = min(q0 + BR, n_new)
    for k0 in range(0, kv_end, BC):
        for it in range((BC * D // 8 + NT - 1) // NT):
            c = tid + it * NT
            c = c[c < BC * D // 8]
            j = c // (D // 8); d = (c % (D // 8)) * 8
            kv = np.zeros((c.size, 8), np.uint16); vv = kv.copy()
            inb = k0 + j < kv_end
            if inb.any():
                off = (row0 + k0 + j[inb]) * kvd + kvh * D + d[inb]
                kv[inb] = k.ld(off, 8, align=8); vv[inb] = v.ld(off, 8, align=8)
            ks[j[:, None], d[:, None] + np.arange(8)] = kv
            rows = d[:, None] + np.arange(8)
            vt[rows, j[:, None] ^ (((rows >> 3) & 7) << 3)] = vv
        sc = np.zeros((4, 32, BC // 8, 4), F32)
        for nb in range(BC // 8):
            cc = np.zeros((4, 32, 4), F32)
            for kk in range(D // 16):
                col = kk * 16 + t4 * 2
                b0 = pack(ks[nb * 8 + g, col], ks[nb * 8 + g, col + 1])
                b1 = pack(ks[nb * 8 + g, col + 8], ks[nb * 8 + g, col + 9])
                cc = mma(cc, qf[:, :, kk], b0, b1)
            sc[:, :, nb] = cc
        mx_a = m_a.copy(); mx_b = m_b.copy()
        for nb in range(BC // 8):
            for e in range(2):
                key = k0 + nb * 8 + t4 * 2 + e
                sc[:, :, nb, e] = np.where(va & (key <= ra), sc[:, :, nb, e] * F32(scale_log2), NEG_INF)
                sc[:, :, nb, 2 + e] = np.where(vb & (key <= rb), sc[:, :, nb, 2 + e] * F32(scale_log2), NEG_INF)
                mx_a = np.fmax(mx_a, sc[:, :, nb, e]); mx_b = np.fmax(mx_b, sc[:, :, nb, 2 + e])
        mx_a = np.fmax(mx_a, shfl_xor(mx_a, 1)); mx_a = np.fmax(mx_a, shfl_xor(mx_a, 2))
        mx_b = np.fmax(mx_b, shfl_xor(mx_b, 1)); mx_b = np.fmax(mx_b, shfl_xor(mx_b, 2))
        base_a = np.where(mx_a == NEG_INF, F32(0), mx_a); base_b = np.where(mx_b == NEG_INF, F32(0), mx_b)
        with np.errstate(invalid='raise'):
            alpha_a = np.exp2(m_a - base_a).astype(F32); alpha_b = np.exp2(m_b - base_b).astype(F32)
        m_a, m_b = mx_a, mx_b
        l_a = (l_a * alpha_a).astype(F32); l_b = (l_b * alpha_b).astype(F32)
        o[..., 0] *= alpha_a[..., None]; o[..., 1] *= alpha_a[..., None]
        o[..., 2] *= alpha_b[..., None]; o[..., 3] *= alpha_b[..., None]
        for nb in range(BC // 8):
            for e in range(2):
                sc[:, :, nb, e] = np.exp2(sc[:, :, nb, e] - base_a)
                sc[:, :, nb, 2 + e] = np.exp2(sc[:, :, nb, 2 + e] - base_b)
                l_a = l_a + sc[:, :, nb, e]; l_b = l_b + sc[:, :, nb, 2 + e]
        for j in range(BC // 16):
            a = np.stack([pack(f2bf(sc[:, :, 2 * j, 0]), f2bf(sc[:, :, 2 * j, 1])),
                          pack(f2bf(sc[:, :, 2 * j, 2]), f2bf(sc[:, :, 2 * j, 3])),
                          pack(f2bf(sc[:, :, 2 * j + 1, 0]), f2bf(sc[:, :, 2 * j + 1, 1])),
                          pack(f2bf(sc[:, :, 2 * j + 1, 2]), f2bf(sc[:, :, 2 * j + 1, 3]))], -1)
            for nb in range(D // 8):
                r = nb * 8 + g
                swz = (nb & 7) << 3
                c0 = ((j * 16) ^ swz) + t4 * 2; c1 = ((j * 16 + 8) ^ swz) + t4 * 2
                b0 = pack(vt[r, c0], vt[r, c0 + 1]); b1 = pack(vt[r, c1], vt[r, c1 + 1])
                o[:, :, nb] = mma(o[:, :, nb], a, b0, b1)
    l_a = l_a + shfl_xor(l_a, 1); l_a = l_a + shfl_xor(l_a, 2)
    l_b = l_b + shfl_xor(l_b, 1); l_b = l_b + shfl_xor(l_b, 2)
    with np.errstate(divide='ignore'):
        inv_a = np.where(l_a > 0, F32(1) / l_a, F32(0)).astype(F32)
        inv_b = np.where(l_b > 0, F32(1) / l_b, F32(0)).astype(F32)
    if np.any(va & (l_a <= 0)) or np.any(vb & (l_b <= 0)):
        stats['issues'].add('train fwd: valid row with l == 0')
    for nb in range(D // 8):
        col = h * D + nb * 8 + t4 * 2
        for valid, r, i0, inv in ((va, ra, 0, inv_a), (vb, rb, 2, inv_b)):
            if valid.any():
                idx = ((row0 + r) * qd + col)[valid]
                vals = np.stack([f2bf(o[:, :, nb, i0] * inv), f2bf(o[:, :, nb, i0 + 1] * inv)], -1)[valid]
                out.st(idx, vals, 2, align=2)
    with np.errstate(divide='ignore'):
        for valid, r, m, l in ((va, ra, m_a, l_a), (vb, rb, m_b, l_b)):
            sel = valid & (t4 == 0)
            if sel.any():
                lse.st(((row0 + r) * heads + h)[sel], ((m + np.log2(l).astype(F32)) * LN2).astype(F32)[sel])

def train_bwd_pre_all(out, dout, delta, rows, heads, head_dim):
    """flash_train_bwd_pre: grid (rows, heads), block 32: block (r, h) is warp w = r * heads + h."""
    r, h = np.meshgrid(np.arange(rows), np.arange(heads), indexing='ij')
    w = (r * heads + h).ravel()
    lane = np.arange(32)
    acc = np.zeros((w.size, 32), F32)
    for d0 in range(0, head_dim, 64):
        d = lane * 2 + d0; ok = d < head_dim
        if not ok.any(): continue
        base = (w[:, None] * head_dim + d[None, ok])
        a = bf2f(out.ld(base, 2, align=2)); b = bf2f(dout.ld(base, 2, align=2))
        acc[:, ok] = (acc[:, ok] + (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]).astype(F32)).astype(F32)
    acc = _wsum(acc)
    delta.st(w, acc[:, 0])

def train_bwd_block(D, BRQ, tile, kvh, gm, scale_log2, heads, kv_heads, stats):
    """flash_train_bwd<D, BRQ>: block (tile, kvh), 128 threads = 4 warps x 32 lanes, vectorised
    over warps; warp-uniform branches run on the subset of warps taking them."""
    q, k, v, dout, lse, delta, dq_acc, dk, dv, tiles, srs, snn = gm
    NT = 128
    tid = np.arange(NT); warp = (tid >> 5).reshape(4, 32); ln = (tid & 31).reshape(4, 32)
    g = ln >> 2; t4 = ln & 3
    ks = np.full((BC, D + 8), BF_NAN, np.uint16); vs = ks.copy()
    qs = np.full((BRQ, D + 8), BF_NAN, np.uint16); dos = qs.copy()
    dss = np.full((BRQ, BC + 8), BF_NAN, np.uint16)
    lse2s = np.full(BRQ, np.nan, F32); dls = lse2s.copy()
    s = int(tiles.ld(2 * tile)); k0 = int(tiles.ld(2 * tile + 1))
    n_new = int(snn.ld(s)); row0 = int(srs.ld(s))
    group = heads // kv_heads
    qd, kvd = heads * D, kv_heads * D
    scale = F32(F32(1) / np.sqrt(F32(D)))
    kw = k0 + warp * 16
    ka = kw + g; kb = ka + 8
    vka = ka < n_new; vkb = kb < n_new
    for it in range(BC * D // 8 // NT):
        c = tid + it * NT
        j = c // (D // 8); d = (c % (D // 8)) * 8
        kv = np.zeros((c.size, 8), np.uint16); vv = kv.copy()
        inb = k0 + j < n_new
        if inb.any():
            off = (row0 + k0 + j[inb]) * kvd + kvh * D + d[inb]
            kv[inb] = k.ld(off, 8, align=8); vv[inb] = v.ld(off, 8, align=8)
        ks[j[:, None], d[:, None] + np.arange(8)] = kv
        vs[j[:, None], d[:, None] + np.arange(8)] = vv
    dka = np.zeros((4, 32, D // 8, 4), F32); dva = dka.copy()
    a_row = (ln & 7) + ((ln >> 3) & 1) * 8; a_col = (ln >> 4) * 8
    b_row = (ln & 7) + (ln >> 4) * 8; b_col = ((ln >> 3) & 1) * 8
    t_row, t_col = a_row, a_col
    for hh in range(group):
        h = kvh * group + hh
        for q0 in range(k0, n_new, BRQ):
            # __syncthreads(); sub-tile load
            for it in range(BRQ * D // 8 // NT):
                c = tid + it * NT
                i = c // (D // 8); d = (c % (D // 8)) * 8
                qv = np.zeros((c.size, 8), np.uint16); ov = qv.copy()
                ok = q0 + i < n_new
                if ok.any():
                    off = (row0 + q0 + i[ok]) * qd + h * D + d[ok]
                    qv[ok] = q.ld(off, 8, align=8); ov[ok] = dout.ld(off, 8, align=8)
                qs[i[:, None], d[:, None] + np.arange(8)] = qv
                dos[i[:, None], d[:, None] + np.arange(8)] = ov
            i = tid[tid < BRQ]; ok = q0 + i < n_new
            lse2s[i] = 0; dls[i] = 0
            if ok.any():
                lse2s[i[ok]] = (lse.ld((row0 + q0 + i[ok]) * heads + h) * LOG2E).astype(F32)
                dls[i[ok]] = delta.ld((row0 + q0 + i[ok]) * heads + h)
            # __syncthreads()
            lim = min(q0 + BRQ, n_new)
            for j in range(BRQ // 16):
                qc = q0 + j * 16
                A = np.nonzero(kw[:, 0] < min(qc + 16, n_new))[0]  # warps taking the branch
                dp = np.zeros((4, 32, 2, 4), F32)
                if A.size:
                    W = A.size; gA, t4A = g[A], t4[A]
                    sc = np.zeros((W, 32, 2, 4), F32); dpa = sc.copy()
                    for kk in range(D // 16):
                        a = ldsm_x4(ks, D, warp[A] * 16 + a_row[A], kk * 16 + a_col[A])
                        b = ldsm_x4(qs, D, j * 16 + b_row[A], kk * 16 + b_col[A])
                        sc[:, :, 0] = mma(sc[:, :, 0], a, b[..., 0], b[..., 1])
                        sc[:, :, 1] = mma(sc[:, :, 1], a, b[..., 2], b[..., 3])
                        a = ldsm_x4(vs, D, warp[A] * 16 + a_row[A], kk * 16 + a_col[A])
                        b = ldsm_x4(dos, D, j * 16 + b_row[A], kk * 16 + b_col[A])
                        dpa[:, :, 0] = mma(dpa[:, :, 0], a, b[..., 0], b[..., 1])
                        dpa[:, :, 1] = mma(dpa[:, :, 1], a, b[..., 2], b[..., 3])
                    for nb in range(2):
                        for e in range(2):
                            qi = j * 16 + nb * 8 + t4A * 2 + e; qq = q0 + qi
                            l2 = lse2s[qi]; dl = dls[qi]
                            vq = qq < n_new
                            with np.errstate(over='ignore'):
                                pa = np.where(vq & (ka[A] <= qq), np.exp2((sc[:, :, nb, e] * F32(scale_log2) - l2).astype(F32)), F32(0)).astype(F32)
                                pb = np.where(vq & (kb[A] <= qq), np.exp2((sc[:, :, nb, 2 + e] * F32(scale_log2) - l2).astype(F32)), F32(0)).astype(F32)
                            sc[:, :, nb, e] = pa; sc[:, :, nb, 2 + e] = pb
                            dpa[:, :, nb, e] = pa * (dpa[:, :, nb, e] - dl)
                            dpa[:, :, nb, 2 + e] = pb * (dpa[:, :, nb, 2 + e] - dl)
                    pk = lambda x: np.stack([pack(f2bf(x[:, :, 0, 0]), f2bf(x[:, :, 0, 1])), pack(f2bf(x[:, :, 0, 2]), f2bf(x[:, :, 0, 3])),
                                             pack(f2bf(x[:, :, 1, 0]), f2bf(x[:, :, 1, 1])), pack(f2bf(x[:, :, 1, 2]), f2bf(x[:, :, 1, 3]))], -1)
                    pf = pk(sc); df = pk(dpa)
                    if 'bwd_swap_ds' in MUTATE:
                        df[..., [1, 2]] = df[..., [2, 1]]
                    for nb in range(0, D // 8, 2):
                        b = ldsm_x4(dos, D, j * 16 + t_row[A], nb * 8 + t_col[A], trans=True)
                        dva[A, :, nb] = mma(dva[A, :, nb], pf, b[..., 0], b[..., 1])
                        dva[A, :, nb + 1] = mma(dva[A, :, nb + 1], pf, b[..., 2], b[..., 3])
                        b = ldsm_x4(qs, D, j * 16 + t_row[A], nb * 8 + t_col[A], trans=True)
                        dka[A, :, nb] = mma(dka[A, :, nb], df, b[..., 0], b[..., 1])
                        dka[A, :, nb + 1] = mma(dka[A, :, nb + 1], df, b[..., 2], b[..., 3])
                    dp[A] = dpa
                for nb in range(2):
                    for e in range(2):
                        r = j * 16 + nb * 8 + t4 * 2 + e
                        dss[r, warp * 16 + g] = f2bf(dp[:, :, nb, e])
                        dss[r, warp * 16 + g + 8] = f2bf(dp[:, :, nb, 2 + e])
            # __syncthreads(); dQ
            RB = BRQ // 16; NBW = (D // 8) // (4 // RB)
            rb = warp % RB; nb0 = (warp // RB) * NBW
            npair = (lim - k0 + 31) >> 5
            af = [ldsm_x4(dss, BC, rb * 16 + a_row, kk * 16 + a_col) if (kk >> 1) < npair else None for kk in range(4)]
            qa = q0 + rb * 16 + g; qb = qa + 8
            pa = (row0 + qa) * qd + h * D + t4 * 2; pb = (row0 + qb) * qd + h * D + t4 * 2
            for n in range(NBW):
                nb = nb0 + n
                c = np.zeros((4, 32, 4), F32)
                for kp in range(2):
                    if kp < npair:
                        b = ldsm_x4(ks, D, kp * 32 + ln, nb * 8, trans='bwd_dq_notrans' not in MUTATE)
                        c = mma(c, af[2 * kp], b[..., 0], b[..., 1])
                        c = mma(c, af[2 * kp + 1], b[..., 2], b[..., 3])
                va_, vb_ = qa < n_new, qb < n_new
                # lanes in order; the two adds of a lane to different addresses
                if va_.any():
                    atomic_add(dq_acc, (pa + nb * 8)[va_], (c[..., 0] * scale)[va_])
                    atomic_add(dq_acc, (pa + nb * 8 + 1)[va_], (c[..., 1] * scale)[va_])
                if vb_.any():
                    atomic_add(dq_acc, (pb + nb * 8)[vb_], (c[..., 2] * scale)[vb_])
                    atomic_add(dq_acc, (pb + nb * 8 + 1)[vb_], (c[..., 3] * scale)[vb_])
    for nb in range(D // 8):
        col = kvh * D + nb * 8 + t4 * 2
        for valid, r, i0 in ((vka, ka, 0), (vkb, kb, 2)):
            if valid.any():
                idx = ((row0 + r) * kvd + col)[valid]
                dk.st(idx, np.stack([f2bf(dka[:, :, nb, i0] * scale), f2bf(dka[:, :, nb, i0 + 1] * scale)], -1)[valid], 2, align=2)
                dv.st(idx, np.stack([f2bf(dva[:, :, nb, i0]), f2bf(dva[:, :, nb, i0 + 1])], -1)[valid], 2, align=2)

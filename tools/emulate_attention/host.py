"""mod.rs prepare() + attention() replicated, plus the test harness."""
import numpy as np, math, sys, time
from emu import *

FLASH_ROWS = 64; DECODE_MAX_GROUP = 16; SMS = 132

def div_ceil(a, b): return -(-a // b)

def prepare(seqs, rows, block_size):
    row_seq = np.zeros(rows, np.int32)
    starts, n_new, n_ctx, bt_off, bts, tiles, decode = [], [], [], [], [], [], []
    max_decode_ctx = 0
    for s, sq in enumerate(seqs):
        row_seq[sq['row_start']:sq['row_start'] + sq['n_new']] = s
        starts.append(sq['row_start']); n_new.append(sq['n_new']); n_ctx.append(sq['n_ctx'])
        bt_off.append(len(bts)); bts.extend(sq['block_table'])
        if sq['n_new'] == 1:
            decode.append(s); max_decode_ctx = max(max_decode_ctx, sq['n_ctx'])
        else:
            for q0 in range(0, sq['n_new'], FLASH_ROWS):
                tiles += [s, q0]
    up = lambda v: np.array(v if len(v) else [0], np.int32)  # upload_i32
    return dict(rows=rows, row_seq=up(list(row_seq)), seq_row_start=up(starts), seq_n_new=up(n_new),
                seq_n_ctx=up(n_ctx), seq_bt_off=up(bt_off), block_tables=up(bts), block_size=max(block_size, 1),
                n_tiles=len(tiles) // 2, tiles=up(tiles), n_decode=len(decode), decode_seqs=up(decode),
                max_decode_ctx=max_decode_ctx)

def attention(q, kc, vc, out, meta, heads, kv_heads, head_dim, stats, path='auto'):
    if meta['rows'] == 0: return
    scale_log2 = F32(np.float32(math.log2(math.e)) / np.sqrt(F32(head_dim)))
    bs, h, kvh = meta['block_size'], heads, kv_heads
    M = lambda n: Mem(n, meta[n])
    fast = head_dim in (64, 128) and heads // kv_heads <= DECODE_MAX_GROUP and path == 'auto'
    stats['path'] = 'generic' if not fast else 'fast'
    if not fast:
        assert head_dim <= 256
        gm = (q, kc, vc, M('row_seq'), M('seq_row_start'), M('seq_n_new'), M('seq_n_ctx'), M('seq_bt_off'), M('block_tables'))
        generic_all(gm, out, meta['rows'], heads, kv_heads, head_dim, bs, scale_log2, stats)
        return
    if meta['n_tiles'] > 0:
        gm = (q, kc, vc, out, M('tiles'), M('seq_row_start'), M('seq_n_new'), M('seq_n_ctx'), M('seq_bt_off'), M('block_tables'))
        for hh in range(heads):          # grid (n_tiles, heads); blocks are independent
            for t in range(meta['n_tiles']):
                flash_block(head_dim, t, hh, gm, scale_log2, bs, heads, kv_heads, stats)
    if meta['n_decode'] > 0:
        want = div_ceil(2 * SMS, meta['n_decode'] * kv_heads)
        splits = min(max(want, 1), max(div_ceil(meta['max_decode_ctx'], 64), 1))  # clamp(1, hi)
        split_len = div_ceil(meta['max_decode_ctx'], splits)
        splits = div_ceil(meta['max_decode_ctx'], split_len)
        stats['splits'] = (splits, split_len)
        parts = meta['n_decode'] * heads * splits
        part_o = Mem('part_o', np.zeros(parts * head_dim, F32), True)
        part_ml = Mem('part_ml', np.zeros(parts * 2, F32), True)
        gm = (q, kc, vc, M('decode_seqs'), M('seq_row_start'), M('seq_n_ctx'), M('seq_bt_off'), M('block_tables'))
        for di in range(meta['n_decode']):
            for k in range(kv_heads):
                for sp in range(splits):
                    decode_block(head_dim, di, k, sp, splits, gm, part_o, part_ml, bs, heads, kv_heads, split_len, scale_log2, stats)
        if np.any(part_o.writes != 1) or np.any(part_ml.writes != 1):
            stats['issues'].add('decode workspace not written exactly once per element')
        gm2 = (part_o, part_ml, M('decode_seqs'), M('seq_row_start'))
        for di in range(meta['n_decode']):
            for hh in range(heads):
                decode_combine(di, hh, head_dim, splits, gm2, out, heads, stats)

def run_case(name, D, kv_heads, group, seq_specs, block_size=16, qscale=1.0, path='auto', seed=0):
    """seq_specs: list of (n_new, n_ctx)."""
    rng = np.random.default_rng(seed)
    heads = kv_heads * group
    rows = sum(n for n, _ in seq_specs)
    nblocks_per = [div_ceil(c, block_size) + (1 if i % 2 else 0) for i, (n, c) in enumerate(seq_specs)]  # some tables longer than needed
    total_blocks = sum(nblocks_per) + 3
    perm = rng.permutation(total_blocks)  # shuffled, non-contiguous
    kvd = kv_heads * D; qd = heads * D
    kc = np.full(total_blocks * block_size * kvd, BF_NAN, np.uint16)  # unwritten slots = NaN
    vc = kc.copy()
    q = f2bf((rng.standard_normal(rows * qd) * qscale).astype(F32))
    seqs = []; r0 = 0; bi = 0
    for i, (n, c) in enumerate(seq_specs):
        bt = [int(x) for x in perm[bi:bi + nblocks_per[i]]]; bi += nblocks_per[i]
        seqs.append(dict(row_start=r0, n_new=n, n_ctx=c, block_table=bt)); r0 += n
        for pos in range(c):
            slot = bt[pos // block_size] * block_size + pos % block_size
            kc[slot * kvd:(slot + 1) * kvd] = f2bf(rng.standard_normal(kvd).astype(F32))
            vc[slot * kvd:(slot + 1) * kvd] = f2bf(rng.standard_normal(kvd).astype(F32))
    meta = prepare(seqs, rows, block_size)
    out = Mem('out', np.full(rows * qd, BF_NAN, np.uint16), True)
    stats = dict(issues=set(), seq_nblocks=np.array(nblocks_per))
    t = time.time()
    with np.errstate(over='ignore'):
        attention(Mem('q', q), Mem('k_cache', kc), Mem('v_cache', vc), out, meta, heads, kv_heads, D, stats, path)
    # reference, float64
    qf = bf2f(q).astype(np.float64).reshape(rows, heads, D)
    K = bf2f(kc).astype(np.float64).reshape(-1, kv_heads, D); V = bf2f(vc).astype(np.float64).reshape(-1, kv_heads, D)
    ref = np.zeros((rows, heads, D))
    for sq in seqs:
        past = sq['n_ctx'] - sq['n_new']
        slots = np.array([sq['block_table'][p // block_size] * block_size + p % block_size for p in range(sq['n_ctx'])])
        for i in range(sq['n_new']):
            vis = past + i + 1
            for hh in range(heads):
                kh = hh // group
                sc = K[slots[:vis], kh] @ qf[sq['row_start'] + i, hh] / math.sqrt(D)
                p = np.exp(sc - sc.max()); p /= p.sum()
                ref[sq['row_start'] + i, hh] = p @ V[slots[:vis], kh]
    got = bf2f(out.a).astype(np.float64).reshape(rows, heads, D)
    nan = np.isnan(got).sum()
    if np.any(out.writes != 1):
        stats['issues'].add(f'out: {np.sum(out.writes == 0)} elems unwritten, {np.sum(out.writes > 1)} written >1x')
    err = np.abs(got - ref)
    # per-row relative error: |err| / max|ref| of the (row, head)
    rel = (err.max(-1) / np.maximum(np.abs(ref).max(-1), 1e-6)).max()
    dec_rows = [sq['row_start'] for sq in seqs if sq['n_new'] == 1]
    pre_rows = [sq['row_start'] + i for sq in seqs if sq['n_new'] != 1 for i in range(sq['n_new'])]
    e_dec = np.nanmax(err[dec_rows]) if dec_rows else float('nan')
    e_pre = np.nanmax(err[pre_rows]) if pre_rows else float('nan')
    print(f"{name:34s} D={D:3d} kvh={kv_heads} G={group} rows={rows:4d} path={stats['path']:7s} "
          f"splits={stats.get('splits','-')} maxabs={np.nanmax(err):.2e} (prefill {e_pre:.2e}, decode {e_dec:.2e}) "
          f"maxrel={rel:.2e} nan={nan} issues={sorted(stats['issues'])} [{time.time()-t:.0f}s]", flush=True)
    return np.nanmax(err), rel, nan, stats['issues']

# ---------------- training attention (kernels/flash_attn_train.cu) ----------------
TRAIN_BRQ = {64: 64, 128: 16}  # the kernel's query sub-tile per head dim

def train_prepare(lengths):
    """Packed whole sequences: row starts, lengths and the (sequence, first row) list of 64-row tiles."""
    starts, tiles, r = [], [], 0
    for s, n in enumerate(lengths):
        starts.append(r); r += n
        for t0 in range(0, n, 64):
            tiles += [s, t0]
    up = lambda v: np.array(v if len(v) else [0], np.int32)
    return dict(rows=r, seq_row_start=up(starts), seq_n_new=up(list(lengths)), tiles=up(tiles), n_tiles=len(tiles) // 2)

def train_attention(q, k, v, dout, meta, heads, kv_heads, D, stats):
    """The launch sequence of the documented contract: forward, then pre, (zeroed dq_acc), backward, cast."""
    rows = meta['rows']
    scale_log2 = F32(np.float32(math.log2(math.e)) / np.sqrt(F32(D)))
    M = lambda n: Mem(n, meta[n])
    out = Mem('out', np.full(rows * heads * D, BF_NAN, np.uint16), True)
    lse = Mem('lse', np.full(rows * heads, np.nan, F32), True)
    gm = (q, k, v, out, lse, M('tiles'), M('seq_row_start'), M('seq_n_new'))
    for h in range(heads):                   # grid (n_tiles, heads)
        for t in range(meta['n_tiles']):
            train_fwd_block(D, t, h, gm, scale_log2, heads, kv_heads, stats)
    delta = Mem('delta', np.full(rows * heads, np.nan, F32), True)
    train_bwd_pre_all(Mem('out', out.a), dout, delta, rows, heads, D)
    dq_acc = Mem('dq_acc', np.zeros(rows * heads * D, F32), True)   # zeroed by the host
    dq_acc.adds = np.zeros(rows * heads * D, np.int32)
    dk = Mem('dk', np.full(rows * kv_heads * D, BF_NAN, np.uint16), True)
    dv = Mem('dv', np.full(rows * kv_heads * D, BF_NAN, np.uint16), True)
    gm = (q, k, v, dout, Mem('lse', lse.a), Mem('delta', delta.a), dq_acc, dk, dv, M('tiles'), M('seq_row_start'), M('seq_n_new'))
    for kh in range(kv_heads):               # grid (n_tiles, kv_heads)
        for t in range(meta['n_tiles']):
            train_bwd_block(D, TRAIN_BRQ[D], t, kh, gm, scale_log2, heads, kv_heads, stats)
    dq = Mem('dq', np.full(rows * heads * D, BF_NAN, np.uint16), True)
    dq.st(np.arange(rows * heads * D), f2bf(dq_acc.a))  # cast_f32_bf16 (elementwise.cu), grid-stride
    return out, lse, delta, dq_acc, dq, dk, dv

def train_reference(qf, kf, vf, dof, lengths, heads, kv_heads, D):
    """float64 CPU semantics (train_fwd / train_bwd of src/backend/cpu/attention.rs)."""
    rows = qf.shape[0]; G = heads // kv_heads; scale = 1 / math.sqrt(D)
    out = np.zeros((rows, heads, D)); lse = np.zeros((rows, heads))
    dq = np.zeros((rows, heads, D)); dk = np.zeros((rows, kv_heads, D)); dv = np.zeros((rows, kv_heads, D))
    r0 = 0
    for n in lengths:
        sl = slice(r0, r0 + n); mask = np.tril(np.ones((n, n), bool))
        for h in range(heads):
            kh = h // G
            Q, K, V, dO = qf[sl, h], kf[sl, kh], vf[sl, kh], dof[sl, h]
            S = np.where(mask, Q @ K.T * scale, -np.inf)
            m = S.max(1, keepdims=True); l = np.log(np.exp(S - m).sum(1, keepdims=True)) + m
            P = np.exp(S - l)
            O = P @ V
            out[sl, h] = O; lse[sl, h] = l[:, 0]
            dv[sl, kh] += P.T @ dO
            dP = dO @ V.T
            dS = P * (dP - (dO * O).sum(1, keepdims=True))
            dq[sl, h] = scale * dS @ K
            dk[sl, kh] += scale * dS.T @ Q
        r0 += n
    return out, lse, dq, dk, dv

def run_train_case(name, D, kv_heads, group, lengths, seed=0, qscale=1.0, quiet=False):
    rng = np.random.default_rng(seed)
    heads = kv_heads * group
    meta = train_prepare(lengths); rows = meta['rows']
    mk = lambda n, sc=1.0: f2bf((rng.standard_normal(n) * sc).astype(F32))
    qb, kb, vb, dob = mk(rows * heads * D, qscale), mk(rows * kv_heads * D), mk(rows * kv_heads * D), mk(rows * heads * D)
    stats = dict(issues=set())
    t = time.time()
    with np.errstate(over='ignore'):
        out, lse, delta, dq_acc, dq, dk, dv = train_attention(Mem('q', qb), Mem('k', kb), Mem('v', vb), Mem('dout', dob), meta, heads, kv_heads, D, stats)
    f = lambda b, hh: bf2f(b).astype(np.float64).reshape(rows, hh, D)
    ref = train_reference(f(qb, heads), f(kb, kv_heads), f(vb, kv_heads), f(dob, heads), lengths, heads, kv_heads, D)
    got = (f(out.a, heads), lse.a.astype(np.float64).reshape(rows, heads), f(dq.a, heads), f(dk.a, kv_heads), f(dv.a, kv_heads))
    for mem in (out, lse, dk, dv, dq):
        if np.any(mem.writes != 1):
            stats['issues'].add(f'{mem.name}: {np.sum(mem.writes == 0)} unwritten, {np.sum(mem.writes > 1)} written >1x')
    if np.any(delta.writes != 1):
        stats['issues'].add('delta not written exactly once')
    # every dq_acc element gets one atomic add per key tile its query sees: (i // 64) + 1
    want = np.concatenate([np.arange(n) // 64 + 1 for n in lengths])
    if np.any(dq_acc.adds.reshape(rows, heads * D) != want[:, None]):
        stats['issues'].add('dq_acc: unexpected number of atomic adds per element')
    nan = sum(int(np.isnan(x).sum()) for x in got)
    rel = {}
    for nm, gv, rv in zip(('out', 'lse', 'dq', 'dk', 'dv'), got, ref):
        rel[nm] = np.nanmax(np.abs(gv - rv)) / np.abs(rv).max()
    line = ' '.join(f'{k}={v:.2e}' for k, v in rel.items())
    if not quiet:
        print(f"{name:28s} D={D:3d} H={heads:2d} KVH={kv_heads} rows={rows:4d} tiles={meta['n_tiles']:2d} maxrel: {line} "
              f"nan={nan} issues={sorted(stats['issues'])} [{time.time()-t:.0f}s]", flush=True)
    return rel, nan, stats['issues']

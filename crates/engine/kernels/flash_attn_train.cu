// Flash attention for training (FlashAttention-2): forward with log-sum-exp, and backward, over a
// packed batch of whole sequences (no KV cache, no padding). Causal within each sequence,
// grouped-query (query head h reads kv head h / (heads / kv_heads)), head dim D = 64 or 128, bf16
// tensors, f32 math, bf16 tensor cores (mma.sync m16n8k16, f32 accumulators).
//
// Layouts (row-major, `rows` = total packed rows):
//   q, out, dout: bf16 [rows, heads * D]        k, v, dk, dv: bf16 [rows, kv_heads * D]
//   lse, delta:   f32  [rows, heads]            dq_acc: f32 [rows, heads * D]    dq: bf16 like q
// Sequence s occupies rows seq_row_start[s] .. seq_row_start[s] + seq_n_new[s]; its query i sees
// its keys 0..=i. lse[r * heads + h] = ln(sum_{j<=i} exp(scale * q_i . k_j)), scale = 1/sqrt(D)
// (natural log, as the CPU train_fwd stores it).
// `tiles`: int32 pairs (s, t0) for every 64-row chunk of every sequence (t0 = 0, 64, ... < n_new),
// n_tiles pairs; sequences of any length >= 1. The same list gives the query tiles of the forward
// and the key tiles of the backward.
//
// Launch contract (all pointers device pointers; `int` is int32):
//  flash_train_fwd_d64 / flash_train_fwd_d128(
//      const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, const int* tiles,
//      const int* seq_row_start, const int* seq_n_new, int heads, int kv_heads, float scale_log2)
//    grid (n_tiles, heads), block 128, no dynamic shared memory; scale_log2 = log2(e) / sqrt(D).
//    Writes every element of out and lse once.
//  flash_train_bwd_pre(const bf16* out, const bf16* dout, float* delta, int rows, int heads, int head_dim)
//    delta[r * heads + h] = sum_d f32(dout) * f32(out) over head h of row r. One warp per
//    (row, head): grid (rows, heads), block 32. head_dim even (any even value; 64, 128 here).
//  flash_train_bwd_d64 / flash_train_bwd_d128(
//      const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
//      const float* delta, float* dq_acc, bf16* dk, bf16* dv, const int* tiles,
//      const int* seq_row_start, const int* seq_n_new, int heads, int kv_heads, float scale_log2)
//    grid (n_tiles, kv_heads), block 128, no dynamic shared memory; scale_log2 as in the forward.
//    Adds into dq_acc with atomicAdd (dq_acc must be zeroed first); writes every element of dk
//    and dv once.
// Host sequence for the backward: zero dq_acc (rows * heads * D floats), then flash_train_bwd_pre,
// flash_train_bwd_d{D}, then round dq_acc to bf16 into dq (elementwise.cu's cast_f32_bf16), on
// one stream in that order. lse is the forward's
// (delta may come from the bf16 out the forward wrote). heads must be a multiple of kv_heads; with
// rows == 0 (n_tiles == 0) launch nothing, as an empty grid is invalid.
//
// Backward structure: a block owns one key tile (64 keys of one sequence) of one kv head, its K
// and V in shared memory; warp w owns keys 16w..16w+15 and keeps their dK and dV in f32
// registers. It loops over the group's query heads and over the sequence's query sub-tiles of BRQ
// rows (BRQ = 64 at D = 64, 16 at D = 128, so that the static shared memory stays under 48 KB:
// 46592 and 45952 bytes) from the key tile's first row on (earlier queries see none of its keys).
// Per chunk of 16 queries of a sub-tile each warp computes S^T = K Q^T and dP^T = V dO^T for its
// keys, P^T = exp2(S^T * scale_log2 - lse * log2 e) (0 where key > query),
// dS^T = P^T (dP^T - delta), then dV += P^T dO and dK += dS^T Q with the f32 fragments packed to
// bf16 as A operands, and stores dS (bf16, row per query) to shared memory; a warp whose keys no
// query of the chunk sees skips the products and stores zeros. Then the 4 warps compute
// dQ = scale * dS K for the sub-tile and atomicAdd it to dq_acc. Transposed operands come from
// ldmatrix .trans. dK is scaled by `scale` = 1/sqrt(D) when written.

#define BR 64
#define BC 64
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    bf162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Column of value row `r`, key `j` in the forward's transposed V tile (see flash_attn.cu).
__device__ __forceinline__ int vt_col(int r, int j) { return j ^ (((r >> 3) & 7) << 3); }

// c += a (16x16, row-major) * b (16x8, column-major); bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of matrix
// l / 8 (16-byte aligned). Register i of lane l: matrix i, row l / 4, columns 2 (l % 4) + {0, 1}.
__device__ __forceinline__ void ldsm_x4(unsigned* r, const bf16* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// The same, transposed: register i of lane l holds rows 2 (l % 4) + {0, 1}, column l / 4.
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const bf16* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// ---------------------------------------------------------------------------------------------
// Forward: flash_prefill of flash_attn.cu with K/V read contiguously (no cache, past = 0), plus
// the log-sum-exp. Grid (tiles, heads); 4 warps own 16 query rows each.
template <int D>
__device__ __forceinline__ void flash_train_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                const bf16* __restrict__ v, bf16* __restrict__ out,
                                                float* __restrict__ lse, const int* __restrict__ tiles,
                                                const int* __restrict__ seq_row_start,
                                                const int* __restrict__ seq_n_new, int heads, int kv_heads,
                                                float scale_log2) {
    __shared__ __align__(16) bf16 ks[BC][D + 8];  // keys, row per key (+8 against bank conflicts)
    __shared__ __align__(16) bf16 vt[D][BC + 8];  // values transposed: row per dim, see vt_col

    const int tile = blockIdx.x, h = blockIdx.y;
    const int s = tiles[2 * tile], q0 = tiles[2 * tile + 1];
    const int n_new = seq_n_new[s];
    const long long row0 = seq_row_start[s];
    const int kvh = h / (heads / kv_heads);
    const int qd = heads * D, kvd = kv_heads * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

    // This thread's two query rows (fragment rows g and g + 8 of the warp's 16).
    const int ra = q0 + warp * 16 + g, rb = ra + 8;
    const bool va = ra < n_new, vb = rb < n_new;

    unsigned qf[D / 16][4];
    const bf16* qa = q + (row0 + ra) * qd + h * D;
    const bf16* qb = q + (row0 + rb) * qd + h * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int c = kk * 16 + t4 * 2;
        qf[kk][0] = va ? *reinterpret_cast<const unsigned*>(qa + c) : 0u;
        qf[kk][1] = vb ? *reinterpret_cast<const unsigned*>(qb + c) : 0u;
        qf[kk][2] = va ? *reinterpret_cast<const unsigned*>(qa + c + 8) : 0u;
        qf[kk][3] = vb ? *reinterpret_cast<const unsigned*>(qb + c + 8) : 0u;
    }

    float o[D / 8][4];
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.0f, l_b = 0.0f;

    const int kv_end = min(q0 + BR, n_new);  // keys any row of the tile may see
    for (int k0 = 0; k0 < kv_end; k0 += BC) {
        __syncthreads();  // the previous tile is no longer read
        for (int c = threadIdx.x; c < BC * D / 8; c += blockDim.x) {
            const int j = c / (D / 8), d = (c % (D / 8)) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (k0 + j < kv_end) {
                const long long off = (row0 + k0 + j) * kvd + kvh * D + d;
                kv = *reinterpret_cast<const uint4*>(k + off);
                vv = *reinterpret_cast<const uint4*>(v + off);
            }
            *reinterpret_cast<uint4*>(&ks[j][d]) = kv;
            const bf16* ve = reinterpret_cast<const bf16*>(&vv);
#pragma unroll
            for (int e = 0; e < 8; ++e) vt[d + e][vt_col(d, j)] = ve[e];
        }
        __syncthreads();

        // S = Q K^T over this tile's keys, in log2 units.
        float sc[BC / 8][4];
#pragma unroll
        for (int nb = 0; nb < BC / 8; ++nb) {
            sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned b0 = *reinterpret_cast<const unsigned*>(&ks[nb * 8 + g][kk * 16 + t4 * 2]);
                const unsigned b1 = *reinterpret_cast<const unsigned*>(&ks[nb * 8 + g][kk * 16 + t4 * 2 + 8]);
                mma_16816(sc[nb], qf[kk], b0, b1);
            }
        }
        float mx_a = m_a, mx_b = m_b;
#pragma unroll
        for (int nb = 0; nb < BC / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = k0 + nb * 8 + t4 * 2 + e;
                sc[nb][e] = (va && key <= ra) ? sc[nb][e] * scale_log2 : NEG_INF;
                sc[nb][2 + e] = (vb && key <= rb) ? sc[nb][2 + e] * scale_log2 : NEG_INF;
                mx_a = fmaxf(mx_a, sc[nb][e]);
                mx_b = fmaxf(mx_b, sc[nb][2 + e]);
            }
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        const float base_a = mx_a == NEG_INF ? 0.0f : mx_a, base_b = mx_b == NEG_INF ? 0.0f : mx_b;
        const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
        m_a = mx_a;
        m_b = mx_b;
        l_a *= alpha_a;
        l_b *= alpha_b;
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) {
            o[nb][0] *= alpha_a;
            o[nb][1] *= alpha_a;
            o[nb][2] *= alpha_b;
            o[nb][3] *= alpha_b;
        }
#pragma unroll
        for (int nb = 0; nb < BC / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                sc[nb][e] = exp2f(sc[nb][e] - base_a);
                sc[nb][2 + e] = exp2f(sc[nb][2 + e] - base_b);
                l_a += sc[nb][e];
                l_b += sc[nb][2 + e];
            }
        }
        // O += P V: two adjacent 16x8 score fragments form one 16x16 A fragment.
#pragma unroll
        for (int j = 0; j < BC / 16; ++j) {
            unsigned a[4];
            a[0] = pack_bf16(sc[2 * j][0], sc[2 * j][1]);
            a[1] = pack_bf16(sc[2 * j][2], sc[2 * j][3]);
            a[2] = pack_bf16(sc[2 * j + 1][0], sc[2 * j + 1][1]);
            a[3] = pack_bf16(sc[2 * j + 1][2], sc[2 * j + 1][3]);
#pragma unroll
            for (int nb = 0; nb < D / 8; ++nb) {
                const bf16* vrow = &vt[nb * 8 + g][t4 * 2];
                const unsigned b0 = *reinterpret_cast<const unsigned*>(vrow + vt_col(nb * 8, j * 16));
                const unsigned b1 = *reinterpret_cast<const unsigned*>(vrow + vt_col(nb * 8, j * 16 + 8));
                mma_16816(o[nb], a, b0, b1);
            }
        }
    }

    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    // Every valid row sees its key 0, so l > 0 there.
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
        const int col = h * D + nb * 8 + t4 * 2;
        if (va) *reinterpret_cast<bf162*>(out + (row0 + ra) * qd + col) = __floats2bfloat162_rn(o[nb][0] * inv_a, o[nb][1] * inv_a);
        if (vb) *reinterpret_cast<bf162*>(out + (row0 + rb) * qd + col) = __floats2bfloat162_rn(o[nb][2] * inv_b, o[nb][3] * inv_b);
    }
    // ln(sum exp(scale s)) = ln 2 * (m + log2 l), m and the scores being in log2 units.
    if (t4 == 0) {
        if (va) lse[(row0 + ra) * heads + h] = (m_a + log2f(l_a)) * LN2;
        if (vb) lse[(row0 + rb) * heads + h] = (m_b + log2f(l_b)) * LN2;
    }
}

#define FLASH_TRAIN_FWD(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) flash_train_fwd_d##D(                                  \
        const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, const int* tiles,                 \
        const int* seq_row_start, const int* seq_n_new, int heads, int kv_heads, float scale_log2) {          \
        flash_train_fwd<D>(q, k, v, out, lse, tiles, seq_row_start, seq_n_new, heads, kv_heads, scale_log2); \
    }
FLASH_TRAIN_FWD(64)
FLASH_TRAIN_FWD(128)

// ---------------------------------------------------------------------------------------------
// delta = rowsum(dO * O) per (row, head): grid (rows, heads), one warp (block 32) each.
extern "C" __global__ void __launch_bounds__(32) flash_train_bwd_pre(const bf16* __restrict__ out,
                                                                     const bf16* __restrict__ dout,
                                                                     float* __restrict__ delta, int rows,
                                                                     int heads, int head_dim) {
    const int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    if (r >= rows || h >= heads) return;
    const long long w = (long long)r * heads + h;
    const bf16* o = out + w * head_dim;  // (r * heads + h) * head_dim
    const bf16* d_o = dout + w * head_dim;
    float acc = 0.0f;
    for (int d = lane * 2; d < head_dim; d += 64) {
        const float2 a = __bfloat1622float2(*reinterpret_cast<const bf162*>(o + d));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const bf162*>(d_o + d));
        acc += a.x * b.x + a.y * b.y;
    }
    acc = warp_sum(acc);
    if (lane == 0) delta[w] = acc;
}

// ---------------------------------------------------------------------------------------------
// Backward. Grid (key tiles, kv heads); see the top of the file.
template <int D, int BRQ>
__device__ __forceinline__ void flash_train_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                float* __restrict__ dq_acc, bf16* __restrict__ dk,
                                                bf16* __restrict__ dv, const int* __restrict__ tiles,
                                                const int* __restrict__ seq_row_start,
                                                const int* __restrict__ seq_n_new, int heads, int kv_heads,
                                                float scale_log2) {
    static_assert(BRQ % 16 == 0 && 64 % BRQ == 0, "query sub-tile");
    __shared__ __align__(16) bf16 ks[BC][D + 8];     // the block's keys, row per key
    __shared__ __align__(16) bf16 vs[BC][D + 8];     // and values
    __shared__ __align__(16) bf16 qs[BRQ][D + 8];    // query sub-tile, row per query
    __shared__ __align__(16) bf16 dos[BRQ][D + 8];   // its output gradients
    __shared__ __align__(16) bf16 dss[BRQ][BC + 8];  // dS (unscaled), row per query, column per key
    __shared__ float lse2s[BRQ], dls[BRQ];           // lse * log2 e, delta

    const int tile = blockIdx.x, kvh = blockIdx.y;
    const int s = tiles[2 * tile], k0 = tiles[2 * tile + 1];
    const int n_new = seq_n_new[s];
    const long long row0 = seq_row_start[s];
    const int group = heads / kv_heads;
    const int qd = heads * D, kvd = kv_heads * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const float scale = 1.0f / sqrtf((float)D);

    // This thread's two keys (fragment rows g and g + 8 of the warp's 16).
    const int kw = k0 + warp * 16;
    const int ka = kw + g, kb = ka + 8;
    const bool vka = ka < n_new, vkb = kb < n_new;

    for (int c = threadIdx.x; c < BC * D / 8; c += blockDim.x) {
        const int j = c / (D / 8), d = (c % (D / 8)) * 8;
        uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
        if (k0 + j < n_new) {
            const long long off = (row0 + k0 + j) * kvd + kvh * D + d;
            kv = *reinterpret_cast<const uint4*>(k + off);
            vv = *reinterpret_cast<const uint4*>(v + off);
        }
        *reinterpret_cast<uint4*>(&ks[j][d]) = kv;
        *reinterpret_cast<uint4*>(&vs[j][d]) = vv;
    }
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) dka[nb][i] = dva[nb][i] = 0.0f;

    // ldmatrix lane offsets: A operand / non-transposed pairs of B operands, transposed B pairs.
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
    const int t_row = (lane & 7) + ((lane >> 3) & 1) * 8, t_col = (lane >> 4) * 8;

    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        for (int q0 = k0; q0 < n_new; q0 += BRQ) {
            __syncthreads();  // the previous sub-tile (and, the first time, nothing) is no longer read
            for (int c = threadIdx.x; c < BRQ * D / 8; c += blockDim.x) {
                const int i = c / (D / 8), d = (c % (D / 8)) * 8;
                uint4 qv = make_uint4(0, 0, 0, 0), ov = make_uint4(0, 0, 0, 0);
                if (q0 + i < n_new) {
                    const long long off = (row0 + q0 + i) * qd + h * D + d;
                    qv = *reinterpret_cast<const uint4*>(q + off);
                    ov = *reinterpret_cast<const uint4*>(dout + off);
                }
                *reinterpret_cast<uint4*>(&qs[i][d]) = qv;
                *reinterpret_cast<uint4*>(&dos[i][d]) = ov;
            }
            if (threadIdx.x < BRQ) {
                const int i = threadIdx.x;
                const bool ok = q0 + i < n_new;
                lse2s[i] = ok ? lse[(row0 + q0 + i) * heads + h] * LOG2E : 0.0f;
                dls[i] = ok ? delta[(row0 + q0 + i) * heads + h] : 0.0f;
            }
            __syncthreads();

            const int lim = min(q0 + BRQ, n_new);  // the sub-tile's queries are q0 .. lim - 1
            // Per chunk of 16 queries (keeps two 16x16 score fragments live, not BRQ / 8):
#pragma unroll 1
            for (int j = 0; j < BRQ / 16; ++j) {
                const int qc = q0 + j * 16;  // the chunk's first query
                float sc[2][4], dp[2][4];
                if (kw < min(qc + 16, n_new)) {  // warp-uniform: some query of the chunk sees some key of the warp
#pragma unroll
                    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
                        for (int i = 0; i < 4; ++i) sc[nb][i] = dp[nb][i] = 0.0f;
                    // S^T = K Q^T and dP^T = V dO^T: rows = the warp's keys, columns = the chunk's queries.
#pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk) {
                        unsigned a[4], b[4];
                        ldsm_x4(a, &ks[warp * 16 + a_row][kk * 16 + a_col]);
                        ldsm_x4(b, &qs[j * 16 + b_row][kk * 16 + b_col]);
                        mma_16816(sc[0], a, b[0], b[1]);
                        mma_16816(sc[1], a, b[2], b[3]);
                        ldsm_x4(a, &vs[warp * 16 + a_row][kk * 16 + a_col]);
                        ldsm_x4(b, &dos[j * 16 + b_row][kk * 16 + b_col]);
                        mma_16816(dp[0], a, b[0], b[1]);
                        mma_16816(dp[1], a, b[2], b[3]);
                    }
                    // P^T = exp(scale s - lse) where key <= query, else 0; dS^T = P^T (dP^T - delta).
#pragma unroll
                    for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int qi = j * 16 + nb * 8 + t4 * 2 + e, qq = q0 + qi;
                            const float l2 = lse2s[qi], dl = dls[qi];
                            const bool vq = qq < n_new;
                            const float pa = (vq && ka <= qq) ? exp2f(sc[nb][e] * scale_log2 - l2) : 0.0f;
                            const float pb = (vq && kb <= qq) ? exp2f(sc[nb][2 + e] * scale_log2 - l2) : 0.0f;
                            sc[nb][e] = pa;
                            sc[nb][2 + e] = pb;
                            dp[nb][e] = pa * (dp[nb][e] - dl);
                            dp[nb][2 + e] = pb * (dp[nb][2 + e] - dl);
                        }
                    }
                    // dV += P^T dO, dK += dS^T Q: the two 16x8 fragments form one 16x16 A fragment;
                    // dO and Q as B operands (k = query, n = dim) via ldmatrix .trans.
                    unsigned pf[4], df[4];
                    pf[0] = pack_bf16(sc[0][0], sc[0][1]);
                    pf[1] = pack_bf16(sc[0][2], sc[0][3]);
                    pf[2] = pack_bf16(sc[1][0], sc[1][1]);
                    pf[3] = pack_bf16(sc[1][2], sc[1][3]);
                    df[0] = pack_bf16(dp[0][0], dp[0][1]);
                    df[1] = pack_bf16(dp[0][2], dp[0][3]);
                    df[2] = pack_bf16(dp[1][0], dp[1][1]);
                    df[3] = pack_bf16(dp[1][2], dp[1][3]);
#pragma unroll
                    for (int nb = 0; nb < D / 8; nb += 2) {
                        unsigned b[4];
                        ldsm_x4_t(b, &dos[j * 16 + t_row][nb * 8 + t_col]);
                        mma_16816(dva[nb], pf, b[0], b[1]);
                        mma_16816(dva[nb + 1], pf, b[2], b[3]);
                        ldsm_x4_t(b, &qs[j * 16 + t_row][nb * 8 + t_col]);
                        mma_16816(dka[nb], df, b[0], b[1]);
                        mma_16816(dka[nb + 1], df, b[2], b[3]);
                    }
                } else {
#pragma unroll
                    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
                        for (int i = 0; i < 4; ++i) dp[nb][i] = 0.0f;
                }
                // dS (bf16, unscaled) to shared memory, transposed: row per query, column per key.
#pragma unroll
                for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        bf16* row = dss[j * 16 + nb * 8 + t4 * 2 + e] + warp * 16 + g;
                        row[0] = to_bf(dp[nb][e]);
                        row[8] = to_bf(dp[nb][2 + e]);
                    }
                }
            }
            __syncthreads();

            // dQ += scale dS K. Warp w: query rows 16 (w % RB) .. +15 of the sub-tile, dims
            // [NBW (w / RB) * 8, +NBW * 8). Keys in pairs of 16-key blocks; a pair of keys no
            // query of the sub-tile sees (dS = 0) is skipped.
            {
                constexpr int RB = BRQ / 16, NBW = (D / 8) / (4 / RB);
                const int rb = warp % RB, nb0 = (warp / RB) * NBW;
                const int npair = (lim - k0 + 31) >> 5;  // >= 1; pairs 0, 1 only exist
                unsigned af[4][4];
#pragma unroll
                for (int kk = 0; kk < 4; ++kk)
                    if ((kk >> 1) < npair) ldsm_x4(af[kk], &dss[rb * 16 + a_row][kk * 16 + a_col]);
                const int qa = q0 + rb * 16 + g, qb = qa + 8;
                float* pa = dq_acc + (row0 + qa) * qd + h * D + t4 * 2;
                float* pb = dq_acc + (row0 + qb) * qd + h * D + t4 * 2;
#pragma unroll
                for (int n = 0; n < NBW; ++n) {
                    const int nb = nb0 + n;
                    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                    for (int kp = 0; kp < 2; ++kp) {
                        if (kp < npair) {
                            unsigned b[4];
                            ldsm_x4_t(b, &ks[kp * 32 + lane][nb * 8]);
                            mma_16816(c, af[2 * kp], b[0], b[1]);
                            mma_16816(c, af[2 * kp + 1], b[2], b[3]);
                        }
                    }
                    if (qa < n_new) {
                        atomicAdd(pa + nb * 8, c[0] * scale);
                        atomicAdd(pa + nb * 8 + 1, c[1] * scale);
                    }
                    if (qb < n_new) {
                        atomicAdd(pb + nb * 8, c[2] * scale);
                        atomicAdd(pb + nb * 8 + 1, c[3] * scale);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
        const int col = kvh * D + nb * 8 + t4 * 2;
        if (vka) {
            *reinterpret_cast<bf162*>(dk + (row0 + ka) * kvd + col) = __floats2bfloat162_rn(dka[nb][0] * scale, dka[nb][1] * scale);
            *reinterpret_cast<bf162*>(dv + (row0 + ka) * kvd + col) = __floats2bfloat162_rn(dva[nb][0], dva[nb][1]);
        }
        if (vkb) {
            *reinterpret_cast<bf162*>(dk + (row0 + kb) * kvd + col) = __floats2bfloat162_rn(dka[nb][2] * scale, dka[nb][3] * scale);
            *reinterpret_cast<bf162*>(dv + (row0 + kb) * kvd + col) = __floats2bfloat162_rn(dva[nb][2], dva[nb][3]);
        }
    }
}

#define FLASH_TRAIN_BWD(D, BRQ)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) flash_train_bwd_d##D(                                 \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta, \
        float* dq_acc, bf16* dk, bf16* dv, const int* tiles, const int* seq_row_start, const int* seq_n_new, \
        int heads, int kv_heads, float scale_log2) {                                                         \
        flash_train_bwd<D, BRQ>(q, k, v, dout, lse, delta, dq_acc, dk, dv, tiles, seq_row_start, seq_n_new, \
                                heads, kv_heads, scale_log2);                                                \
    }
FLASH_TRAIN_BWD(64, 64)
FLASH_TRAIN_BWD(128, 16)

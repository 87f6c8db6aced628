// Flash attention forward (FlashAttention-2 style) for prefill over the paged KV cache:
// causal, grouped-query, variable-length packed batches, head dim 64 or 128, bf16 tensor cores
// (mma.sync m16n8k16) with f32 accumulation and an online softmax in registers.
//
// Grid: (query tiles, heads). A tile is BR = 64 query rows of one sequence (`tiles[2t]` = the
// sequence, `tiles[2t+1]` = its first query index); 4 warps own 16 rows each. Keys and values
// stream through shared memory BC = 64 at a time, looked up through the sequence's block table.
// Query i of a sequence sits at position past + i (past = n_ctx - n_new) and sees keys 0..=that.

#define BR 64
#define BC 64

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    bf162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Column of value row `r`, key `j` in the transposed V tile: XOR-swizzled by the row's group
// of 8 so that the transposing stores (lanes writing rows 8 apart at one key) spread over the
// banks (2-way at most instead of 16-way for d = 128). The swizzle only flips bits 3-5 of the
// key, so the B-fragment loads keep their per-lane offset t4 * 2 (and a compile-time rest).
__device__ __forceinline__ int vt_col(int r, int j) { return j ^ (((r >> 3) & 7) << 3); }

// c += a (16x16, row-major) * b (16x8, column-major); bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int D>
__device__ __forceinline__ void flash_prefill(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                              const bf16* __restrict__ v_cache, bf16* __restrict__ out,
                                              const int* __restrict__ tiles, const int* __restrict__ seq_row_start,
                                              const int* __restrict__ seq_n_new, const int* __restrict__ seq_n_ctx,
                                              const int* __restrict__ seq_bt_off, const int* __restrict__ block_tables,
                                              int block_size, int heads, int kv_heads, float scale_log2) {
    __shared__ __align__(16) bf16 ks[BC][D + 8];   // keys, row per key (+8 against bank conflicts)
    __shared__ __align__(16) bf16 vt[D][BC + 8];   // values transposed: row per dim, see vt_col

    const int tile = blockIdx.x, h = blockIdx.y;
    const int s = tiles[2 * tile], q0 = tiles[2 * tile + 1];
    const int n_new = seq_n_new[s], past = seq_n_ctx[s] - n_new;
    const long long row0 = seq_row_start[s];
    const int* bt = block_tables + seq_bt_off[s];
    const int kvh = h / (heads / kv_heads);
    const int qd = heads * D, kvd = kv_heads * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

    // This thread's two query rows (fragment rows g and g + 8 of the warp's 16).
    const int ra = q0 + warp * 16 + g, rb = ra + 8;
    const bool va = ra < n_new, vb = rb < n_new;
    const int pa = past + ra, pb = past + rb;

    // Q as A fragments, loaded once.
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

    const int kv_end = past + min(q0 + BR, n_new);  // keys any row of the tile may see
    for (int k0 = 0; k0 < kv_end; k0 += BC) {
        __syncthreads();  // the previous tile is no longer read
        for (int c = threadIdx.x; c < BC * D / 8; c += blockDim.x) {
            const int j = c / (D / 8), d = (c % (D / 8)) * 8;
            const int pos = k0 + j;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (pos < kv_end) {
                const long long slot = (long long)bt[pos / block_size] * block_size + pos % block_size;
                kv = *reinterpret_cast<const uint4*>(k_cache + slot * kvd + kvh * D + d);
                vv = *reinterpret_cast<const uint4*>(v_cache + slot * kvd + kvh * D + d);
            }
            *reinterpret_cast<uint4*>(&ks[j][d]) = kv;
            const bf16* ve = reinterpret_cast<const bf16*>(&vv);
#pragma unroll
            for (int e = 0; e < 8; ++e) vt[d + e][vt_col(d, j)] = ve[e];  // rows d..d+7 share a group
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
                sc[nb][e] = (va && key <= pa) ? sc[nb][e] * scale_log2 : NEG_INF;
                sc[nb][2 + e] = (vb && key <= pb) ? sc[nb][2 + e] * scale_log2 : NEG_INF;
                mx_a = fmaxf(mx_a, sc[nb][e]);
                mx_b = fmaxf(mx_b, sc[nb][2 + e]);
            }
        }
        // The four threads of a quad share a row.
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
                // Row nb * 8 + g is in group nb (g < 8), and the swizzle leaves bits 0-2 alone, so
                // vt_col(row, base + t4 * 2) = vt_col(nb * 8, base) + t4 * 2 for base a multiple
                // of 8: a compile-time column plus the lane's offset.
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
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
        const int col = h * D + nb * 8 + t4 * 2;
        if (va) *reinterpret_cast<bf162*>(out + (row0 + ra) * qd + col) = __floats2bfloat162_rn(o[nb][0] * inv_a, o[nb][1] * inv_a);
        if (vb) *reinterpret_cast<bf162*>(out + (row0 + rb) * qd + col) = __floats2bfloat162_rn(o[nb][2] * inv_b, o[nb][3] * inv_b);
    }
}

#define FLASH_PREFILL(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) flash_prefill_d##D(                                       \
        const bf16* q, const bf16* k_cache, const bf16* v_cache, bf16* out, const int* tiles,                    \
        const int* seq_row_start, const int* seq_n_new, const int* seq_n_ctx, const int* seq_bt_off,             \
        const int* block_tables, int block_size, int heads, int kv_heads, float scale_log2) {                    \
        flash_prefill<D>(q, k_cache, v_cache, out, tiles, seq_row_start, seq_n_new, seq_n_ctx, seq_bt_off,        \
                         block_tables, block_size, heads, kv_heads, scale_log2);                                 \
    }
FLASH_PREFILL(64)
FLASH_PREFILL(128)

// Decode attention: one new query row per sequence over its paged KV cache, split along the
// sequence (flash-decoding) so that long contexts fill the GPU. Pass 1: grid (decode sequences,
// kv heads, splits); a block serves the G = heads / kv_heads query heads that share one KV head,
// so every key and value is read once per group. 4 warps take keys in turn; a lane owns D/32
// consecutive dims; online softmax per warp, merged in shared memory; unnormalised partial
// outputs with their (max, sum) go to a workspace. Pass 2 merges the splits.

#define DECODE_WARPS 4
#define MAX_GROUP 16

template <int D>
__device__ __forceinline__ void decode_partial(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                               const bf16* __restrict__ v_cache, float* __restrict__ part_o,
                                               float* __restrict__ part_ml, const int* __restrict__ dseqs,
                                               const int* __restrict__ seq_row_start, const int* __restrict__ seq_n_ctx,
                                               const int* __restrict__ seq_bt_off, const int* __restrict__ block_tables,
                                               int block_size, int heads, int kv_heads, int split_len, float scale_log2) {
    constexpr int PER = D / 32;
    __shared__ float sm_m[DECODE_WARPS][MAX_GROUP], sm_l[DECODE_WARPS][MAX_GROUP];
    __shared__ float sm_o[DECODE_WARPS][MAX_GROUP][D];

    const int di = blockIdx.x, kvh = blockIdx.y, sp = blockIdx.z, splits = gridDim.z;
    const int s = dseqs[di];
    const int G = heads / kv_heads;
    const int n_ctx = seq_n_ctx[s];
    const long long row = seq_row_start[s];
    const int* bt = block_tables + seq_bt_off[s];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, d0 = lane * PER;
    const int qd = heads * D, kvd = kv_heads * D;
    const int start = sp * split_len, end = min(n_ctx, start + split_len);

    float qv[MAX_GROUP][PER], o[MAX_GROUP][PER], m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
    for (int gi = 0; gi < MAX_GROUP; ++gi) {
        m[gi] = NEG_INF;
        l[gi] = 0.0f;
#pragma unroll
        for (int e = 0; e < PER; ++e) {
            o[gi][e] = 0.0f;
            qv[gi][e] = gi < G ? to_f(q[row * qd + (kvh * G + gi) * D + d0 + e]) * scale_log2 : 0.0f;
        }
    }

    for (int pos = start + warp; pos < end; pos += DECODE_WARPS) {
        const long long slot = (long long)bt[pos / block_size] * block_size + pos % block_size;
        const bf16* kr = k_cache + slot * kvd + kvh * D + d0;
        const bf16* vr = v_cache + slot * kvd + kvh * D + d0;
        float kf[PER], vf[PER];
#pragma unroll
        for (int e = 0; e < PER; ++e) {
            kf[e] = to_f(kr[e]);
            vf[e] = to_f(vr[e]);
        }
#pragma unroll
        for (int gi = 0; gi < MAX_GROUP; ++gi) {
            if (gi >= G) break;
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < PER; ++e) dot += qv[gi][e] * kf[e];
            dot = warp_sum(dot);
            const float mn = fmaxf(m[gi], dot);
            const float alpha = exp2f(m[gi] - mn), p = exp2f(dot - mn);
            l[gi] = l[gi] * alpha + p;
#pragma unroll
            for (int e = 0; e < PER; ++e) o[gi][e] = o[gi][e] * alpha + p * vf[e];
            m[gi] = mn;
        }
    }

#pragma unroll
    for (int gi = 0; gi < MAX_GROUP; ++gi) {
        if (gi >= G) break;
        if (lane == 0) {
            sm_m[warp][gi] = m[gi];
            sm_l[warp][gi] = l[gi];
        }
#pragma unroll
        for (int e = 0; e < PER; ++e) sm_o[warp][gi][d0 + e] = o[gi][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
        const int gi = idx / D, d = idx % D;
        float M = NEG_INF;
        for (int w = 0; w < DECODE_WARPS; ++w) M = fmaxf(M, sm_m[w][gi]);
        float L = 0.0f, O = 0.0f;
        if (M != NEG_INF) {
            for (int w = 0; w < DECODE_WARPS; ++w) {
                const float f = exp2f(sm_m[w][gi] - M);
                L += sm_l[w][gi] * f;
                O += sm_o[w][gi][d] * f;
            }
        }
        const long long part = ((long long)di * heads + kvh * G + gi) * splits + sp;
        part_o[part * D + d] = O;
        if (d == 0) {
            part_ml[2 * part] = M;
            part_ml[2 * part + 1] = L;
        }
    }
}

#define DECODE_PARTIAL(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(DECODE_WARPS * 32) decode_partial_d##D(                          \
        const bf16* q, const bf16* k_cache, const bf16* v_cache, float* part_o, float* part_ml, const int* dseqs,  \
        const int* seq_row_start, const int* seq_n_ctx, const int* seq_bt_off, const int* block_tables,           \
        int block_size, int heads, int kv_heads, int split_len, float scale_log2) {                               \
        decode_partial<D>(q, k_cache, v_cache, part_o, part_ml, dseqs, seq_row_start, seq_n_ctx, seq_bt_off,       \
                          block_tables, block_size, heads, kv_heads, split_len, scale_log2);                      \
    }
DECODE_PARTIAL(64)
DECODE_PARTIAL(128)

// Pass 2: grid (decode sequences, heads), one thread per dim: merge the splits' partials.
extern "C" __global__ void decode_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                          bf16* __restrict__ out, const int* __restrict__ dseqs,
                                          const int* __restrict__ seq_row_start, int heads, int head_dim, int splits) {
    const int di = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (d >= head_dim) return;
    const long long base = ((long long)di * heads + h) * splits;
    float M = NEG_INF;
    for (int sp = 0; sp < splits; ++sp) M = fmaxf(M, part_ml[2 * (base + sp)]);
    float L = 0.0f, O = 0.0f;
    for (int sp = 0; sp < splits; ++sp) {
        const float m = part_ml[2 * (base + sp)];
        if (m == NEG_INF) continue;
        const float f = exp2f(m - M);
        L += part_ml[2 * (base + sp) + 1] * f;
        O += part_o[(base + sp) * head_dim + d] * f;
    }
    const long long row = seq_row_start[dseqs[di]];
    out[row * heads * head_dim + h * head_dim + d] = to_bf(L > 0.0f ? O / L : 0.0f);
}

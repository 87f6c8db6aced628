// Attention for any head dim up to 256 (the tensor-core kernels cover 64 and 128): one warp per
// (row, head), online softmax over the row's visible keys in the paged cache, a lane per
// 32-strided dim. Simple and exact in f32; used for small and odd-shaped models and as a check.
extern "C" __global__ void attention_generic(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                             const bf16* __restrict__ v_cache, bf16* __restrict__ out,
                                             const int* __restrict__ row_seq, const int* __restrict__ seq_row_start,
                                             const int* __restrict__ seq_n_new, const int* __restrict__ seq_n_ctx,
                                             const int* __restrict__ seq_bt_off, const int* __restrict__ block_tables,
                                             int block_size, int heads, int kv_heads, int head_dim, float scale_log2) {
    const int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const int s = row_seq[r];
    const int pos = seq_n_ctx[s] - seq_n_new[s] + (r - seq_row_start[s]);
    const int* bt = block_tables + seq_bt_off[s];
    const int kvh = h / (heads / kv_heads);
    const int kvd = kv_heads * head_dim;
    const long long qoff = (long long)r * heads * head_dim + h * head_dim;
    float qv[8], o[8];
    for (int j = 0; j < 8; ++j) {
        const int d = lane + 32 * j;
        qv[j] = d < head_dim ? to_f(q[qoff + d]) * scale_log2 : 0.0f;
        o[j] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int key = 0; key <= pos; ++key) {
        const long long base = ((long long)bt[key / block_size] * block_size + key % block_size) * kvd + kvh * head_dim;
        float dot = 0.0f;
        for (int j = 0; j < 8; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) dot += qv[j] * to_f(k_cache[base + d]);
        }
        dot = warp_sum(dot);
        const float mn = fmaxf(m, dot);
        const float alpha = exp2f(m - mn), p = exp2f(dot - mn);
        l = l * alpha + p;
        for (int j = 0; j < 8; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) o[j] = o[j] * alpha + p * to_f(v_cache[base + d]);
        }
        m = mn;
    }
    for (int j = 0; j < 8; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) out[qoff + d] = to_bf(o[j] / l);
    }
}

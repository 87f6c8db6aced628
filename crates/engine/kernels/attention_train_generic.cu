// Training attention for any head dim up to 256 (the tensor-core kernels in flash_attn_train.cu
// cover 64 and 128): causal grouped-query attention within each sequence of a packed batch,
// K/V read contiguously (no cache). One warp per (row, head), a lane per 32-strided dim, f32.
// Simple and exact; used for small and odd-shaped models and as a check of the fast path.
//
// Layouts: q, out, dout [rows, heads*D]; k, v [rows, kv_heads*D] (bf16); lse [rows, heads] f32,
// the natural-log log-sum-exp of the scaled scores. Grid (rows, heads), block 32.

// Forward: out and lse.
extern "C" __global__ void attn_train_fwd_generic(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                  const bf16* __restrict__ v, bf16* __restrict__ out,
                                                  float* __restrict__ lse, const int* __restrict__ row_seq,
                                                  const int* __restrict__ seq_row_start, int heads, int kv_heads,
                                                  int head_dim, float scale_log2) {
    const int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const int first = seq_row_start[row_seq[r]];
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
    for (int key = first; key <= r; ++key) {
        const long long base = (long long)key * kvd + kvh * head_dim;
        float dot = 0.0f;
        for (int j = 0; j < 8; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) dot += qv[j] * to_f(k[base + d]);
        }
        dot = warp_sum(dot);
        const float mn = fmaxf(m, dot);
        const float alpha = exp2f(m - mn), p = exp2f(dot - mn);
        l = l * alpha + p;
        for (int j = 0; j < 8; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) o[j] = o[j] * alpha + p * to_f(v[base + d]);
        }
        m = mn;
    }
    for (int j = 0; j < 8; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) out[qoff + d] = to_bf(o[j] / l);
    }
    // m and l are in base 2: lse = ln(2) * (m + log2 l).
    if (lane == 0) lse[(long long)r * heads + h] = 0.69314718f * (m + log2f(l));
}

// Backward, recomputing the probabilities from lse: with D = dout . out,
// p_j = exp(scale q.k_j - lse), ds_j = p_j (dout . v_j - D):
// dq = scale sum_j ds_j k_j (written, bf16); dk_j += scale ds_j q and dv_j += p_j dout
// (f32 accumulators [rows, kv_heads*D] the host zeroes first and rounds afterwards).
extern "C" __global__ void attn_train_bwd_generic(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                  const bf16* __restrict__ v, const bf16* __restrict__ out,
                                                  const float* __restrict__ lse, const bf16* __restrict__ dout,
                                                  bf16* __restrict__ dq, float* __restrict__ dk_acc,
                                                  float* __restrict__ dv_acc, const int* __restrict__ row_seq,
                                                  const int* __restrict__ seq_row_start, int heads, int kv_heads,
                                                  int head_dim, float scale) {
    const int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const int first = seq_row_start[row_seq[r]];
    const int kvh = h / (heads / kv_heads);
    const int kvd = kv_heads * head_dim;
    const long long qoff = (long long)r * heads * head_dim + h * head_dim;
    const float l = lse[(long long)r * heads + h];
    float qv[8], dov[8], dqv[8];
    float dsum = 0.0f;
    for (int j = 0; j < 8; ++j) {
        const int d = lane + 32 * j;
        qv[j] = d < head_dim ? to_f(q[qoff + d]) : 0.0f;
        dov[j] = d < head_dim ? to_f(dout[qoff + d]) : 0.0f;
        if (d < head_dim) dsum += dov[j] * to_f(out[qoff + d]);
        dqv[j] = 0.0f;
    }
    dsum = warp_sum(dsum);
    for (int key = first; key <= r; ++key) {
        const long long base = (long long)key * kvd + kvh * head_dim;
        float s = 0.0f, dp = 0.0f;
        for (int j = 0; j < 8; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) {
                s += qv[j] * to_f(k[base + d]);
                dp += dov[j] * to_f(v[base + d]);
            }
        }
        s = warp_sum(s);
        dp = warp_sum(dp);
        const float p = expf(s * scale - l);
        const float ds = p * (dp - dsum);
        for (int j = 0; j < 8; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) {
                dqv[j] += ds * to_f(k[base + d]);
                atomicAdd(dk_acc + base + d, scale * ds * qv[j]);
                atomicAdd(dv_acc + base + d, p * dov[j]);
            }
        }
    }
    for (int j = 0; j < 8; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) dq[qoff + d] = to_bf(scale * dqv[j]);
    }
}

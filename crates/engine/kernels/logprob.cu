// Fused log-prob over the LM head: log softmax(h W^T)[target] for every row without the
// [rows, vocab] logits ever existing at once. The host walks the vocabulary in chunks of `cv`
// columns: a cuBLAS GEMM writes one chunk's f32 logits [rows, cv], then these kernels fold it
// into a running (max, sum) per row (an online log-sum-exp) and, in the backward, turn it into
// the chunk's logit gradient. One block per row in each.

// Folds logits[:, 0..cv) (vocabulary columns v0..v0+cv) into run_max/run_sum
// (zeroed by the host: a zero sum means no chunk yet) and records the target's logit in logp
// when the target falls in this chunk.
extern "C" __global__ void logprob_chunk_fwd(const float* __restrict__ logits, int cv, int v0,
                                             const int* __restrict__ targets, float* __restrict__ run_max,
                                             float* __restrict__ run_sum, float* __restrict__ logp) {
    __shared__ float scratch[32];
    const long long r = blockIdx.x;
    const float* row = logits + r * cv;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < cv; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int i = threadIdx.x; i < cv; i += blockDim.x) s += expf(row[i] - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        // run_sum 0 marks "no chunk yet" (the host zeroes both), whatever run_max holds.
        const float M = run_max[r], S = run_sum[r];
        const float mn = S > 0.0f ? fmaxf(M, m) : m;
        run_sum[r] = (S > 0.0f ? S * expf(M - mn) : 0.0f) + s * expf(m - mn);
        run_max[r] = mn;
        const int t = targets[r] - v0;
        if (t >= 0 && t < cv) logp[r] = row[t];
    }
}

// lse = max + ln(sum); logp (the target's logit) becomes logit - lse. Grid-stride over rows.
extern "C" __global__ void logprob_finish(const float* __restrict__ run_max, const float* __restrict__ run_sum,
                                          float* __restrict__ logp, float* __restrict__ lse, int rows) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        const float l = run_max[r] + logf(run_sum[r]);
        lse[r] = l;
        logp[r] -= l;
    }
}

// d logp[r] / d logits[r, j] = [j == target] - softmax_j, times dlogp[r]: the chunk's logit
// gradient in bf16 (the GEMMs that follow read bf16).
extern "C" __global__ void logprob_chunk_bwd(const float* __restrict__ logits, int cv, int v0,
                                             const int* __restrict__ targets, const float* __restrict__ lse,
                                             const float* __restrict__ dlogp, bf16* __restrict__ dlogits) {
    const long long r = blockIdx.x;
    const float g = dlogp[r], l = lse[r];
    const int t = targets[r] - v0;
    for (int i = threadIdx.x; i < cv; i += blockDim.x) {
        const float p = expf(logits[r * cv + i] - l);
        dlogits[r * cv + i] = to_bf(g * ((i == t ? 1.0f : 0.0f) - p));
    }
}

// On-device sampling: one block per row of logits [rows, vocab], so full logits never reach the
// host. Greedy is argmax (first index on ties, as torch.argmax). Otherwise top-k and top-p pick a
// threshold on the logit (found bit by bit over the order-preserving integer form of the floats:
// 32 block reductions each) and a Gumbel-max draw picks among the kept tokens with per-token
// uniforms from a counter hash of (seed, token) — the same distribution as the CPU sampler,
// not the same random stream.

// Float -> unsigned key with the same order; NaN sorts below everything.
__device__ __forceinline__ unsigned order_key(float f) {
    if (f != f) return 0u;
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float hash_uniform(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);  // in (0, 1)
}

// Block-wide argmax of (value, index): larger value wins, then the smaller index.
__device__ void block_argmax(float& v, int& idx, float* sv, int* si) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) { sv[warp] = v; si[warp] = idx; }
    __syncthreads();
    v = lane < warps ? sv[lane] : NEG_INF;
    idx = lane < warps ? si[lane] : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
}

// `params` holds four words per row (one upload per step): the temperature's f32 bits, top-k,
// top-p's f32 bits and the seed.
extern "C" __global__ void sample(const bf16* __restrict__ logits, int vocab,
                                  const unsigned long long* __restrict__ params, int* __restrict__ out) {
    __shared__ float scratch[32];
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    const bf16* row = logits + (long long)r * vocab;
    const float t = __uint_as_float((unsigned)params[4 * r]);
    const int k = (int)params[4 * r + 1];
    const float p = __uint_as_float((unsigned)params[4 * r + 2]);

    // Argmax: the answer for greedy rows and the maximum for the others.
    float best = NEG_INF;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = to_f(row[i]);
        if (v > best) { best = v; best_i = i; }  // ascending i: the first maximum per thread
    }
    block_argmax(best, best_i, sv, si);
    if (t <= 0.0f || k == 1) {
        if (threadIdx.x == 0) out[r] = best_i == 0x7fffffff ? 0 : best_i;
        return;
    }
    const float mx = best;

    // Top-k: the largest key K with at least k logits >= K (the k-th largest logit).
    unsigned kmin = 1u;  // key 0 is NaN: never kept
    if (k > 0 && k < vocab) {
        unsigned K = 0u;
        for (int bit = 31; bit >= 0; --bit) {
            const unsigned cand = K | (1u << bit);
            float c = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += order_key(to_f(row[i])) >= cand ? 1.0f : 0.0f;
            if (block_sum(c, scratch) >= (float)k) K = cand;
        }
        kmin = max(K, 1u);
    }

    // Top-p: the largest key K whose kept mass (within top-k) still reaches p of the total.
    if (p < 1.0f) {
        float z = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float v = to_f(row[i]);
            if (order_key(v) >= kmin) z += expf((v - mx) / t);
        }
        z = block_sum(z, scratch);
        unsigned K = 0u;
        for (int bit = 31; bit >= 0; --bit) {
            const unsigned cand = K | (1u << bit);
            const unsigned lo = max(cand, kmin);
            float mass = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                float v = to_f(row[i]);
                if (order_key(v) >= lo) mass += expf((v - mx) / t);
            }
            if (block_sum(mass, scratch) >= p * z) K = cand;
        }
        kmin = max(kmin, K);
    }

    // Gumbel-max over the kept tokens.
    const unsigned long long seed = params[4 * r + 3];
    float g_best = NEG_INF;
    int g_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = to_f(row[i]);
        if (order_key(v) < kmin) continue;
        float score = (v - mx) / t - logf(-logf(hash_uniform(seed, (unsigned long long)i)));
        if (score > g_best) { g_best = score; g_i = i; }
    }
    block_argmax(g_best, g_i, sv, si);
    if (threadIdx.x == 0) out[r] = g_i == 0x7fffffff ? (best_i == 0x7fffffff ? 0 : best_i) : g_i;
}

// RMSNorm as transformers' Qwen2RMSNorm: normalise in f32, round to bf16, then scale by the
// bf16 weight (so the two roundings match the reference). One block per row.
extern "C" __global__ void rmsnorm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                   bf16* __restrict__ out, int dim, float eps) {
    __shared__ float scratch[32];
    const bf16* xr = x + (long long)blockIdx.x * dim;
    bf16* o = out + (long long)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        o[i] = to_bf(to_f(to_bf(to_f(xr[i]) * inv)) * to_f(w[i]));
}

// Backward of y = w * x * inv, inv = (mean(x^2) + eps)^-1/2, one block per row:
// dx = inv * (dout * w) - x * inv^3 / dim * sum(dout * w * x) (bf16, overwritten);
// dw += dout * x * inv (f32, accumulated with atomics across rows; skipped when dw is null).
extern "C" __global__ void rmsnorm_bwd(const bf16* __restrict__ dout, const bf16* __restrict__ x,
                                       const bf16* __restrict__ w, bf16* __restrict__ dx, float* __restrict__ dw,
                                       int dim, float eps) {
    __shared__ float scratch[32];
    const long long off = (long long)blockIdx.x * dim;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float xv = to_f(x[off + i]);
        ss += xv * xv;
        dot += to_f(dout[off + i]) * to_f(w[i]) * xv;
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    const float inv = rsqrtf(ss / dim + eps);
    const float c = dot * inv * inv * inv / dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float xv = to_f(x[off + i]), g = to_f(dout[off + i]);
        dx[off + i] = to_bf(inv * g * to_f(w[i]) - xv * c);
        if (dw) atomicAdd(dw + i, g * xv * inv);
    }
}

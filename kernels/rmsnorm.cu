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

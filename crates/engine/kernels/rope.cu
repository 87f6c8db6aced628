// Rotary position embedding, rotate-half form, in place on x: [rows, heads, head_dim].
// Frequencies in f32 as transformers computes them: inv_freq = theta^(-2i/d), angle = pos * inv_freq.
// The rotation is orthogonal, so its backward is the rotation by the opposite angle (sign = -1).
__device__ __forceinline__ void rotate(bf16* __restrict__ x, const int* __restrict__ positions, int heads,
                                       int head_dim, float theta, float sign) {
    const long long r = blockIdx.x;
    const int half = head_dim / 2;
    const float pos = (float)positions[r];
    for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
        const int h = t / half, i = t % half;
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
        float s, c;
        sincosf(pos * inv_freq, &s, &c);
        s *= sign;
        bf16* xh = x + (r * heads + h) * head_dim;
        const float a = to_f(xh[i]), b = to_f(xh[i + half]);
        xh[i] = to_bf(a * c - b * s);
        xh[i + half] = to_bf(b * c + a * s);
    }
}

// One block per row.
extern "C" __global__ void rope(bf16* __restrict__ x, const int* __restrict__ positions, int heads,
                                int head_dim, float theta) {
    rotate(x, positions, heads, head_dim, theta, 1.0f);
}

// The gradient rotated back, in place. One block per row.
extern "C" __global__ void rope_bwd(bf16* __restrict__ dx, const int* __restrict__ positions, int heads,
                                    int head_dim, float theta) {
    rotate(dx, positions, heads, head_dim, theta, -1.0f);
}

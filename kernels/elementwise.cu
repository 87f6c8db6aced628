// Elementwise ops over flat bf16 buffers. Grid-stride loops; f32 math, one rounding per result.

// SwiGLU as transformers: silu(gate) is rounded to bf16 before the product with up.
extern "C" __global__ void swiglu(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                  bf16* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = to_f(gate[i]);
        const float act = to_f(to_bf(g / (1.0f + expf(-g))));
        out[i] = to_bf(act * to_f(up[i]));
    }
}

// x += y (the residual stream).
extern "C" __global__ void add_assign(bf16* __restrict__ x, const bf16* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = to_bf(to_f(x[i]) + to_f(y[i]));
}

// x *= s.
extern "C" __global__ void scale(bf16* __restrict__ x, float s, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = to_bf(to_f(x[i]) * s);
}

// out[r, j] = b[j] for out: [rows, cols]: the bias in every row, which the GEMM then adds
// into (beta = 1), so that x W^T + b is rounded once.
extern "C" __global__ void fill_rows(bf16* __restrict__ out, const bf16* __restrict__ b, long long rows, int cols) {
    const long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = b[i % cols];
}

// Inverted dropout with the counter hash of backend::dropout_keeps (splitmix64's finaliser),
// so every backend draws the same mask for the same (seed, index).
extern "C" __global__ void dropout(const bf16* __restrict__ x, bf16* __restrict__ out, long long n, float p,
                                   unsigned long long seed) {
    const float keep_scale = 1.0f / (1.0f - p);
    const float threshold = p * 16777216.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed ^ ((unsigned long long)i * 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const bool keep = (float)(z >> 40) >= threshold;
        out[i] = keep ? to_bf(to_f(x[i]) * keep_scale) : to_bf(0.0f);
    }
}

// x[i] = uniform(-scale, scale) from a counter hash of (seed, i): random weights made on the
// device (benchmarks of 7B-shaped models without a 15 GB upload).
extern "C" __global__ void fill_uniform(bf16* __restrict__ x, long long n, float scale, unsigned long long seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed ^ ((unsigned long long)i * 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        x[i] = to_bf((2.0f * u - 1.0f) * scale);
    }
}

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

// Backward of out = silu(gate) * up: dgate = dout * up * s * (1 + g * (1 - s)), dup = dout * silu(g),
// s = sigmoid(g).
extern "C" __global__ void swiglu_bwd(const bf16* __restrict__ dout, const bf16* __restrict__ gate,
                                      const bf16* __restrict__ up, bf16* __restrict__ dgate, bf16* __restrict__ dup,
                                      long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = to_f(gate[i]), u = to_f(up[i]), d = to_f(dout[i]);
        const float s = 1.0f / (1.0f + expf(-g));
        dgate[i] = to_bf(d * u * s * (1.0f + g * (1.0f - s)));
        dup[i] = to_bf(d * g * s);
    }
}

// x *= s over f32 values (gradients).
extern "C" __global__ void scale_f32(float* __restrict__ x, float s, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] *= s;
}

// x += y over f32 values.
extern "C" __global__ void add_assign_f32(float* __restrict__ x, const float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// out = bf16(x): an f32 accumulator rounded once (gradients summed in f32, master weights).
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = to_bf(x[i]);
}

// Bias gradient: db[j] += sum_r dout[r, j] for dout: [rows, cols]. Grid (column blocks of 32,
// row chunks); block (32, 8): each thread sums a strided run of rows for one column, the 8
// partials meet in shared memory, then one atomic per column and row chunk.
extern "C" __global__ void bias_grad(const bf16* __restrict__ dout, float* __restrict__ db, int rows, int cols,
                                     int rows_per_chunk) {
    __shared__ float part[8][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float s = 0.0f;
    if (j < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) s += to_f(dout[(long long)r * cols + j]);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
        float t = 0.0f;
        for (int y = 0; y < 8; y++) t += part[y][threadIdx.x];
        atomicAdd(db + j, t);
    }
}

// The optimiser step over every trained tensor in one launch each (multi-tensor, as
// torch.optim.AdamW(fused=True)): the squared global gradient norm, then AdamW with f32 master
// weights and moments, the clipping coefficient applied to the gradient as it is read.
//
// The host describes tensors in a table in device memory and cuts them into CHUNK-sized pieces:
// `chunks` holds (tensor index, first element) pairs as long longs, one block per chunk.

#define CHUNK 65536

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// out[0] += the block's sum of s (f64 partials, one atomic per block). `part` holds 32 doubles.
__device__ __forceinline__ void block_add_d(double s, double* part, double* out) {
    s = warp_sum_d(s);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0;
        s = warp_sum_d(s);
        if (lane == 0) atomicAdd(out, s);
    }
}

// A gradient tensor as sum_squares_multi reads it: f32 values.
struct SquaresTensor {
    unsigned long long grad;
    long long n;
};

// out[0] += sum over every chunk of grad^2 (f64 partials per block, one atomic per block).
extern "C" __global__ void sum_squares_multi(const SquaresTensor* __restrict__ tensors,
                                             const long long* __restrict__ chunks, double* __restrict__ out) {
    __shared__ double part[32];
    const SquaresTensor t = tensors[chunks[2 * blockIdx.x]];
    const long long start = chunks[2 * blockIdx.x + 1];
    const long long end = min(start + (long long)CHUNK, t.n);
    const float* g = (const float*)t.grad;
    double s = 0.0;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) s += (double)g[i] * (double)g[i];
    block_add_d(s, part, out);
}

// out[0] += sum(x^2) over a bf16 buffer (one tensor; grid-stride).
extern "C" __global__ void sum_squares_bf16(const bf16* __restrict__ x, long long n, double* __restrict__ out) {
    __shared__ double part[32];
    double s = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double v = to_f(x[i]);
        s += v * v;
    }
    block_add_d(s, part, out);
}

// One trained tensor as adamw_multi reads it (56 bytes; the host packs it word by word).
struct AdamTensor {
    unsigned long long param;   // bf16 [n]: receives the rounded master value
    unsigned long long master;  // f32 [n]: the parameter's true value
    unsigned long long grad;    // f32 [n]
    unsigned long long m, v;    // f32 [n]
    long long n;
    float weight_decay;         // this tensor's decay (0 for biases and norm weights)
    float pad;
};

// torch.optim.AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^t),
// bc2_sqrt = sqrt(1 - b2^t); g = grad * grad_scale.
extern "C" __global__ void adamw_multi(const AdamTensor* __restrict__ tensors, const long long* __restrict__ chunks,
                                       float lr, float beta1, float beta2, float eps, float step_size,
                                       float bc2_sqrt, float grad_scale) {
    const AdamTensor t = tensors[chunks[2 * blockIdx.x]];
    const long long start = chunks[2 * blockIdx.x + 1];
    const long long end = min(start + (long long)CHUNK, t.n);
    bf16* p = (bf16*)t.param;
    float* w = (float*)t.master;
    const float* g = (const float*)t.grad;
    float* m = (float*)t.m;
    float* v = (float*)t.v;
    const float decay = 1.0f - lr * t.weight_decay;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float gi = g[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float wi = w[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        w[i] = wi;
        p[i] = to_bf(wi);
    }
}

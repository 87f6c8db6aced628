// Token embedding lookup: out[r] = table[tokens[r]]. One block per row.
extern "C" __global__ void embedding(const bf16* __restrict__ table, const int* __restrict__ tokens,
                                     bf16* __restrict__ out, int dim) {
    const long long r = blockIdx.x;
    const bf16* src = table + (long long)tokens[r] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = src[i];
}

// out[i] = x[rows[i]] for rows of width dim (e.g. the last token of each sequence).
extern "C" __global__ void gather_rows(const bf16* __restrict__ x, const int* __restrict__ rows,
                                       bf16* __restrict__ out, int dim) {
    const long long r = blockIdx.x;
    const bf16* src = x + (long long)rows[r] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = src[i];
}

// Backward of the lookup: dtable[tokens[r]] += dout[r] (f32 gradient, atomics: two rows may
// name the same token). One block per row.
extern "C" __global__ void embedding_bwd(const bf16* __restrict__ dout, const int* __restrict__ tokens,
                                         float* __restrict__ dtable, int dim) {
    const long long r = blockIdx.x;
    float* dst = dtable + (long long)tokens[r] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) atomicAdd(dst + i, to_f(dout[r * dim + i]));
}

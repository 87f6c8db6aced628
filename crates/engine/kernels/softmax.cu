// Row-wise softmax and log-softmax in place, x: [rows, cols]; f32 math. One block per row.
extern "C" __global__ void softmax(bf16* __restrict__ x, int cols, int log_space) {
    __shared__ float scratch[32];
    bf16* row = x + (long long)blockIdx.x * cols;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, to_f(row[i]));
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += expf(to_f(row[i]) - m);
    s = block_sum(s, scratch);
    const float lse = m + logf(s);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = to_f(row[i]) - lse;
        row[i] = to_bf(log_space ? v : expf(v));
    }
}

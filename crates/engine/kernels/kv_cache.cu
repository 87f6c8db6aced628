// Writes the new rows' keys and values into the paged cache: cache[slots[r]] = k[r], v[r].
// One block per row; kv_dim values each.
extern "C" __global__ void kv_store(const bf16* __restrict__ k, const bf16* __restrict__ v,
                                    bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                    const int* __restrict__ slots, int kv_dim) {
    const long long r = blockIdx.x;
    const long long dst = (long long)slots[r] * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[dst + i] = k[r * kv_dim + i];
        v_cache[dst + i] = v[r * kv_dim + i];
    }
}

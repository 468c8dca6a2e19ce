// The 2×2 stride-2 max-pool of `maxpool.rs` on CUDA, with the same semantics as its
// CPU kernels: floor output size (a trailing odd row or column is dropped), and the
// gradient of each window to its first element (row-major) equal to the maximum.
// Compiled to PTX by the trainer's build.rs (feature `cuda`); each thread walks
// the elements in a grid-stride loop.

// y[p, oy, ox] = max of x[p, 2oy..2oy+2, 2ox..2ox+2] over `planes` contiguous
// planes of h × w.
extern "C" __global__ void max_pool2x2(const float* __restrict__ x, float* __restrict__ y,
                                       unsigned int planes, unsigned int h, unsigned int w) {
    const size_t ho = h / 2, wo = w / 2;
    const size_t n = planes * ho * wo;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t ox = i % wo, oy = i / wo % ho, p = i / (wo * ho);
        const float* s = x + (p * h + 2 * oy) * w + 2 * ox;
        y[i] = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[w], s[w + 1]));
    }
}

// dx for every element of x, from the pooled maximum m and its gradient g: g where
// the element is its window's first maximum, 0 elsewhere (and outside the windows).
extern "C" __global__ void max_pool2x2_backward(const float* __restrict__ x,
                                                const float* __restrict__ m,
                                                const float* __restrict__ g,
                                                float* __restrict__ dx, unsigned int planes,
                                                unsigned int h, unsigned int w) {
    const size_t ho = h / 2, wo = w / 2;
    const size_t n = (size_t)planes * h * w;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t ix = i % w, iy = i / w % h, p = i / ((size_t)w * h);
        const size_t ox = ix / 2, oy = iy / 2;
        float r = 0.0f;
        if (ox < wo && oy < ho) {
            const float* s = x + (p * h + 2 * oy) * w + 2 * ox;
            const size_t o = (p * ho + oy) * wo + ox;
            const float mx = m[o];
            const size_t first = s[0] == mx ? 0 : s[1] == mx ? 1 : s[w] == mx ? 2 : 3;
            if (first == (iy - 2 * oy) * 2 + (ix - 2 * ox)) {
                r = g[o];
            }
        }
        dx[i] = r;
    }
}

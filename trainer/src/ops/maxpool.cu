// The 2×2 stride-2 max-pool of `maxpool.rs` on CUDA, with the same semantics as its
// CPU kernels: floor output size (a trailing odd row or column is dropped), and the
// gradient of each window to its first element (row-major) equal to the maximum.
// Compiled to PTX by the trainer's build.rs (feature `cuda`); each thread walks
// the elements in a grid-stride loop. The launcher checks that every count fits in
// 32 bits, so indices are 32-bit (no emulated 64-bit division); addresses into `x`
// (4× the output) are computed in size_t.

// y[p, oy, ox] = max of x[p, 2oy..2oy+2, 2ox..2ox+2] over `planes` contiguous
// planes of h × w.
extern "C" __global__ void __launch_bounds__(1024)
    max_pool2x2(const float* __restrict__ x, float* __restrict__ y, unsigned int planes,
                unsigned int h, unsigned int w) {
    const unsigned int ho = h / 2, wo = w / 2;
    const unsigned int n = planes * ho * wo;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x) {
        const unsigned int ox = i % wo, oy = i / wo % ho, p = i / (wo * ho);
        const float* s = x + ((size_t)p * h + 2 * oy) * w + 2 * ox;
        y[i] = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[w], s[w + 1]));
    }
}

// dx for every element of x, from the pooled maximum m and its gradient g: g where
// the element is its window's first maximum, 0 elsewhere (and outside the windows).
extern "C" __global__ void __launch_bounds__(1024)
    max_pool2x2_backward(const float* __restrict__ x, const float* __restrict__ m,
                         const float* __restrict__ g, float* __restrict__ dx,
                         unsigned int planes, unsigned int h, unsigned int w) {
    const unsigned int ho = h / 2, wo = w / 2;
    const unsigned int n = planes * h * w;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x) {
        const unsigned int ix = i % w, iy = i / w % h, p = i / (w * h);
        const unsigned int ox = ix / 2, oy = iy / 2;
        float r = 0.0f;
        if (ox < wo && oy < ho) {
            const float* s = x + ((size_t)p * h + 2 * oy) * w + 2 * ox;
            const unsigned int o = (p * ho + oy) * wo + ox;
            const float mx = m[o];
            const unsigned int first = s[0] == mx ? 0 : s[1] == mx ? 1 : s[w] == mx ? 2 : 3;
            if (first == (iy - 2 * oy) * 2 + (ix - 2 * ox)) {
                r = g[o];
            }
        }
        dx[i] = r;
    }
}

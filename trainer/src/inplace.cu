// The optimizers' in-place passes of inplace.rs on CUDA: d[i] = f(d[i], a[i], b[i])
// with the pass's constants k0..k3, the formulas of the closures in adagrad.rs and
// adam.rs (the GPU contracts a·b + c into one rounding where the closures round
// twice: the tests allow for it). Compiled to PTX by the trainer's build.rs (feature
// `cuda`). `a` and `b` may be the same buffer: both are only read, which
// `__restrict__` allows; `d` is neither (candle refuses a source that shares the
// destination's storage).

#define PASS(name, expr)                                                               \
    extern "C" __global__ void __launch_bounds__(1024)                                 \
        name(float* __restrict__ d, const float* __restrict__ a,                       \
             const float* __restrict__ b, size_t n, float k0, float k1, float k2,     \
             float k3) {                                                               \
        for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;         \
             i += (size_t)gridDim.x * blockDim.x) {                                   \
            const float x = d[i], y = a[i], z = b[i];                                  \
            (void)z;                                                                   \
            (void)k2;                                                                  \
            (void)k3;                                                                  \
            d[i] = (expr);                                                             \
        }                                                                              \
    }

// Adagrad: G += g²; θ −= g / (√G + ε) · lr, with (k0, k1) = (lr, ε).
PASS(adagrad_accumulate, x + y * y)
PASS(adagrad_update, x - y / (sqrtf(z) + k1) * k0)
// Adam: m = β1·m + (1 − β1)·g with (k0, k1) = (β1, 1 − β1); v likewise with g²;
// θ −= m̂ / (√v̂ + ε) · lr with m̂ = m·k0, v̂ = v·k1 (the bias corrections), k2 = ε,
// k3 = lr.
PASS(adam_m, x * k0 + y * k1)
PASS(adam_v, x * k0 + y * y * k1)
PASS(adam_update, x - y * k0 / (sqrtf(z * k1) + k2) * k3)

//! BatchNorm (+ ReLU) followed by a 2×2 max-pool, on the slices of a fused node
//! ([`super::conv_bn_pool_train`]), without the full-size BatchNorm output.
//!
//! As a BatchNorm followed by a max-pool, the output before the pool (the largest
//! tensor of a block) was written, read by the pool and kept for the backward,
//! whose pool step wrote a full-size gradient, zero but for one value per window,
//! that BatchNorm's backward read twice. Here the forward normalises and pools in
//! one pass and keeps, per window, which of its four values was the maximum. The
//! backward's sums run over the windows only (the other values' gradient is 0), and
//! its `∂x = a·(g' − ∂β/M − x̂·∂γ/M)` is one dense pass for `g' = 0` and then the
//! windows' maxima written again with their `g'`.
//!
//! Windows and ties as in [`super::max_pool2x2`]: floor semantics (a trailing odd
//! row or column gets no gradient), and a window's gradient goes to its first
//! maximum in the order top-left, top-right, bottom-left, bottom-right.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::batchnorm::{BnTrain, DxCoef};

/// Offset in its `w`-wide plane of element `k` (0..4, row-major) of the window
/// at pooled position `(oy, ox)`.
fn window_at(w: usize, oy: usize, ox: usize, k: u8) -> usize {
    let k = usize::from(k);
    (2 * oy + k / 2) * w + 2 * ox + k % 2
}

/// The pooled side of [`BnTrain::backward_pool`]: the pooled output, the maxima's
/// places and the gradient, all batch-major `[B, C, Ho, Wo]`.
struct Windows<'a> {
    y: &'a [f32],
    at: &'a [u8],
    g: &'a [f32],
    b: usize,
    c: usize,
    /// Width of the planes before the pool.
    w: usize,
    relu: bool,
}

impl Windows<'_> {
    /// `(pooled rows, pooled columns)` of planes of `s` values.
    fn pooled(&self, s: usize) -> (usize, usize) {
        (s / self.w / 2, self.w / 2)
    }

    /// The windows of pooled row `oy` of image `bi` in channel `ch`: for each, the
    /// offset of its maximum in the image's plane, and its gradient after the ReLU
    /// (none where the maximum was clipped).
    fn row(
        &self,
        ch: usize,
        bi: usize,
        oy: usize,
        (ho, wo): (usize, usize),
    ) -> impl Iterator<Item = (usize, f32)> + '_ {
        let first = ((bi * self.c + ch) * ho + oy) * wo;
        let ys = &self.y[first..first + wo];
        let (ks, gs) = (&self.at[first..first + wo], &self.g[first..first + wo]);
        ys.iter()
            .zip(ks)
            .zip(gs)
            .enumerate()
            .map(move |(ox, ((&y, &k), &g))| {
                let gi = if self.relu && y <= 0.0 { 0.0 } else { g };
                (window_at(self.w, oy, ox, k), gi)
            })
    }

    /// `f(index in x's channel, g', x)` for each window of channel `ch`, with `x`
    /// the channel's `[B, H, W]` values.
    fn each(&self, ch: usize, x: &[f32], mut f: impl FnMut(usize, f32, f32)) {
        let s = x.len() / self.b.max(1);
        let dims = self.pooled(s);
        for bi in 0..self.b {
            for oy in 0..dims.0 {
                for (at, gi) in self.row(ch, bi, oy, dims) {
                    let i = bi * s + at;
                    f(i, gi, x[i]);
                }
            }
        }
    }
}

impl BnTrain {
    /// `max_pool2x2(BN(x) (→ ReLU))` of channel-major `x: [C, B, H, W]` with
    /// `gb = [γ…, β…]`: the pooled output, batch-major `[B, C, ⌊H/2⌋, ⌊W/2⌋]`, and
    /// per pooled value the index (0..4) of its window's first maximum.
    pub(super) fn forward_pool(
        &self,
        x: &[f32],
        gb: &[f32],
        (h, w): (usize, usize),
    ) -> (Vec<f32>, Vec<u8>) {
        let c = self.mean.len();
        let (gamma, beta) = gb.split_at(c);
        let (s, ho, wo) = (h * w, h / 2, w / 2);
        let p = ho * wo;
        let relu = self.relu;
        let mut out = vec![0f32; self.b * c * p];
        let mut at = vec![0u8; self.b * c * p];
        if p == 0 {
            return (out, at);
        }
        // One image per task: its C pooled planes.
        out.par_chunks_mut(c * p)
            .zip(at.par_chunks_mut(c * p))
            .enumerate()
            .for_each(|(bi, (out, at))| {
                let (mut t0, mut t1) = (vec![0f32; 2 * wo], vec![0f32; 2 * wo]);
                for (ch, (out, at)) in out.chunks_mut(p).zip(at.chunks_mut(p)).enumerate() {
                    // The same coefficients as `BnTrain::forward`: the same values.
                    let (a, bias) = self.scale_shift(ch, gamma, beta);
                    let f = |v: f32| {
                        let y = a * v + bias;
                        if relu { y.max(0.0) } else { y }
                    };
                    let plane = &x[(ch * self.b + bi) * s..(ch * self.b + bi + 1) * s];
                    let lines = out.chunks_mut(wo).zip(at.chunks_mut(wo));
                    for (oy, (out, at)) in lines.enumerate() {
                        // Normalised first (a loop that vectorises), then the windows
                        // without branches.
                        for (r, t) in [&mut t0, &mut t1].into_iter().enumerate() {
                            let row = &plane[(2 * oy + r) * w..(2 * oy + r) * w + 2 * wo];
                            for (d, &v) in t.iter_mut().zip(row) {
                                *d = f(v);
                            }
                        }
                        let windows = t0.chunks_exact(2).zip(t1.chunks_exact(2));
                        for ((o, k), (t, b)) in out.iter_mut().zip(at.iter_mut()).zip(windows) {
                            let mx = t[0].max(t[1]).max(b[0].max(b[1]));
                            *o = mx;
                            // The first of the four equal to the maximum.
                            let (n0, n1, n2) = (
                                u8::from(t[0] != mx),
                                u8::from(t[1] != mx),
                                u8::from(b[0] != mx),
                            );
                            *k = n0 * (1 + n1 * (1 + n2));
                        }
                    }
                }
            });
        (out, at)
    }

    /// The backward of [`BnTrain::forward_pool`]: `(∂x [C, B, H, W], [∂γ, ∂β])` from
    /// `x`, the pooled output `y`, the maxima's places `at` and the gradient `g` of
    /// `y` (batch-major, like `y`).
    pub(super) fn backward_pool(
        &self,
        x: &[f32],
        gamma: &[f32],
        (y, at, g): (&[f32], &[u8], &[f32]),
        (h, w): (usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        let c = self.mean.len();
        let b = self.b;
        debug_assert_eq!(x.len(), c * b * h * w, "backward_pool: x and its dims");
        let windows = Windows {
            y,
            at,
            g,
            b,
            c,
            w,
            relu: self.relu,
        };
        // Σg' and Σg'·x̂: only the windows' maxima have g' ≠ 0.
        let sums = |ch: usize, x: &[f32]| {
            let mu = self.mean[ch];
            let (mut sb, mut sg) = (0f64, 0f64);
            windows.each(ch, x, |_, gi, xv| {
                sb += f64::from(gi);
                sg += f64::from(gi * (xv - mu));
            });
            (sb, sg * f64::from(self.invstd[ch]))
        };
        // Two input rows at a time (a trailing odd row alone): all values as if
        // their gradient were 0, then the windows' maxima again while the rows are
        // in L1. (As two passes over the channel, the second read it from memory.)
        let write = |ch: usize, x: &[f32], dx: &mut [MaybeUninit<f32>], k: DxCoef| {
            let s = x.len() / b.max(1);
            let dims = windows.pooled(s);
            let (xs, dxs) = (x.chunks(s), dx.chunks_mut(s));
            for (bi, (x, dx)) in xs.zip(dxs).enumerate() {
                for (r, (x, dx)) in x.chunks(2 * w).zip(dx.chunks_mut(2 * w)).enumerate() {
                    for (d, &xv) in dx.iter_mut().zip(x) {
                        d.write(k.dx(0.0, xv));
                    }
                    if r < dims.0 {
                        for (at, gi) in windows.row(ch, bi, r, dims) {
                            let i = at - 2 * r * w;
                            dx[i].write(k.dx(gi, x[i]));
                        }
                    }
                }
            }
        };
        // SAFETY: `write`'s dense pass writes each pair of rows of a channel in full
        // before the windows overwrite some.
        #[allow(unsafe_code)]
        unsafe {
            self.channel_backward(x, gamma, sums, write)
        }
    }
}

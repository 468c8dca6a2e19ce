//! BatchNorm (+ ReLU) followed by a 2×2 max-pool, on the slices of a fused node
//! ([`super::conv_bn_pool_train`]), without the full-size BatchNorm output.
//!
//! As a BatchNorm followed by a max-pool, the output before the pool (the largest
//! tensor of a block) was written, read by the pool and kept for the backward,
//! whose pool step wrote a full-size gradient, zero but for one value per window,
//! that BatchNorm's backward read twice. Here the forward normalises and pools in
//! one pass and keeps, per window, which of its four values was the maximum. The
//! backward's sums run over the windows' maxima only (the other values' gradient
//! is 0), gathered plane by plane into partial sums, and its `∂x = a·(g' − ∂β/M −
//! x̂·∂γ/M)` is one branchless pass per row: each value with its window's `g'`
//! where it is the maximum, 0 elsewhere.
//!
//! Windows and ties as in [`super::max_pool2x2`]: floor semantics (a trailing odd
//! row or column gets no gradient), and a window's gradient goes to its first
//! maximum in the order top-left, top-right, bottom-left, bottom-right.

use rayon::prelude::*;

use super::batchnorm::{BnGrad, BnTrain, DxCoef, GradKind, lane_sum2, relu_mask};

/// The pooled side of [`BnTrain::grad_pool`]: the pooled output, the maxima's
/// places and the gradient, all batch-major `[B, C, Ho, Wo]`.
pub(super) struct Windows<'a> {
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

    /// The pooled output, maxima's places and gradient of image `bi`'s plane in
    /// channel `ch`, and its `(pooled rows, pooled columns)`, for planes of `s`
    /// values before the pool.
    fn plane(&self, ch: usize, bi: usize, s: usize) -> (&[f32], &[u8], &[f32], (usize, usize)) {
        let dims = self.pooled(s);
        let p = dims.0 * dims.1;
        let first = (bi * self.c + ch) * p;
        let span = first..first + p;
        (
            &self.y[span.clone()],
            &self.at[span.clone()],
            &self.g[span],
            dims,
        )
    }

    /// `∂x` of values `off..off + d.len()` of image `bi`'s plane (of `s` values) in
    /// channel `ch`, whose inputs are `xs`: each value with its window's `g'` where
    /// it is the window's maximum, and 0 elsewhere, in one branchless pass per row.
    pub(super) fn fill(
        &self,
        (ch, bi, off): (usize, usize, usize),
        s: usize,
        xs: &[f32],
        d: &mut [f32],
        k: DxCoef,
    ) {
        let (ys, ks, gs, (ho, wo)) = self.plane(ch, bi, s);
        let (w, relu) = (self.w, self.relu);
        let mut i = 0;
        while i < d.len() {
            let (row, col) = ((off + i) / w, (off + i) % w);
            let n = (w - col).min(d.len() - i);
            let (d, xs) = (&mut d[i..i + n], &xs[i..i + n]);
            i += n;
            if row / 2 >= ho || col != 0 || n != w {
                // Below the last window (a trailing odd row), or part of a row
                // (never asked for by the convolutions): value by value.
                for (j, (d, &xv)) in d.iter_mut().zip(xs).enumerate() {
                    let (oy, ox) = (row / 2, (col + j) / 2);
                    let gi = if oy < ho && ox < wo {
                        let at = oy * wo + ox;
                        let mine = usize::from(ks[at]) == (row % 2) * 2 + (col + j) % 2;
                        if mine {
                            relu_mask(relu, ys[at], gs[at])
                        } else {
                            0.0
                        }
                    } else {
                        0.0
                    };
                    *d = k.dx(gi, xv);
                }
                continue;
            }
            let at = (row / 2) * wo..(row / 2 + 1) * wo;
            // The window places 2r and 2r + 1 are this row's.
            let r = (row % 2) as u8 * 2;
            let (ys, ks, gs) = (&ys[at.clone()], &ks[at.clone()], &gs[at]);
            let pairs = d.chunks_exact_mut(2).zip(xs.chunks_exact(2));
            for ((((d, x), &yv), &kk), &gv) in pairs.zip(ys).zip(ks).zip(gs) {
                let gi = relu_mask(relu, yv, gv);
                d[0] = k.dx(if kk == r { gi } else { 0.0 }, x[0]);
                d[1] = k.dx(if kk == r + 1 { gi } else { 0.0 }, x[1]);
            }
            if w % 2 == 1 {
                d[w - 1] = k.dx(0.0, xs[w - 1]);
            }
        }
    }

    /// `(Σg', Σg'·(x − μ))` over channel `ch`, whose `[B, H, W]` values are `x`:
    /// over the windows' maxima only (the other values' `g'` is 0), each plane's
    /// maxima gathered first so that the sums run in [`LANES`](super::batchnorm)
    /// partial sums.
    fn sums(&self, ch: usize, x: &[f32], mu: f32) -> (f64, f64) {
        let s = x.len() / self.b.max(1);
        let (mut sb, mut sg) = (0f64, 0f64);
        let mut xat = Vec::new();
        for (bi, plane) in x.chunks_exact(s.max(1)).enumerate() {
            let (ys, ks, gs, (_, wo)) = self.plane(ch, bi, s);
            xat.clear();
            for (oy, ks) in ks.chunks_exact(wo.max(1)).enumerate() {
                let (top, w) = (&plane[2 * oy * self.w..], self.w);
                xat.extend(ks.iter().enumerate().map(|(ox, &k)| {
                    let k = usize::from(k);
                    top[k / 2 * w + 2 * ox + k % 2]
                }));
            }
            let relu = self.relu;
            let (b32, g32) = lane_sum2(&xat, ys, gs, |xv, yv, gv| {
                let gi = relu_mask(relu, yv, gv);
                (gi, gi * (xv - mu))
            });
            sb += f64::from(b32);
            sg += f64::from(g32);
        }
        (sb, sg)
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

    /// The backward's first pass for [`BnTrain::forward_pool`], from `x`, the pooled
    /// output `y`, the maxima's places `at` and the gradient `g` of `y` (batch-major,
    /// like `y`); see [`BnTrain::grad`]. The sums run over the windows only (the
    /// other values' `g'` is 0).
    pub(super) fn grad_pool<'a>(
        &self,
        x: &'a [f32],
        gamma: &[f32],
        (y, at, g): (&'a [f32], &'a [u8], &'a [f32]),
        (h, w): (usize, usize),
    ) -> BnGrad<'a> {
        let (c, b) = (self.mean.len(), self.b);
        debug_assert_eq!(x.len(), c * b * h * w, "grad_pool: x and its dims");
        let windows = Windows {
            y,
            at,
            g,
            b,
            c,
            w,
            relu: self.relu,
        };
        let sums = |ch: usize, x: &[f32]| {
            let (sb, sg) = windows.sums(ch, x, self.mean[ch]);
            (sb, sg * f64::from(self.invstd[ch]))
        };
        let (coef, dgb) = self.coefs(x, gamma, sums);
        BnGrad::new(self, x, coef, dgb, None, GradKind::Pool(windows))
    }
}

//! BatchNorm in training mode, fused with what follows it in the network (a
//! residual add, a ReLU), as one pass forward and two passes backward: the sums,
//! then `∂x`, which the convolution before it computes a chunk at a time
//! ([`BnGrad::fill`]).
//!
//! candle-nn's `BatchNorm::forward_train` transposes, copies and runs about ten
//! full-size element-wise ops forward (and as many backward); at the tiny spec those
//! ops and their fresh buffers were the largest share of a training step
//! (`docs/performance.md`). Here the batch statistics are computed once per channel,
//! the forward is `y = max(0, a·x + c + skip)` with `a = γ/σ`, `c = β − μ·a`, and
//! the backward is the closed form
//!
//! ```text
//! g' = g · [y > 0]            (ReLU mask, when fused)       ∂skip = g'
//! ∂β = Σ g'      ∂γ = Σ g'·x̂      ∂x = a · (g' − ∂β/M − x̂·∂γ/M)
//! ```
//!
//! over the `M` values of each channel. The input is channel-major `[C, B, …]`
//! (the convolutions produce `[C, B·H·W]`), the output batch-major `[B, C, …]`, so
//! the next convolution, max-pool or residual add reads it without a copy.
//! Statistics and running averages follow candle-nn exactly (biased variance to
//! normalise, unbiased in the running variance).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bn_pool::Windows;
use super::{contiguous, filled, with_slice};

/// The training-mode BatchNorm op over channel-major `x: [C, B, …]` and `γβ: [2, C]`
/// (and a batch-major `skip: [B, C, …]` as a third argument), carrying the batch
/// statistics it was built with.
#[derive(Debug, Clone)]
pub(super) struct BnTrain {
    pub(super) mean: Vec<f32>,
    pub(super) invstd: Vec<f32>,
    pub(super) relu: bool,
    /// Batch size (dimension 1 of `x`).
    pub(super) b: usize,
    /// Normalising with constants ([`BnTrain::fixed`]), not with the batch's own
    /// statistics: `∂x = a·g'`, without the statistics' terms.
    pub(super) fixed: bool,
}

/// Independent f32 partial sums per reduction: one running sum is a chain of
/// dependent additions, which the compiler may not reorder into SIMD lanes (BatchNorm's
/// statistics and backward sums ran at a quarter of the speed of its forward).
const LANES: usize = 16;

/// `Σ f(v)` in [`LANES`] partial sums.
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f32>()
}

/// `(Σ f(x, y, g).0, Σ f(x, y, g).1)` over three equal-length slices, in
/// [`LANES`] partial sums each.
pub(super) fn lane_sum2(
    xs: &[f32],
    ys: &[f32],
    gs: &[f32],
    f: impl Fn(f32, f32, f32) -> (f32, f32),
) -> (f32, f32) {
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    let (mut cx, mut cy, mut cg) = (
        xs.chunks_exact(LANES),
        ys.chunks_exact(LANES),
        gs.chunks_exact(LANES),
    );
    for ((x, y), g) in (&mut cx).zip(&mut cy).zip(&mut cg) {
        for i in 0..LANES {
            let (u, v) = f(x[i], y[i], g[i]);
            a[i] += u;
            b[i] += v;
        }
    }
    let (mut ta, mut tb) = (0f32, 0f32);
    for ((&x, &y), &g) in cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .zip(cg.remainder())
    {
        let (u, v) = f(x, y, g);
        ta += u;
        tb += v;
    }
    (a.iter().sum::<f32>() + ta, b.iter().sum::<f32>() + tb)
}

/// Values per task of an element-wise loop over a whole tensor: rayon's
/// per-element `par_iter` did not vectorise (∂skip as `par_iter().map().collect()`
/// took 1.2 ns a value on one thread, the BatchNorm sums beside it 0.3).
pub(super) const PIECE: usize = 16 * 1024;

/// Values per block of the statistics: small enough that a block's second pass
/// reads L1, large enough that f32 sums within it stay exact to ~1e-6.
const STAT_BLOCK: usize = 4096;

/// Mean and biased variance of `v`, reading memory once: per block its mean and
/// the squared deviations from that mean (two passes over L1), merged across blocks
/// in f64 with the pairwise update of Chan, Golub and LeVeque.
fn mean_var(v: &[f32]) -> (f32, f32) {
    let (mut n, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for b in v.chunks(STAT_BLOCK) {
        let nb = b.len() as f64;
        let mb = lane_sum(b, |x| x) as f64 / nb;
        let c = mb as f32;
        // Σ(x − mb)² = Σ(x − c)² − nb·(mb − c)², exactly.
        let m2b = lane_sum(b, |x| (x - c) * (x - c)) as f64 - nb * (mb - c as f64).powi(2);
        let (d, total) = (mb - mean, n + nb);
        mean += d * nb / total;
        m2 += m2b.max(0.0) + d * d * n * nb / total;
        n = total;
    }
    (mean as f32, (m2 / n.max(1.0)) as f32)
}

/// Batch statistics of channel-major `x: [C, M]`: per-channel mean and biased variance.
fn channel_stats(x: &[f32], m: usize) -> Vec<(f32, f32)> {
    x.par_chunks(m).map(mean_var).collect()
}

/// `[C, B, rest…]` → `[B, C, rest…]`.
pub(super) fn batch_major(shape: &Shape) -> Shape {
    let mut dims = shape.dims().to_vec();
    dims.swap(0, 1);
    Shape::from(dims)
}

impl BnTrain {
    /// The statistics of channel-major `x: [C, B·S]` (`m` = B·S values per channel)
    /// and the op that normalises with them.
    pub(super) fn from_batch(
        x: &[f32],
        m: usize,
        b: usize,
        eps: f64,
        relu: bool,
    ) -> (Self, BatchStats) {
        let (mean, var): (Vec<f32>, Vec<f32>) = channel_stats(x, m).into_iter().unzip();
        let invstd = var
            .iter()
            .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
            .collect();
        let op = BnTrain {
            mean: mean.clone(),
            invstd,
            relu,
            b,
            fixed: false,
        };
        let stats = BatchStats {
            mean,
            var,
            count: m,
        };
        (op, stats)
    }

    /// The op that normalises with constant `mean` and `invstd` (1/σ) per channel:
    /// a frozen network's BatchNorm on its running statistics, or, with 0 and 1, a
    /// convolution's bias as β. The backward then leaves out the statistics' terms
    /// (they are not functions of `x`): `∂x = γ·invstd·g'`.
    pub(super) fn fixed(mean: &[f32], invstd: &[f32], b: usize, relu: bool) -> Self {
        BnTrain {
            mean: mean.to_vec(),
            invstd: invstd.to_vec(),
            relu,
            b,
            fixed: true,
        }
    }

    /// Channel `ch`'s `(a, c)` of the normalisation `a·x + c`: one expression for
    /// every forward and for the backward's ReLU mask, so that they agree bit for
    /// bit.
    pub(super) fn scale_shift(&self, ch: usize, gamma: &[f32], beta: &[f32]) -> (f32, f32) {
        let a = gamma[ch] * self.invstd[ch];
        (a, beta[ch] - self.mean[ch] * a)
    }

    /// `y = a·x + c (+ skip) (→ ReLU)`, batch-major, from channel-major `x` and
    /// `gb = [γ…, β…]`.
    pub(super) fn forward(&self, x: &[f32], gb: &[f32], skip: Option<&[f32]>) -> Vec<f32> {
        let c = self.mean.len();
        let (gamma, beta) = gb.split_at(c);
        let s = x.len() / (c * self.b).max(1);
        let relu = self.relu;
        let fill = |out: &mut [MaybeUninit<f32>]| {
            // One image per task: its C segments of S values each.
            out.par_chunks_mut(c * s).enumerate().for_each(|(bi, img)| {
                for (ch, dst) in img.chunks_mut(s).enumerate() {
                    let (a, bias) = self.scale_shift(ch, gamma, beta);
                    let src = &x[(ch * self.b + bi) * s..(ch * self.b + bi + 1) * s];
                    let clip = |v: f32| if relu { v.max(0.0) } else { v };
                    match skip {
                        Some(skip) => {
                            let add = &skip[(bi * c + ch) * s..(bi * c + ch + 1) * s];
                            for ((d, &v), &k) in dst.iter_mut().zip(src).zip(add) {
                                d.write(clip(a * v + bias + k));
                            }
                        }
                        None => {
                            for (d, &v) in dst.iter_mut().zip(src) {
                                d.write(clip(a * v + bias));
                            }
                        }
                    }
                }
            });
        };
        // SAFETY: the images' segments tile the output (B images × C channels × S
        // values, x.len() in all), and each segment is written in full: `src` and
        // `add` hold S values.
        #[allow(unsafe_code)]
        unsafe {
            filled(x.len(), fill)
        }
    }

    /// `(∂x [C, B, …], ∂γβ [2, C], ∂skip [B, C, …] when with_skip)` from the output
    /// `y` and its gradient `g`, both batch-major.
    fn backward(
        &self,
        x: &Tensor,
        gb: &Tensor,
        y: &Tensor,
        g: &Tensor,
        with_skip: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let c = self.mean.len();
        let gb = gb.flatten_all()?.to_vec1::<f32>()?;
        let (dx, dgb, dskip) = with_slice(x, |x| {
            with_slice(y, |y| {
                with_slice(g, |g| Ok(self.backward_slices(x, &gb, y, g, with_skip)))
            })
        })?;
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dgb, (2, c), dev)?,
            dskip
                .map(|d| Tensor::from_vec(d, y.shape(), dev))
                .transpose()?,
        ))
    }

    /// [`BnTrain::backward`] on slices: `(∂x, [∂γ, ∂β], ∂skip)`, each channel's
    /// `∂x` written whole from [`BnTrain::grad`].
    fn backward_slices(
        &self,
        x: &[f32],
        gb: &[f32],
        y: &[f32],
        g: &[f32],
        with_skip: bool,
    ) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
        let grad = self.grad(x, gb, y, g, Skip::gradient_if(with_skip));
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(grad.m)
            .enumerate()
            .for_each(|(ch, d)| grad.fill(ch, 0, d));
        (dx, grad.dgb, grad.dskip)
    }

    /// The backward's first pass, from the output `y` and its gradient `g` (both
    /// batch-major): the sums `Σg'` and `Σg'·x̂` of each channel, hence `[∂γ, ∂β]`,
    /// `∂skip` for [`Skip::Gradient`], and what `∂x` is then computed from, a span at
    /// a time ([`BnGrad::fill`]).
    ///
    /// With a ReLU and no skip input, the ReLU's mask comes from `x` (the forward's
    /// own `a·x + c`, so the same mask bit for bit) and `y` is not read. With a skip
    /// it needs `y`.
    pub(super) fn grad<'a>(
        &self,
        x: &'a [f32],
        gb: &[f32],
        y: &'a [f32],
        g: &'a [f32],
        skip: Skip,
    ) -> BnGrad<'a> {
        let with_skip = skip != Skip::None;
        let c = self.mean.len();
        let (gamma, beta) = gb.split_at(c);
        let s = x.len() / (c * self.b).max(1);
        let relu = self.relu;
        if relu && !with_skip {
            let shift: Vec<(f32, f32)> =
                (0..c).map(|ch| self.scale_shift(ch, gamma, beta)).collect();
            // y = max(a·x + c, 0) ≤ 0 exactly where a·x + c is not positive (NaN
            // included: `max` gives 0 for it).
            let sums = |ch: usize, x: &[f32]| {
                let (mu, is) = (self.mean[ch], self.invstd[ch]);
                let (a, bias) = shift[ch];
                let (mut sb, mut sg) = (0f64, 0f64);
                for (bi, xs) in x.chunks(s).enumerate() {
                    let at = (bi * c + ch) * s;
                    let gs = &g[at..at + s];
                    // `g` as the second slice too: no third stream.
                    let (b32, g32) = lane_sum2(xs, gs, gs, |xv, gv, _| {
                        let gi = if a * xv + bias > 0.0 { gv } else { 0.0 };
                        (gi, gi * (xv - mu))
                    });
                    sb += b32 as f64;
                    sg += g32 as f64 * is as f64;
                }
                (sb, sg)
            };
            let (coef, dgb) = self.coefs(x, gamma, sums);
            return BnGrad::new(self, x, coef, dgb, None, GradKind::MaskX { g, shift });
        }
        let sums = |ch: usize, x: &[f32]| {
            let (mu, is) = (self.mean[ch], self.invstd[ch]);
            let (mut sb, mut sg) = (0f64, 0f64);
            // Image bi's values of this channel: one segment of x (channel-major),
            // at `at` in y and g (batch-major).
            for (bi, xs) in x.chunks(s).enumerate() {
                let at = (bi * c + ch) * s;
                let (ys, gs) = (&y[at..at + s], &g[at..at + s]);
                let (b32, g32) = lane_sum2(xs, ys, gs, |xv, yv, gv| {
                    let gi = relu_mask(relu, yv, gv);
                    (gi, gi * (xv - mu))
                });
                sb += b32 as f64;
                sg += g32 as f64 * is as f64;
            }
            (sb, sg)
        };
        let (coef, dgb) = self.coefs(x, gamma, sums);
        let dskip = (skip == Skip::Gradient).then(|| {
            let fill = |out: &mut [MaybeUninit<f32>]| {
                let pieces = out.par_chunks_mut(PIECE).zip(y.par_chunks(PIECE));
                pieces.zip(g.par_chunks(PIECE)).for_each(|((out, y), g)| {
                    for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
                        o.write(relu_mask(relu, y, g));
                    }
                });
            };
            // SAFETY: the pieces of `out`, `y` and `g` line up (all `y.len()` long),
            // and each of `out`'s is written in full.
            #[allow(unsafe_code)]
            unsafe {
                filled(y.len(), fill)
            }
        });
        let kind = GradKind::MaskY { y, g, relu };
        BnGrad::new(self, x, coef, dgb, dskip, kind)
    }

    /// Each channel's `∂x` coefficients and `[∂γ…, ∂β…]`, from `sums(ch, x)`: the
    /// channel's `(Σg', Σg'·x̂)` over its values `x` (channels in parallel).
    pub(super) fn coefs(
        &self,
        x: &[f32],
        gamma: &[f32],
        sums: impl Fn(usize, &[f32]) -> (f64, f64) + Sync,
    ) -> (Vec<DxCoef>, Vec<f32>) {
        let m = (x.len() / self.mean.len().max(1)).max(1);
        let (coef, sums): (Vec<DxCoef>, Vec<(f32, f32)>) = x
            .par_chunks(m)
            .enumerate()
            .map(|(ch, x)| {
                let (mu, is) = (self.mean[ch], self.invstd[ch]);
                let (sb, sg) = sums(ch, x);
                // x̂·∂γ/M = (x − μ)·σ⁻¹·∂γ/M; constants have no such terms.
                let (mb, mg) = if self.fixed {
                    (0.0, 0.0)
                } else {
                    ((sb / m as f64) as f32, (sg / m as f64) as f32 * is)
                };
                let coef = DxCoef {
                    a: gamma[ch] * is,
                    mu,
                    mb,
                    mg,
                };
                (coef, (sg as f32, sb as f32))
            })
            .unzip();
        let (dgamma, dbeta): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
        (coef, [dgamma, dbeta].concat())
    }
}

/// Whether a skip input was added before the ReLU, and what the backward does
/// about its gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Skip {
    /// No skip input.
    None,
    /// A skip input, whose gradient `∂skip` (`g` after the ReLU's mask) the
    /// backward writes.
    Gradient,
    /// A skip input whose gradient the caller takes from `y` and `g` itself
    /// ([`relu_mask`]) where it needs it: the residual pair starts its input's `∂x`
    /// from it instead of adding a written `∂skip` afterwards.
    Deferred,
}

impl Skip {
    /// [`Skip::Gradient`] when there is a skip input, else [`Skip::None`].
    pub(super) fn gradient_if(with_skip: bool) -> Self {
        if with_skip {
            Skip::Gradient
        } else {
            Skip::None
        }
    }
}

/// `g` after the ReLU's mask, from the output `y`.
pub(super) fn relu_mask(relu: bool, y: f32, g: f32) -> f32 {
    if relu && y <= 0.0 { 0.0 } else { g }
}

/// A BatchNorm's backward after its sums ([`BnTrain::grad`]): `[∂γ, ∂β]`, `∂skip`,
/// and `∂x` on demand, span by span ([`BnGrad::fill`]). The convolution before the
/// BatchNorm asks for a chunk of output rows at a time and multiplies it while it
/// is in cache (`conv_bn.rs`), so `∂x`, the size of the conv's output, is never
/// written to memory whole.
pub(super) struct BnGrad<'a> {
    /// BatchNorm's input, channel-major `[C, B, S]`.
    x: &'a [f32],
    /// Channels, values per channel (`B·S`) and per image plane (`S`).
    c: usize,
    pub(super) m: usize,
    s: usize,
    coef: Vec<DxCoef>,
    /// `[∂γ…, ∂β…]`.
    pub(super) dgb: Vec<f32>,
    /// The skip input's gradient, batch-major, when there is one.
    pub(super) dskip: Option<Vec<f32>>,
    kind: GradKind<'a>,
}

/// Where [`BnGrad::fill`] finds `g'`, the output gradient after the ReLU's mask.
pub(super) enum GradKind<'a> {
    /// A ReLU and no skip: the mask from `a·x + c` per channel.
    MaskX {
        g: &'a [f32],
        shift: Vec<(f32, f32)>,
    },
    /// The mask from the output `y` (none without a ReLU); `y`, `g` batch-major.
    MaskY {
        y: &'a [f32],
        g: &'a [f32],
        relu: bool,
    },
    /// A 2×2 max-pool after: `g'` only at the windows' maxima.
    Pool(Windows<'a>),
}

impl<'a> BnGrad<'a> {
    pub(super) fn new(
        bn: &BnTrain,
        x: &'a [f32],
        coef: Vec<DxCoef>,
        dgb: Vec<f32>,
        dskip: Option<Vec<f32>>,
        kind: GradKind<'a>,
    ) -> Self {
        let c = bn.mean.len();
        let m = x.len() / c.max(1);
        BnGrad {
            x,
            c,
            m,
            s: m / bn.b.max(1),
            coef,
            dgb,
            dskip,
            kind,
        }
    }

    /// Writes `∂x` of channel `ch`'s values `first..first + dst.len()` (counted
    /// over the batch, as in `x`) into `dst`.
    pub(super) fn fill(&self, ch: usize, first: usize, dst: &mut [f32]) {
        let (k, s) = (self.coef[ch], self.s.max(1));
        let xc = &self.x[ch * self.m..(ch + 1) * self.m];
        let mut done = 0;
        // One image's part of the span at a time: `y` and `g` are batch-major.
        while done < dst.len() {
            let p = first + done;
            let (bi, off) = (p / s, p % s);
            let n = (s - off).min(dst.len() - done);
            let (d, xs) = (&mut dst[done..done + n], &xc[p..p + n]);
            let at = (bi * self.c + ch) * s + off;
            match &self.kind {
                GradKind::MaskX { g, shift } => {
                    let (a, bias) = shift[ch];
                    for ((d, &xv), &gv) in d.iter_mut().zip(xs).zip(&g[at..at + n]) {
                        let gi = if a * xv + bias > 0.0 { gv } else { 0.0 };
                        *d = k.dx(gi, xv);
                    }
                }
                GradKind::MaskY { y, g, relu } => {
                    let (ys, gs) = (&y[at..at + n], &g[at..at + n]);
                    for (((d, &xv), &yv), &gv) in d.iter_mut().zip(xs).zip(ys).zip(gs) {
                        *d = k.dx(relu_mask(*relu, yv, gv), xv);
                    }
                }
                GradKind::Pool(windows) => windows.fill((ch, bi, off), s, xs, d, k),
            }
            done += n;
        }
    }
}

/// The coefficients of one channel's `∂x = a·(g' − ∂β/M − (x − μ)·σ⁻¹·∂γ/M)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct DxCoef {
    a: f32,
    mu: f32,
    mb: f32,
    mg: f32,
}

impl DxCoef {
    /// `∂x` of a value `x` whose output gradient (after the ReLU's mask) is `g`.
    pub(super) fn dx(&self, g: f32, x: f32) -> f32 {
        self.a * (g - self.mb - (x - self.mu) * self.mg)
    }
}

impl CustomOp2 for BnTrain {
    fn name(&self) -> &'static str {
        "batch_norm_train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.forward(
            contiguous(s1, l1, "batch_norm_train")?,
            contiguous(s2, l2, "batch_norm_train")?,
            None,
        );
        Ok((CpuStorage::F32(out), batch_major(l1.shape())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dgb, _) = self.backward(x, gb, res, grad, false)?;
        Ok((Some(dx), Some(dgb)))
    }
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "batch_norm_add_train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let skip = contiguous(s3, l3, "batch_norm_train")?;
        let out = self.forward(
            contiguous(s1, l1, "batch_norm_train")?,
            contiguous(s2, l2, "batch_norm_train")?,
            Some(skip),
        );
        Ok((CpuStorage::F32(out), batch_major(l1.shape())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        _skip: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgb, dskip) = self.backward(x, gb, res, grad, true)?;
        Ok((Some(dx), Some(dgb), dskip))
    }
}

/// BatchNorm statistics of one training-mode call, for the running averages.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Per-channel batch mean.
    pub mean: Vec<f32>,
    /// Per-channel biased batch variance.
    pub var: Vec<f32>,
    /// Values per channel (`M`).
    pub count: usize,
}

/// Training-mode BatchNorm on the CPU of channel-major `x: [C, B, …]`, plus `skip`
/// (batch-major `[B, C, …]`) when given, then ReLU when `relu`. Returns the output,
/// batch-major `[B, C, …]`, and the batch statistics.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
    skip: Option<&Tensor>,
) -> Result<(Tensor, BatchStats)> {
    let x = x.contiguous()?;
    let (c, b) = (x.dim(0)?, x.dim(1)?);
    let m = x.elem_count() / c.max(1);
    if m == 0 {
        candle_core::bail!("batch_norm_train on an empty batch {:?}", x.shape());
    }
    let out_shape = batch_major(x.shape());
    if let Some(skip) = skip.filter(|k| k.shape() != &out_shape) {
        candle_core::bail!(
            "batch_norm_train: skip {:?} does not match the output {out_shape:?}",
            skip.shape()
        );
    }
    let (op, stats) = with_slice(&x, |data| Ok(BnTrain::from_batch(data, m, b, eps, relu)))?;
    let gb = Tensor::stack(&[gamma, beta], 0)?;
    let y = match skip {
        Some(skip) => x.apply_op3(&gb, &skip.contiguous()?, op)?,
        None => x.apply_op2(&gb, op)?,
    };
    Ok((y, stats))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::{BatchNorm, ModuleT};

    use super::*;
    use crate::ops::test_util::{grads_of, max_diff, rand, rel_diff};

    /// candle-nn's BatchNorm (+ skip, + ReLU) on `[B, C, …]`, the reference.
    fn reference(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        relu: bool,
        skip: Option<&Tensor>,
    ) -> (Tensor, BatchNorm) {
        let c = gamma.dim(0).expect("c");
        let bn = BatchNorm::new_with_momentum(
            c,
            Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu).expect("zeros"),
            Tensor::ones(c, candle_core::DType::F32, &Device::Cpu).expect("ones"),
            gamma.clone(),
            beta.clone(),
            1e-5,
            0.1,
        )
        .expect("bn");
        let mut y = bn.forward_t(x, true).expect("forward");
        if let Some(skip) = skip {
            y = (y + skip).expect("add");
        }
        if relu {
            y = y.relu().expect("relu");
        }
        (y, bn)
    }

    #[test]
    fn forward_gradients_and_statistics_match_candle_nn() {
        for (shape, relu, with_skip) in [
            (vec![4, 3, 5, 6], true, false),
            (vec![4, 3, 5, 6], false, false),
            (vec![4, 3, 5, 6], true, true),
            (vec![3, 2, 4, 4], false, true),
            (vec![7, 5], false, false),
            (vec![2, 8, 3, 3], true, false),
        ] {
            let c = shape[1];
            let x = Var::from_tensor(&rand(&shape, 1).affine(3.0, 0.7).expect("x")).expect("x");
            let gamma = Var::from_tensor(&rand(&[c], 2).affine(1.0, 1.0).expect("g")).expect("g");
            let beta = Var::from_tensor(&rand(&[c], 3)).expect("b");
            let skip = Var::from_tensor(&rand(&shape, 5)).expect("skip");
            let skip = with_skip.then_some(skip.as_tensor());
            // A loss that weighs every output differently.
            let w = rand(&shape, 4);
            let case = format!("{shape:?} relu={relu} skip={with_skip}");

            let (want, bn) = reference(&x, &gamma, &beta, relu, skip);
            let want_grads = grads_of(&want, &w);

            let xc = x.transpose(0, 1).expect("t");
            let (got, stats) = batch_norm_train(&xc, &gamma, &beta, 1e-5, relu, skip).expect("bn");
            assert_eq!(got.dims(), shape.as_slice(), "{case}: batch-major output");
            assert!(got.is_contiguous(), "{case}: contiguous output");
            let got_grads = grads_of(&got, &w);

            assert!(max_diff(&got, &want) < 1e-5, "{case}: output");
            let mut vars = vec![("x", x.as_tensor()), ("gamma", &gamma), ("beta", &beta)];
            if let Some(skip) = skip {
                vars.push(("skip", skip));
            }
            for (name, v) in vars {
                let (a, b) = (
                    got_grads.get(v).expect("got grad"),
                    want_grads.get(v).expect("want grad"),
                );
                assert!(
                    rel_diff(a, b) < 2e-5,
                    "{case}: d{name} differs by {}",
                    max_diff(a, b)
                );
            }
            // candle-nn's running averages after one step from (0, 1), momentum 0.1.
            let n = stats.count as f32;
            let mean = Tensor::new(stats.mean.as_slice(), &Device::Cpu).expect("mean");
            let var = Tensor::new(stats.var.as_slice(), &Device::Cpu).expect("var");
            let run_mean = mean.affine(0.1, 0.0).expect("m");
            let run_var = var.affine((0.1 * n / (n - 1.0)) as f64, 0.9).expect("v");
            assert!(
                max_diff(&run_mean, bn.running_mean()) < 1e-6,
                "{case}: running mean"
            );
            assert!(
                max_diff(&run_var, bn.running_var()) < 1e-5,
                "{case}: running var"
            );
        }
    }

    /// Several blocks, a ragged last one, and a mean far from zero (where one-pass
    /// `Σx²/M − μ²` in f32 would lose every digit) against f64 sums.
    #[test]
    fn statistics_match_f64_sums_across_blocks() {
        for (m, offset) in [
            (3 * STAT_BLOCK + 77, 1000.0f32),
            (STAT_BLOCK, 0.0),
            (5, -3.0),
        ] {
            let v: Vec<f32> = (0..m)
                .map(|i| offset + ((i as f32 * 0.618).fract() - 0.5) * (1.0 + (i % 7) as f32))
                .collect();
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / m as f64;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / m as f64;
            let (got_mean, got_var) = mean_var(&v);
            assert!(
                (got_mean as f64 - mean).abs() <= 1e-6 * mean.abs().max(1.0),
                "m={m}: mean {got_mean} vs {mean}"
            );
            assert!(
                (got_var as f64 - var).abs() <= 1e-4 * var,
                "m={m}: var {got_var} vs {var}"
            );
        }
    }

    #[test]
    fn relu_gradient_is_masked_where_the_output_is_clipped() {
        let x = Var::from_tensor(&rand(&[3, 2, 4, 4], 9)).expect("x");
        let gamma =
            Var::from_tensor(&Tensor::new(&[1f32, -2.0], &Device::Cpu).expect("g")).expect("g");
        let beta =
            Var::from_tensor(&Tensor::new(&[0f32, 0.5], &Device::Cpu).expect("b")).expect("b");
        let xc = x.transpose(0, 1).expect("t");
        let (y, _) = batch_norm_train(&xc, &gamma, &beta, 1e-5, true, None).expect("bn");
        // Channel-major view of the batch-major output: channel ch is row ch.
        let ys = y
            .transpose(0, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("vec");
        assert!(ys.contains(&0.0) && ys.iter().any(|&v| v > 0.0));
        assert!(ys.iter().all(|&v| v >= 0.0));
        let grads = y.sum_all().expect("sum").backward().expect("backward");
        // Σ over a channel of (unclipped) outputs has zero gradient wrt β only if
        // nothing is clipped; here some are, so ∂β counts the unclipped values.
        let dbeta = grads
            .get(&beta)
            .expect("dbeta")
            .to_vec1::<f32>()
            .expect("vec");
        let m = 3 * 16;
        for (ch, d) in dbeta.iter().enumerate() {
            let open = ys[ch * m..(ch + 1) * m]
                .iter()
                .filter(|&&v| v > 0.0)
                .count();
            assert_eq!(*d, open as f32, "channel {ch}");
        }
    }

    #[test]
    fn rejects_an_empty_batch_and_a_mismatched_skip() {
        let x = Tensor::zeros((2, 0), candle_core::DType::F32, &Device::Cpu).expect("x");
        let g = Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).expect("g");
        let err = batch_norm_train(&x, &g, &g, 1e-5, false, None).expect_err("empty");
        assert!(err.to_string().contains("empty batch"), "{err}");
        let x = Tensor::ones((2, 3, 4), candle_core::DType::F32, &Device::Cpu).expect("x");
        let skip = Tensor::ones((2, 3, 4), candle_core::DType::F32, &Device::Cpu).expect("skip");
        let err = batch_norm_train(&x, &g, &g, 1e-5, false, Some(&skip)).expect_err("skip");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    /// `∂x` asked for span by span (as the convolutions ask for it: whole rows,
    /// across images; and any span: mid-row starts, a lone value) is the same as
    /// each channel's `∂x` asked for whole, for the three ways `g'` is found: the
    /// ReLU's mask from `x`, from `y` (with a skip), and through a 2×2 max-pool with
    /// a trailing odd row and column.
    #[test]
    fn any_span_of_dx_is_the_whole_channels_values() {
        let (b, c, h, w) = (3, 2, 5, 7);
        let data = |seed| rand(&[c * b * h * w], seed).to_vec1::<f32>().expect("vec");
        let (x, gb) = (data(1), [1.2f32, 0.8, 0.1, -0.2]);
        let m = b * h * w;
        let (bn, _) = BnTrain::from_batch(&x, m, b, 1e-5, true);
        let skip = data(2);
        let y_plain = bn.forward(&x, &gb, None);
        let y_skip = bn.forward(&x, &gb, Some(&skip));
        let (y_pool, at) = bn.forward_pool(&x, &gb, (h, w));
        let g = data(3);
        let g_pool = &g[..y_pool.len()];
        let grads = [
            ("mask from x", bn.grad(&x, &gb, &y_plain, &g, Skip::None)),
            ("mask from y", bn.grad(&x, &gb, &y_skip, &g, Skip::Deferred)),
            (
                "pool",
                bn.grad_pool(&x, &gb[..c], (&y_pool, &at, g_pool), (h, w)),
            ),
        ];
        let spans = [
            (0, m),
            (0, w),
            (w, 3 * w),
            (2 * w, h * w),
            (3, 1),
            (5, 2 * w + 3),
            (h * w - 2, 9),
        ];
        for (name, grad) in &grads {
            assert_eq!(grad.m, m);
            for ch in 0..c {
                let mut whole = vec![f32::NAN; m];
                grad.fill(ch, 0, &mut whole);
                assert!(
                    whole.iter().all(|v| v.is_finite()),
                    "{name}: ch {ch} not all written"
                );
                for (first, len) in spans {
                    let mut part = vec![f32::NAN; len];
                    grad.fill(ch, first, &mut part);
                    assert_eq!(
                        part,
                        whole[first..first + len],
                        "{name}: ch {ch} span {first}+{len}"
                    );
                }
            }
        }
        // Values of the pooled case that no window reaches (the trailing row and
        // column) get g' = 0: a·(0 − ∂β/M − x̂·∂γ/M), nonzero.
        let (_, pool) = &grads[2];
        let mut whole = vec![0f32; m];
        pool.fill(0, 0, &mut whole);
        assert_ne!(whole[h * w - 1], 0.0);
    }
}

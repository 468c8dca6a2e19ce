//! A 3×3 convolution and the training-mode BatchNorm after it (+ residual, + ReLU)
//! as one node of candle's graph.
//!
//! As two nodes, candle's backward gave the convolution's output its own gradient:
//! a zero-filled tensor the size of the output, plus an addition into it, before the
//! convolution's backward could start. Those are the largest tensors of a block (a
//! block's first conv runs before the max-pool). Here the BatchNorm backward hands
//! its input gradient straight to the convolution's kernels, a chunk of output rows
//! at a time while the convolution's backward multiplies it ([`OutGrad::Rows`]):
//! the largest gradient of a block is never written to memory whole.
//!
//! candle's custom ops take at most three arguments, so the weight, γ and β travel
//! as one flat parameter `[W…, γ…, β…]` (a `cat` of the three, whose backward
//! splits the gradient again); the skip input, when there is one, is the third.
//!
//! The same nodes normalise with constants instead of the batch's statistics
//! ([`ConvBnParams::fixed`]): a frozen network's BatchNorm on its running
//! statistics (`only-mask`), and a convolution's bias without BatchNorm (γ = 1,
//! β the bias, μ = 0, 1/σ = 1). The constants follow in the flat parameter,
//! `[W…, γ…, β…, μ…, 1/σ…]`; they get a zero gradient.
//!
//! A block's first conv is followed by a 2×2 max-pool, which the same node takes
//! in ([`conv_bn_pool_train`]): the pool's input, the largest tensor of the block,
//! is then never written at all (`bn_pool.rs`), nor given a zero-filled gradient
//! and an addition in candle's backward. The block's two residual stages are one
//! node as well ([`res_pair_train`]), for the same reason: the tensor between them
//! gets no gradient of its own, and the skip's is added once.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::batchnorm::{BatchStats, BnTrain, Skip};
use super::conv::{CHUNK_FLOATS, Geom, Masked, OutGrad};
use super::{contiguous, with_slice};

/// What the forward computed and the backward needs: the convolution's output
/// (BatchNorm's input) and the normalisation, with the statistics for the caller.
#[derive(Debug)]
struct Saved {
    conv_out: Vec<f32>,
    bn: BnTrain,
    /// The batch's statistics; none with constants.
    stats: Option<BatchStats>,
    /// Where each pooled value's maximum was, when there is a pool.
    argmax: Option<Vec<u8>>,
}

/// One conv → BatchNorm (→ skip, ReLU or pool) on slices: what [`ConvBnTrain`] runs
/// once and [`ResPairTrain`] twice.
#[derive(Debug, Clone, Copy)]
struct Stage {
    pad: usize,
    chunk_floats: usize,
    eps: f64,
    relu: bool,
    /// Whether a 2×2 max-pool follows (then there is no skip).
    pool: bool,
    /// Output channels.
    o: usize,
    /// Whether the flat parameter ends in constant `[μ…, 1/σ…]` to normalise with.
    fixed: bool,
}

impl Stage {
    fn geom(&self, dims: (usize, usize, usize, usize)) -> Result<Geom> {
        Geom::new(dims, self.o, self.pad, self.chunk_floats)
    }

    /// Length of the flat parameter `[W…, γ…, β…(, μ…, 1/σ…)]` for `c` input
    /// channels.
    fn params(&self, c: usize) -> usize {
        self.o * c * 9 + self.per_channel() * self.o
    }

    /// Values per output channel after the weight: γ, β (and μ, 1/σ).
    fn per_channel(&self) -> usize {
        if self.fixed { 4 } else { 2 }
    }

    /// Weight length `O·C·9` of the flat parameter, checked against its length.
    fn weight_len(&self, geom: &Geom, params: usize) -> Result<usize> {
        if params != self.params(geom.c) {
            candle_core::bail!(
                "conv_bn: {params} parameters for a {}→{} conv and its BatchNorm",
                geom.c,
                self.o
            );
        }
        Ok(self.o * geom.k())
    }

    /// The output dims for an input of `geom`.
    fn out_dims(&self, geom: &Geom) -> (usize, usize, usize, usize) {
        let (ho, wo) = if self.pool {
            (geom.ho / 2, geom.wo / 2)
        } else {
            (geom.ho, geom.wo)
        };
        (geom.b, self.o, ho, wo)
    }

    /// The stage's output (batch-major) from `x` of `geom` and its flat parameter.
    fn forward(
        &self,
        geom: &Geom,
        x: &[f32],
        p: &[f32],
        skip: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Saved)> {
        let wl = self.weight_len(geom, p.len())?;
        if skip.is_some_and(|k| k.len() != self.o * geom.b * geom.n()) {
            candle_core::bail!("conv_bn: the skip input does not match the output");
        }
        let conv_out = geom.forward(x, &p[..wl], self.o);
        let (gb, fixed) = p[wl..].split_at(2 * self.o);
        let (bn, stats) = if self.fixed {
            let (mean, invstd) = fixed.split_at(self.o);
            (BnTrain::fixed(mean, invstd, geom.b, self.relu), None)
        } else {
            let m = geom.b * geom.n();
            let (bn, stats) = BnTrain::from_batch(&conv_out, m, geom.b, self.eps, self.relu);
            (bn, Some(stats))
        };
        let (out, argmax) = if self.pool {
            let (pooled, argmax) = bn.forward_pool(&conv_out, gb, (geom.ho, geom.wo));
            (pooled, Some(argmax))
        } else {
            (bn.forward(&conv_out, gb, skip), None)
        };
        let saved = Saved {
            conv_out,
            bn,
            stats,
            argmax,
        };
        Ok((out, saved))
    }

    /// The gradients from the input `x`, the output `y` (pooled, when there is a
    /// pool) and its gradient `g`; `∂x` when `with_dx`, with `then_add` added to it.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        geom: &Geom,
        saved: &Saved,
        x: &[f32],
        p: &[f32],
        (y, g): (&[f32], &[f32]),
        skip: Skip,
        (with_dx, then_add): (bool, Option<Masked>),
    ) -> Result<StageGrads> {
        let wl = self.weight_len(geom, p.len())?;
        let (wt, gb) = (&p[..wl], &p[wl..wl + 2 * self.o]);
        let (bn, conv_out) = (&saved.bn, &saved.conv_out);
        let grad = match &saved.argmax {
            Some(at) => bn.grad_pool(conv_out, &gb[..self.o], (y, at, g), (geom.ho, geom.wo)),
            None => bn.grad(conv_out, gb, y, g, skip),
        };
        // BatchNorm's ∂x (the conv's output gradient) chunk by chunk, as the
        // convolution's backward multiplies it.
        let fill = |ch: usize, first: usize, dst: &mut [f32]| grad.fill(ch, first, dst);
        let (dw, dx) = geom.backward(x, wt, OutGrad::Rows(&fill), self.o, with_dx, then_add);
        // The constants' gradient, zero, completes the flat parameter's.
        let constants = vec![0f32; p.len() - wl - 2 * self.o];
        Ok(StageGrads {
            dx,
            dp: [dw, grad.dgb, constants].concat(),
            dskip: grad.dskip,
        })
    }
}

/// The gradients of one [`Stage`].
struct StageGrads {
    /// Of the input, when asked for.
    dx: Option<Vec<f32>>,
    /// Of the flat parameter.
    dp: Vec<f32>,
    /// Of the skip input, when there is one.
    dskip: Option<Vec<f32>>,
}

/// The values kept by a node for its backward, set by its forward.
type Slot<T> = Arc<Mutex<Option<T>>>;

fn lock<T>(slot: &Slot<T>) -> std::sync::MutexGuard<'_, Option<T>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone)]
struct ConvBnTrain {
    stage: Stage,
    saved: Slot<Saved>,
}

impl ConvBnTrain {
    fn forward(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ps, pl): (&CpuStorage, &Layout),
        skip: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let geom = self.stage.geom(xl.shape().dims4()?)?;
        let (x, p) = (
            contiguous(xs, xl, "conv_bn")?,
            contiguous(ps, pl, "conv_bn")?,
        );
        let (out, saved) = self.stage.forward(&geom, x, p, skip)?;
        *lock(&self.saved) = Some(saved);
        Ok((
            CpuStorage::F32(out),
            Shape::from(self.stage.out_dims(&geom)),
        ))
    }

    /// `(∂x, ∂params, ∂skip)` from the output `y` (pooled, when there is a pool) and
    /// its gradient.
    fn backward(
        &self,
        x: &Tensor,
        params: &Tensor,
        y: &Tensor,
        grad: &Tensor,
        with_skip: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let guard = lock(&self.saved);
        let Some(saved) = guard.as_ref() else {
            candle_core::bail!("conv_bn: backward before forward");
        };
        let geom = self.stage.geom(x.dims4()?)?;
        let track = x.track_op();
        let StageGrads { dx, dp, dskip } = with_slice(x, |xv| {
            with_slice(params, |p| {
                with_slice(y, |y| {
                    with_slice(grad, |g| {
                        let yg = (y, g);
                        let skip = Skip::gradient_if(with_skip);
                        self.stage
                            .backward(&geom, saved, xv, p, yg, skip, (track, None))
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            dx.map(|d| Tensor::from_vec(d, x.shape(), dev))
                .transpose()?,
            Tensor::from_vec(dp, params.shape(), dev)?,
            dskip
                .map(|d| Tensor::from_vec(d, y.shape(), dev))
                .transpose()?,
        ))
    }
}

impl CustomOp2 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "conv_bn_train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((xs, xl), (ps, pl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, _) = self.backward(x, params, res, grad, false)?;
        Ok((dx, Some(dp)))
    }
}

impl CustomOp3 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "conv_bn_add_train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let skip = contiguous(ks, kl, "conv_bn")?;
        self.forward((xs, xl), (ps, pl), Some(skip))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _skip: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, dskip) = self.backward(x, params, res, grad, true)?;
        Ok((dx, Some(dp), dskip))
    }
}

/// What a residual pair keeps: each stage's values and the first one's output.
#[derive(Debug)]
struct PairSaved {
    first: Saved,
    mid: Vec<f32>,
    second: Saved,
}

/// `ReLU(y + BN(conv(ReLU(BN(conv(y))))))`, a block's residual pair, as one node
/// of `(y, [params of the first stage…, params of the second…])`.
#[derive(Debug, Clone)]
struct ResPairTrain {
    stages: [Stage; 2],
    saved: Slot<PairSaved>,
}

impl CustomOp2 for ResPairTrain {
    fn name(&self) -> &'static str {
        "res_pair_train"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [s1, s2] = self.stages;
        let geom = s1.geom(yl.shape().dims4()?)?;
        let (y, p) = (
            contiguous(ys, yl, "res_pair")?,
            contiguous(ps, pl, "res_pair")?,
        );
        let p1 = s1.params(geom.c).min(p.len());
        let (mid, first) = s1.forward(&geom, y, &p[..p1], None)?;
        let (out, second) = s2.forward(&geom, &mid, &p[p1..], Some(y))?;
        *lock(&self.saved) = Some(PairSaved { first, mid, second });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = lock(&self.saved);
        let Some(saved) = guard.as_ref() else {
            candle_core::bail!("res_pair: backward before forward");
        };
        let [s1, s2] = self.stages;
        let geom = s1.geom(y.dims4()?)?;
        let (dy, dp) = with_slice(y, |yv| {
            with_slice(params, |p| {
                with_slice(res, |out| {
                    with_slice(grad, |g| {
                        let p1 = s1.params(geom.c).min(p.len());
                        let (p1, p2) = p.split_at(p1);
                        let (mid, dmid) = (&saved.mid, (out, g));
                        let second = s2.backward(
                            &geom,
                            &saved.second,
                            mid,
                            p2,
                            dmid,
                            Skip::Deferred,
                            (true, None),
                        )?;
                        let dmid = second.dx.unwrap_or_default();
                        let yg = (mid.as_slice(), dmid.as_slice());
                        // The skip connection's gradient, `g` after the second ReLU's
                        // mask, is added to `∂y` image by image as the convolution
                        // completes it: no tensor of its own, no pass of its own.
                        let skip = Masked {
                            y: out,
                            g,
                            relu: s2.relu,
                        };
                        let dx = (true, Some(skip));
                        let first = s1.backward(&geom, &saved.first, yv, p1, yg, Skip::None, dx)?;
                        let dy = first.dx.unwrap_or_default();
                        Ok((dy, [first.dp, second.dp].concat()))
                    })
                })
            })
        })?;
        let dev = y.device();
        Ok((
            Some(Tensor::from_vec(dy, y.shape(), dev)?),
            Some(Tensor::from_vec(dp, params.shape(), dev)?),
        ))
    }
}

/// The weight `[O, C, 3, 3]`, γ and β of one conv + BatchNorm, and the constant
/// statistics it normalises with, if any.
#[derive(Debug, Clone, Copy)]
pub struct ConvBnParams<'a> {
    pub weight: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    /// `(μ, 1/σ)`, each `[O]`: normalise with these instead of the batch's
    /// statistics, which are then neither computed nor differentiated.
    pub fixed: Option<(&'a Tensor, &'a Tensor)>,
}

impl<'a> ConvBnParams<'a> {
    /// Training-mode BatchNorm: the batch's statistics.
    pub fn new(weight: &'a Tensor, gamma: &'a Tensor, beta: &'a Tensor) -> Self {
        ConvBnParams {
            weight,
            gamma,
            beta,
            fixed: None,
        }
    }

    /// Normalising with constant `mean` and `invstd` (1/σ): `γ·(x − μ)/σ + β`.
    pub fn fixed(self, mean: &'a Tensor, invstd: &'a Tensor) -> Self {
        ConvBnParams {
            fixed: Some((mean, invstd)),
            ..self
        }
    }

    /// The flat parameter `[W…, γ…, β…(, μ…, 1/σ…)]`. The constants enter
    /// detached: candle gives them no gradient.
    fn flat(&self) -> Result<Tensor> {
        let weight = self.weight.flatten_all()?;
        match self.fixed {
            None => Tensor::cat(&[&weight, self.gamma, self.beta], 0),
            Some((mean, invstd)) => {
                let (mean, invstd) = (mean.detach(), invstd.detach());
                Tensor::cat(&[&weight, self.gamma, self.beta, &mean, &invstd], 0)
            }
        }
    }

    /// The stage computing this conv + BatchNorm, from what follows it.
    fn stage(&self, pad: usize, eps: f64, after: After, chunk_floats: usize) -> Result<Stage> {
        let o = self.weight.dim(0)?;
        for (what, t) in [("γ", self.gamma), ("β", self.beta)].into_iter().chain(
            self.fixed
                .into_iter()
                .flat_map(|(m, s)| [("μ", m), ("1/σ", s)]),
        ) {
            if t.dims() != [o] {
                candle_core::bail!("conv_bn: {what} {:?} for {o} output channels", t.dims());
            }
        }
        Ok(Stage {
            pad,
            chunk_floats,
            eps,
            relu: after.relu,
            pool: after.pool,
            o,
            fixed: self.fixed.is_some(),
        })
    }
}

/// `ReLU(y + BN(conv3x3(ReLU(BN(conv3x3(y, w1))), w2)))` with padding 1, in training
/// mode on the CPU, as one graph node: a block's residual pair. Returns the output
/// (the shape of `y`) and both BatchNorms' batch statistics. The same values as two
/// [`conv_bn_train`] calls; one node instead of two spares candle's backward the
/// zero-filled gradients (and additions) of the middle tensor and of `y`'s first
/// use.
pub fn res_pair_train(
    y: &Tensor,
    first: ConvBnParams,
    second: ConvBnParams,
    eps: f64,
) -> Result<(Tensor, [Option<BatchStats>; 2])> {
    let c = y.dim(1)?;
    for p in [first, second] {
        if p.weight.dims() != [c, c, 3, 3] {
            candle_core::bail!(
                "res_pair: weight {:?} for input {:?}",
                p.weight.dims(),
                y.dims()
            );
        }
    }
    let after = After {
        relu: true,
        pool: false,
    };
    let stages = [
        first.stage(1, eps, after, CHUNK_FLOATS)?,
        second.stage(1, eps, after, CHUNK_FLOATS)?,
    ];
    let params = Tensor::cat(&[first.flat()?, second.flat()?], 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ResPairTrain {
        stages,
        saved: Arc::clone(&saved),
    };
    let out = y.contiguous()?.apply_op2(&params, op)?;
    let guard = lock(&saved);
    let s = guard
        .as_ref()
        .ok_or_else(|| candle_core::Error::Msg("res_pair: the forward did not run".into()))?;
    Ok((out, [s.first.stats.clone(), s.second.stats.clone()]))
}

/// `BN(conv3x3(x, weight, pad)) (+ skip) (→ ReLU)` in training mode on the CPU:
/// `x: [B, C, H, W]`, `weight: [O, C, 3, 3]`, `skip` batch-major like the output
/// `[B, O, Ho, Wo]`. Returns the output and the batch statistics (for the running
/// averages; none with [`ConvBnParams::fixed`] constants). The same values as
/// [`super::conv3x3_channel_major`] followed by [`super::batch_norm_train`] (or,
/// with constants, by the affine map `γ·(x − μ)/σ + β`), as one graph node.
pub fn conv_bn_train(
    x: &Tensor,
    params: ConvBnParams,
    pad: usize,
    eps: f64,
    relu: bool,
    skip: Option<&Tensor>,
) -> Result<(Tensor, Option<BatchStats>)> {
    let after = After { relu, pool: false };
    conv_bn_chunked(x, params, pad, eps, after, skip, CHUNK_FLOATS)
}

/// `max_pool2x2(ReLU(BN(conv3x3(x, weight, pad))))` in training mode on the CPU, as
/// one graph node: a block's first conv. The same values as [`conv_bn_train`]
/// followed by [`super::max_pool2x2`].
pub fn conv_bn_pool_train(
    x: &Tensor,
    params: ConvBnParams,
    pad: usize,
    eps: f64,
) -> Result<(Tensor, Option<BatchStats>)> {
    let after = After {
        relu: true,
        pool: true,
    };
    conv_bn_chunked(x, params, pad, eps, after, None, CHUNK_FLOATS)
}

/// What follows the BatchNorm in the node.
#[derive(Debug, Clone, Copy)]
struct After {
    relu: bool,
    pool: bool,
}

fn conv_bn_chunked(
    x: &Tensor,
    params: ConvBnParams,
    pad: usize,
    eps: f64,
    after: After,
    skip: Option<&Tensor>,
    chunk_floats: usize,
) -> Result<(Tensor, Option<BatchStats>)> {
    let weight = params.weight;
    let (_, c, kh, kw) = weight.dims4()?;
    if x.dim(1)? != c || (kh, kw) != (3, 3) {
        candle_core::bail!(
            "conv_bn: weight {:?} for input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    if after.pool && skip.is_some() {
        candle_core::bail!("conv_bn: a skip input before a max-pool");
    }
    let op = ConvBnTrain {
        stage: params.stage(pad, eps, after, chunk_floats)?,
        saved: Arc::new(Mutex::new(None)),
    };
    let saved = Arc::clone(&op.saved);
    let flat = params.flat()?;
    let x = x.contiguous()?;
    let y = match skip {
        Some(skip) => x.apply_op3(&flat, &skip.contiguous()?, op)?,
        None => x.apply_op2(&flat, op)?,
    };
    let guard = lock(&saved);
    let stats = guard
        .as_ref()
        .map(|s| s.stats.clone())
        .ok_or_else(|| candle_core::Error::Msg("conv_bn: the forward did not run".into()))?;
    Ok((y, stats))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::ops::test_util::{grads_of, max_diff, rand, rel_diff};
    use crate::ops::{batch_norm_train, conv3x3_channel_major, max_pool2x2};

    /// The fused op against the two ops it replaces: output, statistics, and the
    /// gradients of x, the weight, γ, β and the skip input; one-row chunks and a
    /// real layer shape, with and without skip and ReLU.
    #[test]
    fn matches_conv_then_batch_norm() {
        let full = CHUNK_FLOATS;
        // (pad, C, O, H, W, ReLU, skip, pool, chunk floats)
        for (pad, c, o, h, w, relu, with_skip, pool, chunk) in [
            (1, 3, 4, 6, 5, true, true, false, 1),
            (0, 3, 4, 7, 6, true, false, false, 1),
            (1, 8, 16, 22, 22, false, true, false, full),
            (0, 8, 16, 24, 24, true, false, false, full),
            // Odd pre-pool sizes (a row and a column dropped), with and without ReLU.
            (0, 3, 4, 7, 8, true, false, true, 1),
            (1, 3, 4, 5, 7, false, false, true, 1),
            (0, 8, 16, 24, 24, true, false, true, full),
            // All nine taps (O > 4·C): one chunk across all the images, so
            // BatchNorm's ∂x is asked for in spans that cross images.
            (1, 3, 16, 5, 7, true, false, true, full),
            (1, 3, 16, 6, 5, true, true, false, full),
            (0, 3, 16, 7, 6, true, false, false, full),
            // The last blocks' small images, with a skip, pooled, and 1×1.
            (1, 6, 5, 4, 4, true, true, false, full),
            (0, 6, 5, 4, 4, true, false, true, full),
            (1, 3, 4, 3, 5, false, false, true, full),
            (1, 6, 5, 1, 1, true, false, false, full),
        ] {
            let case =
                format!("pad {pad} {c}→{o} {h}×{w} relu {relu} skip {with_skip} pool {pool}");
            let inputs = Inputs::new((pad, c, o, h, w), with_skip, pool);
            let Inputs {
                x, k, gamma, beta, ..
            } = &inputs;
            let skip = inputs.skip();
            let after = After { relu, pool };
            let params = ConvBnParams::new(k, gamma, beta);
            let (ours, stats) =
                conv_bn_chunked(x, params, pad, 1e-5, after, skip, chunk).expect("ours");
            let stats = stats.expect("batch statistics");
            let yc = conv3x3_channel_major(x, k, pad).expect("conv");
            let (mut theirs, want) =
                batch_norm_train(&yc, gamma, beta, 1e-5, relu, skip).expect("bn");
            if pool {
                theirs = max_pool2x2(&theirs).expect("pool");
            }
            assert_eq!(ours.dims(), theirs.dims(), "{case}");
            assert!(max_diff(&ours, &theirs) < 1e-5, "{case}: output");
            assert_eq!(stats.count, want.count, "{case}");
            for (a, b) in stats
                .mean
                .iter()
                .zip(&want.mean)
                .chain(stats.var.iter().zip(&want.var))
            {
                assert!((a - b).abs() < 1e-5, "{case}: statistics {a} vs {b}");
            }
            inputs.same_gradients(&case, &ours, &theirs);
        }
    }

    /// The inputs of one case of a fused node: x `[5, C, H, W]`, the weight, γ, β,
    /// a skip input, and the gradient to send back from the output.
    struct Inputs {
        x: Var,
        k: Var,
        gamma: Var,
        beta: Var,
        skip: Option<Var>,
        up: Tensor,
    }

    impl Inputs {
        fn new(
            (pad, c, o, h, w): (usize, usize, usize, usize, usize),
            with_skip: bool,
            pool: bool,
        ) -> Self {
            let (ho, wo) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let var = |t: &Tensor| Var::from_tensor(t).expect("var");
            let (uh, uw) = if pool { (ho / 2, wo / 2) } else { (ho, wo) };
            Inputs {
                x: var(&rand(&[5, c, h, w], 1)),
                k: var(&rand(&[o, c, 3, 3], 2)),
                gamma: var(&rand(&[o], 3).affine(1.0, 1.0).expect("gamma")),
                beta: var(&rand(&[o], 4)),
                skip: with_skip.then(|| var(&rand(&[5, o, ho, wo], 5))),
                up: rand(&[5, o, uh, uw], 6),
            }
        }

        fn skip(&self) -> Option<&Tensor> {
            self.skip.as_ref().map(Var::as_tensor)
        }

        /// `ours` and `theirs` send the same gradients back from `up` to x, the
        /// weight, γ, β and the skip input.
        fn same_gradients(&self, case: &str, ours: &Tensor, theirs: &Tensor) {
            let (g1, g2) = (grads_of(ours, &self.up), grads_of(theirs, &self.up));
            let vars = [
                ("x", &self.x),
                ("w", &self.k),
                ("gamma", &self.gamma),
                ("beta", &self.beta),
            ];
            let skip = self.skip.as_ref().map(|s| ("skip", s));
            for (name, v) in vars.into_iter().chain(skip) {
                let d = rel_diff(g1.get(v).expect("ours"), g2.get(v).expect("theirs"));
                assert!(d < 1e-5, "{case}: ∂{name} differs by {d} (relative)");
            }
        }
    }

    /// Windows with tied maxima (three distinct input values, and a weight that
    /// only copies the centre tap, so the conv output ties too): the fused node sends
    /// each window's gradient to the same element as `max_pool2x2` does.
    #[test]
    fn pooled_ties_go_to_the_first_maximum() {
        let (b, c, h, w) = (3, 2, 7, 6);
        // Ties whose first maximum is the top-left, top-right or bottom-left value.
        let data: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * i + i / 7) % 3) as f32)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(data, (b, c, h, w), &Device::Cpu).expect("x"))
            .expect("x");
        let mut centre = vec![0f32; c * c * 9];
        for o in 0..c {
            centre[(o * c + o) * 9 + 4] = 1.0;
        }
        let k = Var::from_tensor(&Tensor::from_vec(centre, (c, c, 3, 3), &Device::Cpu).expect("k"))
            .expect("k");
        let gamma = Var::from_tensor(&rand(&[c], 3).affine(1.0, 1.0).expect("g")).expect("g");
        let beta = Var::from_tensor(&rand(&[c], 4)).expect("b");
        let up = rand(&[b, c, h / 2, w / 2], 6).affine(1.0, 1.0).expect("up");
        let params = ConvBnParams::new(&k, &gamma, &beta);
        let (ours, _) = conv_bn_pool_train(&x, params, 1, 1e-5).expect("ours");
        let (y, _) = conv_bn_train(&x, params, 1, 1e-5, true, None).expect("y");
        let theirs = max_pool2x2(&y).expect("pool");
        assert_eq!(max_diff(&ours, &theirs), 0.0);
        let (g1, g2) = (grads_of(&ours, &up), grads_of(&theirs, &up));
        for (name, v) in [("x", x.as_tensor()), ("gamma", &gamma), ("beta", &beta)] {
            let d = rel_diff(g1.get(v).expect("ours"), g2.get(v).expect("theirs"));
            assert!(d < 1e-5, "∂{name} differs by {d} (relative)");
        }
    }

    /// The residual pair as one node against two conv + BatchNorm nodes: output,
    /// both statistics, and the gradients of y and of all six parameters; with
    /// the batch's statistics and with constants.
    #[test]
    fn residual_pair_matches_two_nodes() {
        // 6 channels on 7×5 (`im2col`), 8 on 10×10 (the direct kernels, where
        // AVX-512 is).
        for (b, c, h, w) in [(4, 6, 7, 5), (4, 8, 10, 10)] {
            residual_pair_case(b, c, h, w, false);
            residual_pair_case(b, c, h, w, true);
        }
    }

    fn residual_pair_case(b: usize, c: usize, h: usize, w: usize, fixed: bool) {
        let y = Var::from_tensor(&rand(&[b, c, h, w], 1)).expect("y");
        let var = |shape: &[usize], seed, shift| {
            Var::from_tensor(&rand(shape, seed).affine(1.0, shift).expect("t")).expect("var")
        };
        let (w1, g1, b1) = (
            var(&[c, c, 3, 3], 2, 0.0),
            var(&[c], 3, 1.0),
            var(&[c], 4, 0.0),
        );
        let (w2, g2, b2) = (
            var(&[c, c, 3, 3], 5, 0.0),
            var(&[c], 6, 1.0),
            var(&[c], 7, 0.0),
        );
        let (mean, invstd) = (rand(&[c], 10), rand(&[c], 11).affine(0.5, 1.0).expect("s"));
        let (mut first, mut second) = (
            ConvBnParams::new(&w1, &g1, &b1),
            ConvBnParams::new(&w2, &g2, &b2),
        );
        if fixed {
            first = first.fixed(&mean, &invstd);
            second = second.fixed(&mean, &invstd);
        }
        let (ours, stats) = res_pair_train(&y, first, second, 1e-5).expect("ours");
        let (r, s1) = conv_bn_train(&y, first, 1, 1e-5, true, None).expect("r");
        let (theirs, s2) = conv_bn_train(&r, second, 1, 1e-5, true, Some(&y)).expect("out");
        assert_eq!(ours.dims(), y.dims());
        assert!(max_diff(&ours, &theirs) < 1e-5, "output");
        assert_eq!(stats, [s1, s2]);
        assert_eq!(stats[0].is_none(), fixed, "statistics");
        let up = rand(&[b, c, h, w], 8);
        let (ga, gb) = (grads_of(&ours, &up), grads_of(&theirs, &up));
        let vars = [
            ("y", y.as_tensor()),
            ("w1", &w1),
            ("gamma1", &g1),
            ("beta1", &b1),
            ("w2", &w2),
            ("gamma2", &g2),
            ("beta2", &b2),
        ];
        for (name, v) in vars {
            let d = rel_diff(ga.get(v).expect("ours"), gb.get(v).expect("theirs"));
            assert!(d < 1e-5, "∂{name} differs by {d} (relative)");
        }
        let wrong = ConvBnParams {
            weight: &var(&[c, c + 1, 3, 3], 9, 0.0),
            ..second
        };
        let e = res_pair_train(&y, first, wrong, 1e-5).expect_err("weight");
        assert!(e.to_string().contains("weight"), "{e}");
    }

    /// With constants ([`ConvBnParams::fixed`]) the node is the convolution
    /// followed by the affine map `γ·(x − μ)·(1/σ) + β` (+ skip, ReLU, pool) in
    /// candle's own ops, in value and in the gradients of x, the weight, γ, β and
    /// the skip; it computes no statistics and gives the constants no gradient.
    #[test]
    fn fixed_statistics_are_an_affine_map_after_the_convolution() {
        // (pad, C, O, H, W, ReLU, skip, pool, chunk floats)
        for (pad, c, o, h, w, relu, with_skip, pool, chunk) in [
            (1, 3, 4, 6, 5, true, true, false, 1),
            (0, 3, 4, 7, 6, false, false, false, 1),
            (0, 3, 4, 7, 8, true, false, true, 1),
            (1, 8, 16, 12, 12, true, false, true, CHUNK_FLOATS),
            (1, 8, 16, 10, 10, true, true, false, CHUNK_FLOATS),
            (1, 3, 16, 5, 7, true, false, false, CHUNK_FLOATS),
        ] {
            let case =
                format!("pad {pad} {c}→{o} {h}×{w} relu {relu} skip {with_skip} pool {pool}");
            let inputs = Inputs::new((pad, c, o, h, w), with_skip, pool);
            let Inputs {
                x, k, gamma, beta, ..
            } = &inputs;
            let skip = inputs.skip();
            let mean = Var::from_tensor(&rand(&[o], 7)).expect("mean");
            let invstd = Var::from_tensor(&rand(&[o], 8).affine(0.5, 1.0).expect("s")).expect("s");
            let params = ConvBnParams::new(k, gamma, beta).fixed(&mean, &invstd);
            let after = After { relu, pool };
            let (ours, stats) =
                conv_bn_chunked(x, params, pad, 1e-5, after, skip, chunk).expect("ours");
            assert!(stats.is_none(), "{case}: statistics of constants");

            let column = |t: &Tensor| t.reshape((1, o, 1, 1)).expect("column");
            let y = crate::ops::conv3x3(x, k, pad).expect("conv");
            let scale = (gamma.as_tensor() * invstd.as_tensor()).expect("scale");
            let y = y
                .broadcast_sub(&column(&mean))
                .and_then(|y| y.broadcast_mul(&column(&scale)))
                .and_then(|y| y.broadcast_add(&column(beta)))
                .expect("affine");
            let y = match skip {
                Some(skip) => (y + skip).expect("skip"),
                None => y,
            };
            let y = if relu { y.relu().expect("relu") } else { y };
            let theirs = if pool {
                max_pool2x2(&y).expect("pool")
            } else {
                y
            };
            assert_eq!(ours.dims(), theirs.dims(), "{case}");
            assert!(max_diff(&ours, &theirs) < 1e-5, "{case}: output");
            inputs.same_gradients(&case, &ours, &theirs);
            let g1 = grads_of(&ours, &inputs.up);
            for (name, v) in [("mean", &mean), ("invstd", &invstd)] {
                assert!(
                    g1.get(v).is_none(),
                    "{case}: a gradient for the constant {name}"
                );
            }
        }
    }

    /// The public pooled entry point is ReLU then pool, and refuses a skip input.
    #[test]
    fn pooled_node_is_relu_then_pool() {
        let x = rand(&[3, 4, 9, 9], 1);
        let k = rand(&[6, 4, 3, 3], 2);
        let (g, b) = (rand(&[6], 3), rand(&[6], 4));
        let params = ConvBnParams::new(&k, &g, &b);
        let (ours, _) = conv_bn_pool_train(&x, params, 1, 1e-5).expect("ours");
        let (y, _) = conv_bn_train(&x, params, 1, 1e-5, true, None).expect("conv_bn");
        let theirs = max_pool2x2(&y).expect("pool");
        assert_eq!(ours.dims(), &[3, 6, 4, 4]);
        assert!(max_diff(&ours, &theirs) < 1e-6);
        let skip = rand(&[3, 6, 9, 9], 5);
        let after = After {
            relu: true,
            pool: true,
        };
        let e = conv_bn_chunked(&x, params, 1, 1e-5, after, Some(&skip), CHUNK_FLOATS)
            .expect_err("skip before a pool");
        assert!(e.to_string().contains("max-pool"), "{e}");
    }

    #[test]
    fn mismatched_parameters_are_errors() {
        let x = rand(&[2, 3, 5, 5], 1);
        let k = rand(&[4, 2, 3, 3], 2);
        let g = rand(&[4], 3);
        let e = conv_bn_train(&x, ConvBnParams::new(&k, &g, &g), 1, 1e-5, true, None)
            .expect_err("channels");
        assert!(e.to_string().contains("weight"), "{e}");
        let k = rand(&[4, 3, 3, 3], 2);
        let short = rand(&[3], 3);
        let e = conv_bn_train(&x, ConvBnParams::new(&k, &short, &g), 1, 1e-5, true, None)
            .expect_err("gamma");
        assert!(e.to_string().contains("γ [3] for 4 output channels"), "{e}");
        let fixed = ConvBnParams::new(&k, &g, &g).fixed(&g, &short);
        let e = conv_bn_train(&x, fixed, 1, 1e-5, true, None).expect_err("invstd");
        assert!(e.to_string().contains("1/σ [3]"), "{e}");
    }
}

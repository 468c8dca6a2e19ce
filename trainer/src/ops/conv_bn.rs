//! A 3×3 convolution and the training-mode BatchNorm after it (+ residual, + ReLU)
//! as one node of candle's graph.
//!
//! As two nodes, candle's backward gave the convolution's output its own gradient:
//! a zero-filled tensor the size of the output, plus an addition into it, before the
//! convolution's backward could start. Those are the largest tensors of a block (a
//! block's first conv runs before the max-pool). Here the BatchNorm backward hands
//! its input gradient straight to the convolution's kernels.
//!
//! candle's custom ops take at most three arguments, so the weight, γ and β travel
//! as one flat parameter `[W…, γ…, β…]` (a `cat` of the three, whose backward
//! splits the gradient again); the skip input, when there is one, is the third.
//!
//! A block's first conv is followed by a 2×2 max-pool, which the same node takes
//! in ([`conv_bn_pool_train`]): the pool's input, the largest tensor of the block,
//! is then never written at all (`bn_pool.rs`), nor given a zero-filled gradient
//! and an addition in candle's backward.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::batchnorm::{BatchStats, BnTrain};
use super::conv::{CHUNK_FLOATS, Geom};
use super::{contiguous, with_slice};

/// What the forward computed and the backward needs: the convolution's output
/// (BatchNorm's input) and the normalisation, with the statistics for the caller.
#[derive(Debug)]
struct Saved {
    conv_out: Vec<f32>,
    bn: BnTrain,
    stats: BatchStats,
    /// Where each pooled value's maximum was, when there is a pool.
    argmax: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct ConvBnTrain {
    pad: usize,
    chunk_floats: usize,
    eps: f64,
    relu: bool,
    /// Whether a 2×2 max-pool follows (then there is no skip).
    pool: bool,
    /// Output channels.
    o: usize,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl ConvBnTrain {
    fn geom(&self, l: &Layout) -> Result<Geom> {
        Geom::new(l.shape().dims4()?, self.pad, self.chunk_floats)
    }

    /// Weight length `O·C·9` of the flat parameter, checked against its length.
    fn weight_len(&self, geom: &Geom, params: usize) -> Result<usize> {
        let wl = self.o * geom.k();
        if params != wl + 2 * self.o {
            candle_core::bail!(
                "conv_bn: {params} parameters for a {}→{} conv and its BatchNorm",
                geom.c,
                self.o
            );
        }
        Ok(wl)
    }

    fn forward(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ps, pl): (&CpuStorage, &Layout),
        skip: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let geom = self.geom(xl)?;
        let (x, p) = (
            contiguous(xs, xl, "conv_bn")?,
            contiguous(ps, pl, "conv_bn")?,
        );
        let wl = self.weight_len(&geom, p.len())?;
        let out = self.o * geom.b * geom.n();
        if skip.is_some_and(|k| k.len() != out) {
            candle_core::bail!("conv_bn: the skip input does not match the output");
        }
        let conv_out = geom.forward(x, &p[..wl], self.o);
        let (bn, stats) =
            BnTrain::from_batch(&conv_out, geom.b * geom.n(), geom.b, self.eps, self.relu);
        let (out, shape, argmax) = if self.pool {
            let (pooled, argmax) = bn.forward_pool(&conv_out, &p[wl..], (geom.ho, geom.wo));
            let shape = Shape::from((geom.b, self.o, geom.ho / 2, geom.wo / 2));
            (pooled, shape, Some(argmax))
        } else {
            let y = bn.forward(&conv_out, &p[wl..], skip);
            (y, Shape::from((geom.b, self.o, geom.ho, geom.wo)), None)
        };
        let saved = Saved {
            conv_out,
            bn,
            stats,
            argmax,
        };
        *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(saved);
        Ok((CpuStorage::F32(out), shape))
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
        let guard = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(saved) = guard.as_ref() else {
            candle_core::bail!("conv_bn: backward before forward");
        };
        let (b, c, h, w) = x.dims4()?;
        let geom = Geom::new((b, c, h, w), self.pad, self.chunk_floats)?;
        let wl = self.weight_len(&geom, params.elem_count())?;
        let track = x.track_op();
        let (dx, dp, dskip) = with_slice(params, |p| {
            let (wt, gamma) = (&p[..wl], &p[wl..wl + self.o]);
            let (dyc, dgb, dskip) = with_slice(y, |y| {
                with_slice(grad, |g| {
                    let (bn, x) = (&saved.bn, &saved.conv_out);
                    Ok(match &saved.argmax {
                        Some(at) => {
                            let (dx, dgb) =
                                bn.backward_pool(x, gamma, (y, at, g), (geom.ho, geom.wo));
                            (dx, dgb, None)
                        }
                        None => bn.backward_slices(x, gamma, y, g, with_skip),
                    })
                })
            })?;
            let (dw, dx) = with_slice(x, |x| Ok(geom.backward(x, wt, &dyc, self.o, track)))?;
            Ok((dx, [dw, dgb].concat(), dskip))
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

/// `BN(conv3x3(x, weight, pad)) (+ skip) (→ ReLU)` in training mode on the CPU:
/// `x: [B, C, H, W]`, `weight: [O, C, 3, 3]`, `skip` batch-major like the output
/// `[B, O, Ho, Wo]`. Returns the output and the batch statistics (for the running
/// averages). The same values as [`super::conv3x3_channel_major`] followed by
/// [`super::batch_norm_train`], as one graph node.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train(
    x: &Tensor,
    weight: &Tensor,
    pad: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
    skip: Option<&Tensor>,
) -> Result<(Tensor, BatchStats)> {
    let after = After { relu, pool: false };
    conv_bn_chunked(x, weight, pad, gamma, beta, eps, after, skip, CHUNK_FLOATS)
}

/// `max_pool2x2(ReLU(BN(conv3x3(x, weight, pad))))` in training mode on the CPU, as
/// one graph node: a block's first conv. The same values as [`conv_bn_train`]
/// followed by [`super::max_pool2x2`].
pub fn conv_bn_pool_train(
    x: &Tensor,
    weight: &Tensor,
    pad: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let after = After {
        relu: true,
        pool: true,
    };
    conv_bn_chunked(x, weight, pad, gamma, beta, eps, after, None, CHUNK_FLOATS)
}

/// What follows the BatchNorm in the node.
#[derive(Debug, Clone, Copy)]
struct After {
    relu: bool,
    pool: bool,
}

#[allow(clippy::too_many_arguments)]
fn conv_bn_chunked(
    x: &Tensor,
    weight: &Tensor,
    pad: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    after: After,
    skip: Option<&Tensor>,
    chunk_floats: usize,
) -> Result<(Tensor, BatchStats)> {
    let (o, c, kh, kw) = weight.dims4()?;
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
    let params = Tensor::cat(&[&weight.flatten_all()?, gamma, beta], 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnTrain {
        pad,
        chunk_floats,
        eps,
        relu: after.relu,
        pool: after.pool,
        o,
        saved: Arc::clone(&saved),
    };
    let x = x.contiguous()?;
    let y = match skip {
        Some(skip) => x.apply_op3(&params, &skip.contiguous()?, op)?,
        None => x.apply_op2(&params, op)?,
    };
    let guard = saved.lock().unwrap_or_else(PoisonError::into_inner);
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
        ] {
            let case =
                format!("pad {pad} {c}→{o} {h}×{w} relu {relu} skip {with_skip} pool {pool}");
            let (ho, wo) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let x = Var::from_tensor(&rand(&[5, c, h, w], 1)).expect("x");
            let k = Var::from_tensor(&rand(&[o, c, 3, 3], 2)).expect("k");
            let gamma = Var::from_tensor(&rand(&[o], 3).affine(1.0, 1.0).expect("g")).expect("g");
            let beta = Var::from_tensor(&rand(&[o], 4)).expect("b");
            let skip = Var::from_tensor(&rand(&[5, o, ho, wo], 5)).expect("skip");
            let skip = with_skip.then_some(skip.as_tensor());
            let up = if pool {
                rand(&[5, o, ho / 2, wo / 2], 6)
            } else {
                rand(&[5, o, ho, wo], 6)
            };

            let after = After { relu, pool };
            let (ours, stats) =
                conv_bn_chunked(&x, &k, pad, &gamma, &beta, 1e-5, after, skip, chunk)
                    .expect("ours");
            let yc = conv3x3_channel_major(&x, &k, pad).expect("conv");
            let (mut theirs, want) =
                batch_norm_train(&yc, &gamma, &beta, 1e-5, relu, skip).expect("bn");
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

            let (g1, g2) = (grads_of(&ours, &up), grads_of(&theirs, &up));
            let mut vars = vec![
                ("x", x.as_tensor()),
                ("w", &k),
                ("gamma", &gamma),
                ("beta", &beta),
            ];
            if let Some(skip) = skip {
                vars.push(("skip", skip));
            }
            for (name, v) in vars {
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
        let (ours, _) = conv_bn_pool_train(&x, &k, 1, &gamma, &beta, 1e-5).expect("ours");
        let (y, _) = conv_bn_train(&x, &k, 1, &gamma, &beta, 1e-5, true, None).expect("y");
        let theirs = max_pool2x2(&y).expect("pool");
        assert_eq!(max_diff(&ours, &theirs), 0.0);
        let (g1, g2) = (grads_of(&ours, &up), grads_of(&theirs, &up));
        for (name, v) in [("x", x.as_tensor()), ("gamma", &gamma), ("beta", &beta)] {
            let d = rel_diff(g1.get(v).expect("ours"), g2.get(v).expect("theirs"));
            assert!(d < 1e-5, "∂{name} differs by {d} (relative)");
        }
    }

    /// The public pooled entry point is ReLU then pool, and refuses a skip input.
    #[test]
    fn pooled_node_is_relu_then_pool() {
        let x = rand(&[3, 4, 9, 9], 1);
        let k = rand(&[6, 4, 3, 3], 2);
        let (g, b) = (rand(&[6], 3), rand(&[6], 4));
        let (ours, _) = conv_bn_pool_train(&x, &k, 1, &g, &b, 1e-5).expect("ours");
        let (y, _) = conv_bn_train(&x, &k, 1, &g, &b, 1e-5, true, None).expect("conv_bn");
        let theirs = max_pool2x2(&y).expect("pool");
        assert_eq!(ours.dims(), &[3, 6, 4, 4]);
        assert!(max_diff(&ours, &theirs) < 1e-6);
        let skip = rand(&[3, 6, 9, 9], 5);
        let after = After {
            relu: true,
            pool: true,
        };
        let e = conv_bn_chunked(&x, &k, 1, &g, &b, 1e-5, after, Some(&skip), CHUNK_FLOATS)
            .expect_err("skip before a pool");
        assert!(e.to_string().contains("max-pool"), "{e}");
    }

    #[test]
    fn mismatched_parameters_are_errors() {
        let x = rand(&[2, 3, 5, 5], 1);
        let k = rand(&[4, 2, 3, 3], 2);
        let g = rand(&[4], 3);
        let e = conv_bn_train(&x, &k, 1, &g, &g, 1e-5, true, None).expect_err("channels");
        assert!(e.to_string().contains("weight"), "{e}");
        let k = rand(&[4, 3, 3, 3], 2);
        let e = conv_bn_train(&x, &k, 1, &rand(&[3], 3), &g, 1e-5, true, None).expect_err("gamma");
        assert!(e.to_string().contains("parameters"), "{e}");
    }
}

//! 3×3 stride-1 convolution as `im2col` + matmul, with `col2im` as the backward.
//!
//! `im2col` turns `x: [B, C, H, W]` into `cols: [C·9, B·Ho·Wo]` where row
//! `c·9 + ky·3 + kx`, column `b·Ho·Wo + oy·Wo + ox` holds `x[b, c, oy+ky−p, ox+kx−p]`
//! (0 outside). Then `conv(x, w) = w.reshape(O, C·9) · cols`, one GEMM for the whole
//! batch, whose gradients are two GEMMs (the weight gradient sums over the batch
//! inside the GEMM, with no per-sample `[B, O, C·9]` to reduce), and `∂cols → ∂x`
//! is `col2im`, the scatter-add of the same indexing.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous;

/// Unfolds 3×3 patches (stride 1, zero padding `pad`).
#[derive(Debug, Clone, Copy)]
pub struct Im2Col {
    pub pad: usize,
}

/// The adjoint of [`Im2Col`]: folds `[C·9, B·Ho·Wo]` back into `[B, C, H, W]`,
/// summing overlapping contributions.
#[derive(Debug, Clone, Copy)]
pub struct Col2Im {
    pub pad: usize,
    pub b: usize,
    pub h: usize,
    pub w: usize,
}

fn out_size(n: usize, pad: usize) -> Result<usize> {
    (n + 2 * pad)
        .checked_sub(2)
        .filter(|&o| o > 0)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("3×3 conv on a {n}-pixel side with padding {pad}"))
        })
}

fn zero(line: &mut [MaybeUninit<f32>]) {
    for e in line {
        e.write(0.0);
    }
}

/// The columns `[lo, hi)` of an output row that read inside the input for tap `k`.
fn valid_cols(k: usize, pad: usize, w: usize, wo: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(k);
    let hi = wo.min((w + pad).saturating_sub(k));
    (lo, hi.max(lo))
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = contiguous(s, l, "im2col")?;
        let p = self.pad;
        let (ho, wo) = (out_size(h, p)?, out_size(w, p)?);
        let n = ho * wo;
        let total = c * 9 * b * n;
        if total == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((c * 9, b * n))));
        }
        // Written in place without zero-filling first (the zero fill was 6% of a tiny
        // training step): every element below is written once, padding included.
        let mut out: Vec<f32> = Vec::with_capacity(total);
        // One output row per (channel, tap); within it one segment per image.
        out.spare_capacity_mut()[..total]
            .par_chunks_mut(b * n)
            .enumerate()
            .for_each(|(r, row)| {
                let (ch, ky, kx) = (r / 9, r % 9 / 3, r % 3);
                let (lo, hi) = valid_cols(kx, p, w, wo);
                for (bi, seg) in row.chunks_mut(n).enumerate() {
                    let src = &x[(bi * c + ch) * h * w..(bi * c + ch + 1) * h * w];
                    for (oy, line) in seg.chunks_mut(wo).enumerate() {
                        match (oy + ky).checked_sub(p).filter(|&iy| iy < h) {
                            None => zero(line),
                            Some(iy) => {
                                let s0 = iy * w + lo + kx - p;
                                zero(&mut line[..lo]);
                                line[lo..hi].write_copy_of_slice(&src[s0..s0 + hi - lo]);
                                zero(&mut line[hi..]);
                            }
                        };
                    }
                }
            });
        // SAFETY: `total` ≤ capacity (reserved above), and the loop wrote every element
        // of `spare_capacity_mut()[..total]`: c·9 rows of b·n, each segment in lines
        // of `wo`, each line in full (zeros, the copied span, zeros).
        #[allow(unsafe_code)]
        unsafe {
            out.set_len(total)
        };
        Ok((CpuStorage::F32(out), Shape::from((c * 9, b * n))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, _, h, w) = arg.dims4()?;
        let g = grad.contiguous()?.apply_op1_no_bwd(&Col2Im {
            pad: self.pad,
            b,
            h,
            w,
        })?;
        Ok(Some(g))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (c9, bn) = l.shape().dims2()?;
        let cols = contiguous(s, l, "col2im")?;
        let (b, h, w, p) = (self.b, self.h, self.w, self.pad);
        let (ho, wo) = (out_size(h, p)?, out_size(w, p)?);
        let n = ho * wo;
        if c9 % 9 != 0 || bn != b * n {
            candle_core::bail!(
                "col2im: {:?} does not match {b} inputs of {h}×{w}",
                l.shape()
            );
        }
        let c = c9 / 9;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(bc, dst)| {
            let (bi, ch) = (bc / c, bc % c);
            for ky in 0..3 {
                for kx in 0..3 {
                    let r = ch * 9 + ky * 3 + kx;
                    let row = &cols[r * bn + bi * n..r * bn + (bi + 1) * n];
                    let (lo, hi) = valid_cols(kx, p, w, wo);
                    for oy in 0..ho {
                        let Some(iy) = (oy + ky).checked_sub(p).filter(|&iy| iy < h) else {
                            continue;
                        };
                        let d0 = iy * w + lo + kx - p;
                        let src = &row[oy * wo + lo..oy * wo + hi];
                        for (d, s) in dst[d0..d0 + hi - lo].iter_mut().zip(src) {
                            *d += s;
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }
}

/// The convolution as one node of candle's graph.
///
/// Its arguments are `x`, the weight and the already computed output `W · cols`
/// (from detached tensors, so the GEMM and its reshapes record nothing); forward
/// hands that output on, backward computes `∂W = g · colsᵀ` and
/// `∂x = col2im(Wᵀ · g)` with candle's GEMM. Built from separate ops, candle's
/// backward also zero-fills and accumulates a gradient for every intermediate: the
/// 9×-larger `cols`, and the output's reshape and transpose.
///
/// `cols` is recomputed in the backward rather than kept from the forward: kept,
/// the columns of every convolution live until the backward (7.5 GB of a 17.9 GB
/// peak at the paper's 150×150 with 96 images), and redoing `im2col` is a copy,
/// small beside the two GEMMs.
///
/// Off the CPU (`generic`), the output is candle's own `conv2d` (im2col + cuBLAS on
/// CUDA) in batch-major `[B, O, Ho, Wo]`, and the backward is built from candle's
/// tensor ops, so it runs on any device: `∂W = g · colsᵀ` with `cols` gathered as
/// nine shifted views ([`im2col_ops`]), and `∂x` as a 3×3 convolution of `g` with
/// the flipped, transposed weight. candle's own conv2d backward computes `∂W` as a
/// convolution whose kernel is the whole gradient image (40 GB of GPU memory for
/// 24 images at 150×150) and `∂x` with a direct transposed-convolution kernel.
#[derive(Debug)]
struct Conv3x3 {
    pad: usize,
    generic: bool,
}

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _w: &CpuStorage,
        _lw: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = contiguous(y, ly, "conv3x3")?.to_vec();
        Ok((CpuStorage::F32(out), ly.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _lx: &Layout,
        _w: &candle_core::CudaStorage,
        _lw: &Layout,
        y: &candle_core::CudaStorage,
        ly: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if !ly.is_contiguous() || ly.start_offset() != 0 {
            candle_core::bail!("conv3x3: the output must be a fresh contiguous tensor");
        }
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.generic {
            return conv3x3_generic_bwd(x, weight, grad, self.pad);
        }
        let (b, _, h, w) = x.dims4()?;
        if b == 0 {
            candle_core::bail!("conv3x3: empty batch");
        }
        let o = weight.dim(0)?;
        let pad = self.pad;
        // The network's input needs no gradient: skip a third of conv1's backward.
        let track = x.track_op();
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let wt = weight.flatten_from(1)?.t()?;
        // One group of images per thread, each with its own columns and GEMMs. As one
        // GEMM, `∂W = g · colsᵀ` sums over the long side (B·Ho·Wo), which `gemm` never
        // splits between threads, and packs `cols` on one thread first; per group,
        // the threads work side by side and only the small `[O, C·9]` results are
        // added. A group's columns are also all that is held at once.
        let parts = image_groups(b)
            .par_iter()
            .map(|&(start, n)| {
                let g = grad.narrow(1, start, n)?.contiguous()?.reshape((o, ()))?;
                let cols = x.narrow(0, start, n)?.apply_op1_no_bwd(&Im2Col { pad })?;
                let dw = g.matmul(&cols.t()?)?;
                drop(cols);
                let dx = if track {
                    let dcols = wt.matmul(&g)?;
                    Some(dcols.apply_op1_no_bwd(&Col2Im { pad, b: n, h, w })?)
                } else {
                    None
                };
                Ok((dw, dx))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut dw = parts[0].0.clone();
        for (part, _) in &parts[1..] {
            dw = (dw + part)?;
        }
        let dw = dw.reshape(weight.shape())?;
        let dx = if track {
            let dxs: Vec<&Tensor> = parts.iter().filter_map(|(_, dx)| dx.as_ref()).collect();
            Some(Tensor::cat(&dxs, 0)?)
        } else {
            None
        };
        Ok((dx, Some(dw), None))
    }
}

/// `x: [B, C, H, W]` convolved with `weight: [O, C, 3, 3]` (stride 1, zero padding
/// `pad`), no bias, returned channel-major: `[O, B, Ho, Wo]` (what BatchNorm
/// consumes). On CPU this is `im2col` and one GEMM for the whole batch, one node of
/// the graph; elsewhere candle's `conv2d`.
pub fn conv3x3_channel_major(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    if !super::cpu_kernels(x) {
        return conv3x3_generic(x, weight, pad)?.transpose(0, 1);
    }
    let (b, _, h, w) = x.dims4()?;
    let o = weight.dim(0)?;
    let (ho, wo) = (out_size(h, pad)?, out_size(w, pad)?);
    let (x, wm) = (x.contiguous()?, weight.detach().flatten_from(1)?);
    // The same image groups as the backward: their columns are the same size, so
    // the allocator reuses one group's buffer in both directions (whole-batch
    // columns here beside per-group ones there made it map fresh pages every step:
    // paper@150's forward 4.4 → 6.0 s, +1.3 GB).
    let ys = image_groups(b)
        .par_iter()
        .map(|&(start, n)| {
            let cols = x.narrow(0, start, n)?.apply_op1_no_bwd(&Im2Col { pad })?;
            wm.matmul(&cols)?.reshape((o, n, ho, wo))
        })
        .collect::<Result<Vec<_>>>()?;
    // One group (one thread) is handed on as is: `cat` of one tensor copies nothing.
    let y = Tensor::cat(&ys, 1)?;
    x.apply_op3(
        weight,
        &y,
        Conv3x3 {
            pad,
            generic: false,
        },
    )
}

/// `(start, count)` of one group of images per rayon thread (fewer when `b` is small).
fn image_groups(b: usize) -> Vec<(usize, usize)> {
    let per = b.div_ceil(rayon::current_num_threads().max(1)).max(1);
    (0..b).step_by(per).map(|s| (s, per.min(b - s))).collect()
}

/// The convolution on any device, batch-major `[B, O, Ho, Wo]`: candle's `conv2d`
/// forward with the backward of [`Conv3x3`]'s `generic` mode. What CUDA runs.
pub fn conv3x3_generic(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    if pad > 2 {
        candle_core::bail!("conv3x3: padding {pad} (at most 2)");
    }
    let y = x.detach().conv2d(&weight.detach(), pad, 1, 1, 1)?;
    x.apply_op3(weight, &y, Conv3x3 { pad, generic: true })
}

/// `[C·9, B·Ho·Wo]` columns of [`Im2Col`]'s layout from candle's tensor ops: the nine
/// shifted views of the zero-padded input, stacked.
fn im2col_ops(x: &Tensor, pad: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (out_size(h, pad)?, out_size(w, pad)?);
    let xp = x
        .pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?
        .transpose(0, 1)?;
    let taps = (0..9)
        .map(|t| xp.narrow(2, t / 3, ho)?.narrow(3, t % 3, wo))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&taps, 1)?.reshape((c * 9, b * ho * wo))
}

fn conv3x3_generic_bwd(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    pad: usize,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let o = weight.dim(0)?;
    let g = grad.contiguous()?;
    let gc = g.transpose(0, 1)?.contiguous()?.reshape((o, ()))?;
    let dw = gc
        .matmul(&im2col_ops(x, pad)?.t()?)?
        .reshape(weight.shape())?;
    let dx = if x.track_op() {
        // ∂x[c, y, x] = Σ_{o,i,j} W[o, c, i, j] · g[o, y+p−i, x+p−j]: a convolution of g
        // (padded by 2 − p) with W flipped in space, input and output channels swapped.
        let rev = Tensor::new(&[2u32, 1, 0], weight.device())?;
        let wf = weight
            .index_select(&rev, 2)?
            .index_select(&rev, 3)?
            .transpose(0, 1)?
            .contiguous()?;
        Some(g.conv2d(&wf, 2 - pad, 1, 1, 1)?)
    } else {
        None
    };
    Ok((dx, Some(dw), None))
}

/// [`conv3x3_channel_major`] as `[B, O, Ho, Wo]` (a transposed view on CPU).
pub fn conv3x3(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    conv3x3_channel_major(x, weight, pad)?.transpose(0, 1)
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::ops::test_util::{max_diff, rand};

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        // The CPU kernels, and the generic path CUDA runs (here on the CPU).
        type Conv = fn(&Tensor, &Tensor, usize) -> Result<Tensor>;
        let convs: [(&str, Conv); 2] = [("cpu", conv3x3), ("generic", conv3x3_generic)];
        for ((name, conv), (pad, h, w)) in convs
            .into_iter()
            .flat_map(|c| [(0, 7, 9), (1, 5, 6), (1, 3, 3), (0, 3, 4)].map(|s| (c, s)))
        {
            let x = Var::from_tensor(&rand(&[2, 3, h, w], 1)).expect("x");
            let k = Var::from_tensor(&rand(&[4, 3, 3, 3], 2)).expect("k");
            let up = rand(&[2, 4, h + 2 * pad - 2, w + 2 * pad - 2], 3);

            let ours = conv(&x, &k, pad).expect("ours");
            let theirs = x.conv2d(&k, pad, 1, 1, 1).expect("candle");
            let d = max_diff(&ours, &theirs);
            assert!(d < 1e-5, "{name}: forward pad {pad} {h}×{w}: max diff {d}");

            let g1 = (ours * &up)
                .expect("mul")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("bwd");
            let g2 = (theirs * &up)
                .expect("mul")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("bwd");
            for v in [&x, &k] {
                let (a, b) = (g1.get(v).expect("g1"), g2.get(v).expect("g2"));
                let d = max_diff(a, b);
                assert!(d < 1e-4, "{name}: gradient pad {pad} {h}×{w}: max diff {d}");
            }

            // An input that is not tracked (the network's images) gets no gradient;
            // the weight's is unchanged.
            let plain = x.as_tensor().detach();
            let g3 = (conv(&plain, &k, pad).expect("ours") * &up)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            assert!(g3.get(&plain).is_none());
            let d = max_diff(g3.get(&k).expect("g3"), g2.get(&k).expect("g2"));
            assert!(
                d < 1e-4,
                "{name}: weight gradient, untracked input: max diff {d}"
            );
        }
    }
}

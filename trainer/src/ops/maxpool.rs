//! 2×2 stride-2 max-pool with floor semantics and an exact backward.
//!
//! Output `[B, C, ⌊H/2⌋, ⌊W/2⌋]`; a trailing odd row or column is dropped, as in the
//! paper's network (35 → 16 → 7 at block4/5 of the 150×150 spec). The gradient goes
//! to the first maximum of each window.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous;

#[derive(Debug, Clone, Copy)]
struct MaxPool;

/// The backward from `(x, pooled, g)`: the gradient of each window goes to its first
/// element equal to the pooled maximum, which is its first maximum (ties, common in
/// the synthetic images' flat regions, go to one element, as in the generic path).
#[derive(Debug, Clone, Copy)]
struct MaxPoolBackward;

/// Rows `2·oy` and `2·oy + 1` of a plane, cut to the `2·wo` columns that windows cover.
fn window_rows(plane: &[f32], w: usize, wo: usize, oy: usize) -> (&[f32], &[f32]) {
    let top = 2 * oy * w;
    (&plane[top..top + 2 * wo], &plane[top + w..top + w + 2 * wo])
}

/// The 2×2 max-pool of `x: [B, C, H, W]` (contiguous): `[B, C, ⌊H/2⌋, ⌊W/2⌋]`.
fn pool(x: &[f32], (b, c, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![0f32; b * c * ho * wo];
    if ho * wo > 0 {
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(bc, dst)| {
                let plane = &x[bc * h * w..(bc + 1) * h * w];
                for (oy, line) in dst.chunks_exact_mut(wo).enumerate() {
                    let (r0, r1) = window_rows(plane, w, wo, oy);
                    // Branch-free (the comparisons of a first-argmax do not
                    // vectorise); the value is the same.
                    for ((d, a), b) in line
                        .iter_mut()
                        .zip(r0.chunks_exact(2))
                        .zip(r1.chunks_exact(2))
                    {
                        *d = a[0].max(a[1]).max(b[0].max(b[1]));
                    }
                }
            });
    }
    out
}

/// The gradient of [`pool`] with respect to `x: [B, C, H, W]`, from the pooled
/// output `m` and its gradient `g`: each window's gradient goes to its first element
/// equal to the maximum.
fn unpool(x: &[f32], m: &[f32], g: &[f32], (b, c, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![0f32; b * c * h * w];
    if ho * wo > 0 {
        out.par_chunks_mut(h * w).enumerate().for_each(|(bc, dst)| {
            let plane = &x[bc * h * w..(bc + 1) * h * w];
            let (mp, gp) = (&m[bc * ho * wo..], &g[bc * ho * wo..]);
            for oy in 0..ho {
                let (r0, r1) = window_rows(plane, w, wo, oy);
                let (d0, d1) = dst[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
                let (ms, gs) = (&mp[oy * wo..(oy + 1) * wo], &gp[oy * wo..(oy + 1) * wo]);
                let windows = r0.chunks_exact(2).zip(r1.chunks_exact(2));
                let outs = d0.chunks_exact_mut(2).zip(d1.chunks_exact_mut(2));
                for ((((a, b), (da, db)), &mx), &gv) in windows.zip(outs).zip(ms).zip(gs) {
                    let e0 = a[0] == mx;
                    let e1 = !e0 && a[1] == mx;
                    let e2 = !(e0 || e1) && b[0] == mx;
                    let e3 = !(e0 || e1 || e2);
                    da[0] = if e0 { gv } else { 0.0 };
                    da[1] = if e1 { gv } else { 0.0 };
                    db[0] = if e2 { gv } else { 0.0 };
                    db[1] = if e3 { gv } else { 0.0 };
                }
            }
        });
    }
    out
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let out = pool(contiguous(s, l, "max_pool2x2")?, dims);
        let (b, c, h, w) = dims;
        Ok((CpuStorage::F32(out), Shape::from((b, c, h / 2, w / 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let out = cuda::launch(
            "max_pool2x2",
            (b, c, h, w),
            b * c * (h / 2) * (w / 2),
            &[(s, l)],
        )?;
        Ok((out, Shape::from((b, c, h / 2, w / 2))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = arg.apply_op3_no_bwd(res, &grad.contiguous()?, &MaxPoolBackward)?;
        Ok(Some(g))
    }
}

impl CustomOp3 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max_pool2x2_backward"
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
        let x = contiguous(s1, l1, "max_pool2x2")?;
        let m = contiguous(s2, l2, "max_pool2x2")?;
        let g = contiguous(s3, l3, "max_pool2x2")?;
        let out = unpool(x, m, g, l1.shape().dims4()?);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let n = l1.shape().elem_count();
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let out = cuda::launch("max_pool2x2_backward", dims, n, &inputs)?;
        Ok((out, l1.shape().clone()))
    }
}

/// The kernels of `maxpool.cu` (compiled to PTX by `build.rs`).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/maxpool.ptx"));

    /// Runs kernel `name` over `(b, c, h, w)` planes: its arguments are the f32 data
    /// of `inputs` (contiguous), a fresh output of `len` floats that it writes in
    /// full, then the plane count, `h` and `w`.
    pub(super) fn launch(
        name: &str,
        (b, c, h, w): (usize, usize, usize, usize),
        len: usize,
        inputs: &[(&CudaStorage, &Layout)],
    ) -> Result<CudaStorage> {
        let Some(&(first, _)) = inputs.first() else {
            candle_core::bail!("{name}: no inputs");
        };
        // Counts below 2³¹: the kernels' 32-bit grid-stride loops cannot wrap.
        let dims = |n: usize| {
            u32::try_from(n)
                .ok()
                .filter(|&v| v < 1 << 31)
                .ok_or_else(|| candle_core::Error::Msg(format!("{name}: {n} is too large")))
        };
        let (planes, h32, w32, n32) = (dims(b * c)?, dims(h)?, dims(w)?, dims(len)?);
        if n32 == 0 {
            // cudarc cannot allocate 0 floats.
            candle_core::bail!("{name}: an empty result from [{b}, {c}, {h}, {w}] on CUDA");
        }
        let dev = &first.device;
        let views = inputs
            .iter()
            .map(|(s, l)| {
                let (a, z) = l.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg(format!("{name}: a non-contiguous input"))
                })?;
                Ok(s.as_cuda_slice::<f32>()?.slice(a..z))
            })
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: the kernel writes every one of the `len` floats.
        #[allow(unsafe_code)]
        let out = unsafe { dev.alloc::<f32>(len)? };
        let func = dev.get_or_load_custom_func(name, "modkit_maxpool", PTX)?;
        let mut args = func.builder();
        for v in &views {
            args.arg(v);
        }
        args.arg(&out);
        args.arg(&planes);
        args.arg(&h32);
        args.arg(&w32);
        // Grid-stride loops: a grid of at most 64K blocks covers any size.
        let mut cfg = LaunchConfig::for_num_elems(n32);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(65_536);
        // SAFETY: the arguments are those the kernel declares, in its order: the
        // inputs' data, the output (`len` floats), and u32 sizes that match them.
        #[allow(unsafe_code)]
        unsafe { args.launch(cfg) }
            .map_err(|e| candle_core::Error::Msg(format!("{name}: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// 2×2 stride-2 max-pool, floor semantics. CPU: the kernel above; CUDA: the same in
/// `maxpool.cu` where the CUDA nodes apply ([`super::cuda_nodes`]); elsewhere the
/// windows laid out as a last axis of 4, the first maximum's index taken with
/// `argmax` and the value gathered, so the gradient goes to that one element as in
/// the kernels (a plain `max` would send it to every tied element, and flat regions
/// of the synthetic images make ties common).
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    if super::cpu_kernels(x) || super::cuda_nodes(x) {
        return x.contiguous()?.apply_op1(MaxPool);
    }
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let windows = x
        .narrow(2, 0, 2 * ho)?
        .narrow(3, 0, 2 * wo)?
        .contiguous()?
        .reshape((b, c, ho, 2, wo, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((b, c, ho, wo, 4))?;
    let first = windows.argmax_keepdim(4)?;
    windows.gather(&first, 4)?.squeeze(4)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn matches_reshape_max_reference_on_odd_sizes() {
        let (b, c, h, w) = (2, 3, 7, 5);
        // Distinct values so the maximum of each window is unique.
        let data: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * 37) % 101) as f32)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(data, (b, c, h, w), &Device::Cpu).expect("t"))
            .expect("var");
        let ours = max_pool2x2(&x).expect("ours");
        let reference = x
            .narrow(2, 0, 6)
            .and_then(|t| t.narrow(3, 0, 4))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape((b, c, 3, 2, 2, 2)))
            .and_then(|t| t.max(5))
            .and_then(|t| t.max(3))
            .expect("reference");
        assert_eq!(ours.dims(), &[b, c, 3, 2]);
        assert_eq!(
            ours.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("v"),
            reference
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("v")
        );
        let up = Tensor::arange(0f32, (b * c * 6) as f32, &Device::Cpu)
            .and_then(|t| t.reshape((b, c, 3, 2)))
            .expect("up");
        let g1 = (ours * &up)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("g1");
        let g2 = (reference * &up)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("g2");
        let v = |g: &candle_core::backprop::GradStore| {
            g.get(&x)
                .expect("grad")
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("v")
        };
        assert_eq!(v(&g1), v(&g2));
    }

    /// Sides too short for one window give an empty output and a zero gradient,
    /// not a panic (rayon refuses chunks of 0).
    #[test]
    fn inputs_smaller_than_a_window_pool_to_nothing() {
        for (h, w) in [(1, 4), (4, 1), (1, 1)] {
            let x = Var::from_tensor(&crate::ops::test_util::rand(&[2, 3, h, w], 1)).expect("x");
            let y = max_pool2x2(x.as_tensor()).expect("pool");
            assert_eq!(y.dims(), &[2, 3, h / 2, w / 2]);
            let grads = y.sum_all().and_then(|s| s.backward()).expect("backward");
            let g = grads.get(x.as_tensor()).expect("gradient");
            let total = g
                .abs()
                .and_then(|a| a.sum_all())
                .and_then(|s| s.to_scalar::<f32>());
            assert_eq!(total.expect("sum"), 0.0, "{h}×{w}");
        }
    }

    #[test]
    fn generic_path_matches_the_kernel_with_ties() {
        // Three values only: most windows hold tied maxima, whose gradient must go to
        // the first of them on both paths.
        let (b, c, h, w) = (2, 3, 7, 9);
        let data: Vec<f32> = (0..b * c * h * w).map(|i| ((i * 7) % 3) as f32).collect();
        let x = Var::from_tensor(&Tensor::from_vec(data, (b, c, h, w), &Device::Cpu).expect("t"))
            .expect("var");
        let up = Tensor::arange(1f32, (b * c * 3 * 4 + 1) as f32, &Device::Cpu)
            .and_then(|t| t.reshape((b, c, 3, 4)))
            .expect("up");
        let run = || {
            let y = max_pool2x2(&x).expect("pool");
            let g = (&y * &up)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
            (flat(&y), flat(g.get(&x).expect("grad")))
        };
        let kernel = run();
        let generic = crate::ops::with_generic_ops(run);
        assert_eq!(kernel, generic);
    }
}

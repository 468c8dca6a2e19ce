//! Element-wise updates written in place, for the optimizers: one pass over the
//! parameter (or its state) instead of a freshly allocated tensor for each of the
//! update's operations. On the CPU a closure; on CUDA the same formula as a kernel
//! of `inplace.cu`, where the CUDA nodes run (`ops::cuda_nodes`).

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Values per rayon task: tensors up to this size (all but the paper spec's
/// largest) are updated on the calling thread.
const PAR_CHUNK: usize = 1 << 16;

/// `dst[i] ← f(dst[i], a[i], b[i])` over contiguous f32 tensors of one shape.
///
/// `f` should capture its constants by value (a `move` closure): one that holds
/// references reloads them for every value, and the loop is not vectorised (Adagrad
/// at paper@64: 2.7 ms instead of 1.0).
pub(crate) struct Pass<F> {
    name: &'static str,
    f: F,
    /// The kernel of `inplace.cu` computing `f` on CUDA, and its constants.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: Option<(&'static str, [f32; 4])>,
}

impl<F: Fn(f32, f32, f32) -> f32 + Sync> Pass<F> {
    /// A pass named `name` (in candle's errors) computing `f`.
    pub(crate) fn new(name: &'static str, f: F) -> Self {
        Pass {
            name,
            f,
            kernel: None,
        }
    }

    /// The same pass on CUDA: kernel `name` of `inplace.cu`, with constants `k`.
    pub(crate) fn cuda(mut self, name: &'static str, k: [f32; 4]) -> Self {
        self.kernel = Some((name, k));
        self
    }

    /// Runs the pass on `dst`, reading `a` and `b` (which may be the same tensor,
    /// but not `dst`).
    pub(crate) fn run(&self, dst: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
        dst.inplace_op3(a, b, self)
    }
}

/// The f32 data of a contiguous CPU tensor, for writing.
fn slice_mut<'a>(name: &str, s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{name}: expects a contiguous f32 tensor"),
    }
}

/// The f32 data of a contiguous CPU tensor of `len` values.
fn slice<'a>(name: &str, s: &'a CpuStorage, l: &Layout, len: usize) -> Result<&'a [f32]> {
    let v = crate::ops::contiguous(s, l, name)?;
    if v.len() != len {
        candle_core::bail!("{name}: expects tensors of {len} values, got {}", v.len());
    }
    Ok(v)
}

impl<F: Fn(f32, f32, f32) -> f32 + Sync> InplaceOp3 for Pass<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        let dst = slice_mut(self.name, dst, dl)?;
        let a = slice(self.name, a, al, dst.len())?;
        let b = slice(self.name, b, bl, dst.len())?;
        let pass = |(dst, (a, b)): (&mut [f32], (&[f32], &[f32]))| {
            for (d, (&a, &b)) in dst.iter_mut().zip(a.iter().zip(b)) {
                *d = (self.f)(*d, a, b);
            }
        };
        if dst.len() > PAR_CHUNK {
            dst.par_chunks_mut(PAR_CHUNK)
                .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
                .for_each(pass);
        } else {
            pass((dst, (a, b)));
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/inplace.ptx"));
        let name = self.name;
        let Some((kernel, k)) = self.kernel else {
            candle_core::bail!("{name}: no CUDA kernel");
        };
        let span = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg(format!("{name}: expects a contiguous f32 tensor"))
            })
        };
        let ((d0, d1), (a0, a1), (b0, b1)) = (span(dl)?, span(al)?, span(bl)?);
        let n = d1 - d0;
        if a1 - a0 != n || b1 - b0 != n {
            candle_core::bail!("{name}: expects tensors of {n} values");
        }
        if n == 0 {
            return Ok(());
        }
        // Grid-stride loops: at most 64K blocks of 1024 threads cover any size.
        let blocks = u32::try_from(n.div_ceil(1024).min(65_536)).unwrap_or(65_536);
        let dev = dst.device.clone();
        let func = dev.get_or_load_custom_func(kernel, "modkit_inplace", PTX)?;
        let av = a.as_cuda_slice::<f32>()?.slice(a0..a1);
        let bv = b.as_cuda_slice::<f32>()?.slice(b0..b1);
        let mut dv = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
        let len = n as u64;
        let mut args = func.builder();
        args.arg(&mut dv);
        args.arg(&av);
        args.arg(&bv);
        args.arg(&len);
        for v in &k {
            args.arg(v);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are those the kernel declares, in its order: `n`
        // writable floats, two `n`-float inputs (neither is `dst`: `Pass::run`'s
        // contract), `n` as size_t and four f32 constants.
        #[allow(unsafe_code)]
        unsafe { args.launch(cfg) }
            .map_err(|e| candle_core::Error::Msg(format!("{name}: {e:?}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn a_pass_writes_every_value_in_place() {
        let dev = Device::Cpu;
        for n in [5, PAR_CHUNK * 2 + 3] {
            let dst = Tensor::arange(0f32, n as f32, &dev).expect("dst");
            let a = dst.affine(2.0, 1.0).expect("a");
            let before = dst.clone();
            Pass::new("test", |d, a, b| d + a * b)
                .run(&dst, &a, &a)
                .expect("pass");
            let got = before.to_vec1::<f32>().expect("got");
            for (i, g) in got.iter().enumerate() {
                let (d, a) = (i as f32, 2.0 * i as f32 + 1.0);
                assert_eq!(*g, d + a * a, "value {i} of {n}");
            }
        }
    }

    #[test]
    fn mismatched_or_strided_tensors_are_errors() {
        let dev = Device::Cpu;
        let dst = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).expect("dst");
        let short = Tensor::zeros(5, candle_core::DType::F32, &dev).expect("short");
        let pass = Pass::new("test", |d, _, _| d);
        let err = pass.run(&dst, &short, &short).expect_err("short");
        assert!(err.to_string().contains("6 values, got 5"), "{err}");
        let t = Tensor::zeros((3, 2), candle_core::DType::F32, &dev).expect("t");
        let strided = t.t().expect("t");
        assert!(pass.run(&strided, &dst, &dst).is_err());
    }
}

/// What the optimizers' tests of their in-place passes share.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::backprop::GradStore;
    use candle_core::{Tensor, Var};

    use super::PAR_CHUNK;

    /// Two named parameters: one small enough for the calling thread, one split
    /// into rayon tasks.
    pub fn params() -> Vec<(String, Var)> {
        params_on(&candle_core::Device::Cpu)
    }

    /// [`params`] on `dev`.
    pub fn params_on(dev: &candle_core::Device) -> Vec<(String, Var)> {
        let shapes: [&[usize]; 2] = [&[3, 5], &[PAR_CHUNK * 2 + 7]];
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = crate::ops::test_util::rand(s, i as u64)
                    .to_device(dev)
                    .expect("device");
                (format!("p{i}"), Var::from_tensor(&t).expect("var"))
            })
            .collect()
    }

    /// Every value of `ts`, in order.
    #[cfg(feature = "cuda")]
    pub fn values<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Vec<f32> {
        ts.into_iter()
            .flat_map(|t| t.flatten_all().expect("f").to_vec1::<f32>().expect("v"))
            .collect()
    }

    /// `a` and `b` agree to a few units in the last place (the GPU kernels fuse
    /// multiplications and additions that the tensor ops round apart): 1e-5
    /// relative, far above that and far below any wrong formula.
    #[cfg(feature = "cuda")]
    pub fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs() + 1e-30,
                "{what}: value {i} is {x}, the tensor ops give {y}"
            );
        }
    }

    /// Gradients of `Σ sin(θ)·θ`: of both signs and many sizes.
    pub fn grads(params: &[(String, Var)]) -> GradStore {
        params
            .iter()
            .map(|(_, v)| (v.sin().expect("sin") * v.as_tensor()).expect("mul"))
            .map(|t| t.sum_all().expect("sum"))
            .reduce(|x, y| (x + y).expect("add"))
            .expect("loss")
            .backward()
            .expect("bwd")
    }

    /// The bits of every value of `ts`, in order.
    pub fn bits<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Vec<u32> {
        ts.into_iter()
            .flat_map(|t| t.flatten_all().expect("f").to_vec1::<f32>().expect("v"))
            .map(f32::to_bits)
            .collect()
    }
}

//! Element-wise updates written in place on the CPU, for the optimizers: one pass
//! over the parameter (or its state) instead of a freshly allocated tensor for each
//! of the update's operations.

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
}

impl<F: Fn(f32, f32, f32) -> f32 + Sync> Pass<F> {
    /// A pass named `name` (in candle's errors) computing `f`.
    pub(crate) fn new(name: &'static str, f: F) -> Self {
        Pass { name, f }
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
        let shapes: [&[usize]; 2] = [&[3, 5], &[PAR_CHUNK * 2 + 7]];
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = crate::ops::test_util::rand(s, i as u64);
                (format!("p{i}"), Var::from_tensor(&t).expect("var"))
            })
            .collect()
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

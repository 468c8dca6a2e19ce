//! Fast CPU kernels for the ops whose candle implementation is slow or approximate.
//!
//! * [`conv3x3`]: a 3×3 stride-1 convolution as `im2col` + GEMM in cache-sized
//!   chunks, forward and backward (`col2im`). candle's own conv2d backward runs a
//!   direct transposed convolution, ~6× the forward.
//! * [`batch_norm_train`]: training-mode BatchNorm (+ ReLU) in one pass forward and
//!   two backward, instead of candle-nn's ten element-wise ops each way.
//! * [`conv_bn_train`]: the two above as one graph node, so that the convolution's
//!   output gets no gradient of its own in candle's backward.
//! * [`conv_bn_pool_train`]: the same with the ReLU and max-pool after it, a
//!   block's first conv, so that the pre-pool tensor is no graph tensor either.
//! * [`res_pair_train`]: a block's two residual conv + BatchNorm stages and the
//!   skip addition as one node.
//! * [`max_pool2x2`]: 2×2 stride-2 max-pool with floor semantics for odd sizes and an
//!   exact backward (candle's upsampling-based backward assumes even sizes).
//!
//! On CUDA, [`cudnn`] runs the convolutions and training-mode BatchNorms as cuDNN
//! calls where libcudnn loads; elsewhere the generic path runs: candle's built-in
//! ops, with a GEMM-based conv backward. Each kernel is checked against candle's reference
//! implementation in its tests, and a whole training step on the CPU kernels
//! against the same step on the generic path (`train.rs`).

mod batchnorm;
mod bn_pool;
mod conv;
mod conv_bn;
#[cfg(feature = "cuda")]
pub mod cudnn;
mod direct;
mod gemm;
mod maxpool;

pub use batchnorm::{BatchStats, batch_norm_train};
pub use conv::{conv3x3, conv3x3_channel_major, conv3x3_generic, conv3x3_grads};
pub use conv_bn::{ConvBnParams, conv_bn_pool_train, conv_bn_train, res_pair_train};
pub use maxpool::max_pool2x2;

use std::cell::Cell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

thread_local! {
    static CPU_KERNELS: Cell<bool> = const { Cell::new(true) };
}

/// Whether an op on `t` runs this module's CPU kernels: on the CPU, unless the calling
/// thread asked for the generic path (what CUDA runs) with [`with_generic_ops`].
pub(crate) fn cpu_kernels(t: &Tensor) -> bool {
    t.device().is_cpu() && CPU_KERNELS.with(Cell::get)
}

/// Whether the CUDA nodes compute ops on `t`: cuDNN's convolution and BatchNorm
/// and the pooling kernel of `maxpool.cu` (`cudnn::applies`; never in builds
/// without CUDA).
pub(crate) fn cuda_nodes(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return cudnn::applies(t);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = t;
        false
    }
}

/// Training-mode BatchNorm of batch-major `x: [B, C]` or `[B, C, H, W]` through
/// cuDNN, where it applies (`cudnn::applies`): the output and the batch's mean and
/// biased variance per channel. `None` elsewhere (the CPU, builds without CUDA, no
/// libcudnn, other ranks).
pub fn batch_norm_train_gpu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !(cuda_nodes(x) && matches!(x.rank(), 2 | 4)) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return cudnn::batch_norm_train(x, gamma, beta, eps).map(Some);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (gamma, beta, eps);
        Ok(None)
    }
}

/// Runs `f` with the CPU kernels off on this thread: the generic path on the CPU, to
/// compare it with the kernels.
#[cfg(test)]
pub(crate) fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    let before = CPU_KERNELS.with(|k| k.replace(false));
    let r = f();
    CPU_KERNELS.with(|k| k.set(before));
    r
}

/// A vector of `n` floats that `fill` writes, without zero-filling it first: the
/// kernels' outputs are written in full, and the zero fill was a pass over memory
/// each (4% of a tiny training step in `memset`).
///
/// # Safety
/// `fill` must write every one of the `n` elements of the slice it is given.
#[allow(unsafe_code)]
unsafe fn filled(n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the capacity is at least `n`, and the caller's `fill` initialised all
    // `n` elements.
    unsafe { v.set_len(n) };
    v
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("the CPU kernels got a tensor on {:?}", t.device());
    };
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("a CPU kernel got a non-contiguous tensor".into())
    })?;
    f(&cpu.as_slice::<f32>()?[a..b])
}

/// The f32 data of a contiguous CPU input of op `what`.
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("{what} expects contiguous inputs"),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};

    /// A fixed pseudo-random fill in [-0.5, 0.5): no RNG state shared between tests.
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n as u64)
            .map(|i| {
                let z = (i + 1 + seed.wrapping_mul(0xD1B5_4A32_D192_ED03))
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15);
                ((z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
    }

    /// The gradients of `Σ y·up`: a loss that weighs every output differently.
    pub fn grads_of(y: &Tensor, up: &Tensor) -> candle_core::backprop::GradStore {
        (y * up)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("backward")
    }

    /// `max |a − b| / (1 + max |b|)`: a difference relative to the reference's scale.
    pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("scale");
        max_diff(a, b) / (1.0 + scale)
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar")
    }
}

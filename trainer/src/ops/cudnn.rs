//! cuDNN's convolution and training-mode BatchNorm, as nodes of candle's graph, for
//! the CUDA trainer.
//!
//! On an H100 the CUDA trainer ran 3–11× slower than PyTorch (`docs/performance.md`,
//! "CUDA"): every layer was a chain of candle kernels, each a pass over GPU memory
//! (the convolution's backward gathered nine shifted copies of its input, and
//! candle-nn's BatchNorm is about ten element-wise kernels each way). PyTorch makes
//! one cuDNN call per convolution and pass, and one per BatchNorm and pass. These are
//! the same calls:
//!
//! * [`conv3x3`]: `cudnnConvolutionForward`; backward `cudnnConvolutionBackwardData`
//!   (`∂x`) and `cudnnConvolutionBackwardFilter` (`∂W`).
//! * [`batch_norm_train`]: `cudnnBatchNormalizationForwardTraining` over each
//!   channel (spatial mode), returning the batch statistics for the running
//!   averages; backward `cudnnBatchNormalizationBackward` from the statistics the
//!   forward saved.
//!
//! Convolutions use FP32 FMA kernels (`CUDNN_FMA_MATH`), as the CPU does; with
//! `MODTRAIN_TF32=1` cuDNN may use TF32 tensor cores, PyTorch's default for
//! convolutions. The algorithm is cuDNN's heuristic choice (PyTorch's default,
//! `benchmark=False`), looked up once per shape.
//!
//! They run where [`applies`]: a CUDA f32 tensor, libcudnn found at run time (cudarc
//! loads it, `dynamic-loading`) and `MODTRAIN_CUDNN` not `0`; so does the 2×2
//! max-pool's own CUDA kernel (`maxpool.cu`). Elsewhere the generic path (candle's
//! ops) runs, as before: `MODTRAIN_CUDNN=0` times it against these.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use cudarc::cudnn::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

/// A cuDNN or CUDA driver failure as candle's error, naming the call.
trait Check<T> {
    fn check(self, call: &str) -> Result<T>;
}

impl<T, E: std::fmt::Debug> Check<T> for std::result::Result<T, E> {
    fn check(self, call: &str) -> Result<T> {
        self.map_err(|e| candle_core::Error::Msg(format!("{call}: {e:?}")))
    }
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether libcudnn loads in this process (asked once) and `MODTRAIN_CUDNN` is not
/// `0`. Says once on stderr when the library is missing.
fn loaded() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        if std::env::var_os("MODTRAIN_CUDNN").is_some_and(|v| v == "0") {
            return false;
        }
        // SAFETY: tries to open the library under its usual names, nothing else.
        #[allow(unsafe_code)]
        let present = unsafe { sys::is_culib_present() };
        if !present {
            eprintln!(
                "modtrain: cuDNN (libcudnn.so.9) is not on LD_LIBRARY_PATH; the CUDA trainer runs candle's own kernels, several times slower"
            );
        }
        present
    })
}

/// Whether the cuDNN nodes compute ops on `t`: a CUDA f32 tensor, cuDNN loaded, and
/// not switched off on this thread ([`without_cudnn`]).
pub(crate) fn applies(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::F32 && ENABLED.with(Cell::get) && loaded()
}

/// Whether cuDNN is in use for CUDA tensors in this process.
pub(crate) fn in_use() -> bool {
    ENABLED.with(Cell::get) && loaded()
}

/// Runs `f` with the cuDNN nodes off on this thread: the generic path on the GPU,
/// to compare the two.
#[cfg(test)]
pub(crate) fn without_cudnn<R>(f: impl FnOnce() -> R) -> R {
    let before = ENABLED.with(|e| e.replace(false));
    let r = f();
    ENABLED.with(|e| e.set(before));
    r
}

/// A cuDNN handle bound to a device's stream.
struct Handle {
    raw: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `cudnnCreate` in `handle` and destroyed only here.
        #[allow(unsafe_code)]
        let _ = unsafe { result::destroy_handle(self.raw) };
    }
}

thread_local! {
    // cuDNN handles are not to be shared between threads: one per thread and device.
    static HANDLES: RefCell<HashMap<DeviceId, Rc<Handle>>> = RefCell::new(HashMap::new());
}

/// This thread's handle for `dev`, with the device's context current.
fn handle(dev: &CudaDevice) -> Result<Rc<Handle>> {
    let stream = dev.cuda_stream();
    stream
        .context()
        .bind_to_thread()
        .check("binding the CUDA context")?;
    HANDLES.with(|handles| {
        if let Some(h) = handles.borrow().get(&dev.id()) {
            return Ok(h.clone());
        }
        let h = Rc::new(Handle {
            raw: result::create_handle().check("cudnnCreate")?,
            stream,
        });
        // SAFETY: a live handle and the device's live stream (kept in `h`).
        #[allow(unsafe_code)]
        unsafe { result::set_stream(h.raw, h.stream.cu_stream() as sys::cudaStream_t) }
            .check("cudnnSetStream")?;
        handles.borrow_mut().insert(dev.id(), h.clone());
        Ok(h)
    })
}

fn c_dims(dims: [usize; 4]) -> Result<[c_int; 4]> {
    let mut out = [0; 4];
    for (o, d) in out.iter_mut().zip(dims) {
        *o = c_int::try_from(d)
            .map_err(|_| candle_core::Error::Msg(format!("cuDNN: dimension {d} too large")))?;
    }
    Ok(out)
}

/// An owned cuDNN descriptor: `create` makes one, `Drop` destroys it.
macro_rules! descriptor {
    ($(#[$doc:meta])* $name:ident($raw:ty), $create:path, $destroy:path) => {
        $(#[$doc])*
        struct $name($raw);

        impl $name {
            fn create() -> Result<Self> {
                Ok($name($create().check(stringify!($create))?))
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: made by `create`, destroyed only here.
                #[allow(unsafe_code)]
                let _ = unsafe { $destroy(self.0) };
            }
        }
    };
}

descriptor!(
    /// An NCHW f32 tensor descriptor.
    TensorDesc(sys::cudnnTensorDescriptor_t),
    result::create_tensor_descriptor,
    result::destroy_tensor_descriptor
);
descriptor!(
    /// An `[O, C, 3, 3]` f32 filter descriptor.
    FilterDesc(sys::cudnnFilterDescriptor_t),
    result::create_filter_descriptor,
    result::destroy_filter_descriptor
);
descriptor!(
    /// A stride-1, dilation-1 cross-correlation (what deep learning calls
    /// convolution) with f32 accumulation.
    ConvDesc(sys::cudnnConvolutionDescriptor_t),
    result::create_convolution_descriptor,
    result::destroy_convolution_descriptor
);

impl TensorDesc {
    fn new(dims: [usize; 4]) -> Result<Self> {
        let d = Self::create()?;
        let (format, dtype) = (
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        );
        // SAFETY: a live descriptor.
        #[allow(unsafe_code)]
        unsafe { result::set_tensor4d_descriptor(d.0, format, dtype, c_dims(dims)?) }
            .check("cudnnSetTensor4dDescriptor")?;
        Ok(d)
    }
}

impl FilterDesc {
    fn new(dims: [usize; 4]) -> Result<Self> {
        let d = Self::create()?;
        let (dtype, format) = (
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        );
        // SAFETY: a live descriptor.
        #[allow(unsafe_code)]
        unsafe { result::set_filter4d_descriptor(d.0, dtype, format, c_dims(dims)?) }
            .check("cudnnSetFilter4dDescriptor")?;
        Ok(d)
    }
}

impl ConvDesc {
    fn new(pad: usize, math: sys::cudnnMathType_t) -> Result<Self> {
        let d = Self::create()?;
        let p =
            c_int::try_from(pad).map_err(|_| candle_core::Error::Msg("cuDNN: padding".into()))?;
        let (mode, dtype) = (
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        );
        // SAFETY: a live descriptor.
        #[allow(unsafe_code)]
        unsafe {
            result::set_convolution2d_descriptor(d.0, p, p, 1, 1, 1, 1, mode, dtype)
                .check("cudnnSetConvolution2dDescriptor")?;
            result::set_convolution_math_type(d.0, math).check("cudnnSetConvolutionMathType")?;
        }
        Ok(d)
    }
}

/// Whether convolutions may use TF32 tensor cores (`MODTRAIN_TF32=1`).
fn tf32() -> bool {
    static TF32: OnceLock<bool> = OnceLock::new();
    *TF32.get_or_init(|| std::env::var_os("MODTRAIN_TF32").is_some_and(|v| v == "1"))
}

/// The three passes of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    /// `∂x` from `∂y` and the weight.
    Data,
    /// `∂W` from `x` and `∂y`.
    Filter,
}

/// The algorithm cuDNN's heuristics chose for one pass and shape.
#[derive(Debug, Clone, Copy)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// The shape of one 3×3 convolution: `x: [b, c, h, w]`, `o` filters, padding `pad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConvShape {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    pad: usize,
}

impl ConvShape {
    fn new(x: &Shape, weight: &Shape, pad: usize) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let (o, c2, kh, kw) = weight.dims4()?;
        if (c2, kh, kw) != (c, 3, 3) || h + 2 * pad < 3 || w + 2 * pad < 3 {
            candle_core::bail!(
                "cuDNN conv3x3: input {:?} and weight {:?} with padding {pad}",
                x.dims(),
                weight.dims()
            );
        }
        Ok(ConvShape { b, c, h, w, o, pad })
    }

    fn x(&self) -> [usize; 4] {
        [self.b, self.c, self.h, self.w]
    }

    fn y(&self) -> [usize; 4] {
        [
            self.b,
            self.o,
            self.h + 2 * self.pad - 2,
            self.w + 2 * self.pad - 2,
        ]
    }

    fn weight(&self) -> [usize; 4] {
        [self.o, self.c, 3, 3]
    }
}

/// The descriptors of one convolution.
struct ConvDescs {
    x: TensorDesc,
    y: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
}

impl ConvDescs {
    fn new(shape: ConvShape, math: sys::cudnnMathType_t) -> Result<Self> {
        Ok(ConvDescs {
            x: TensorDesc::new(shape.x())?,
            y: TensorDesc::new(shape.y())?,
            w: FilterDesc::new(shape.weight())?,
            conv: ConvDesc::new(shape.pad, math)?,
        })
    }
}

/// How one pass of one convolution shape runs: its descriptors, cuDNN's algorithm
/// and the workspace it needs, in bytes.
struct Plan {
    descs: ConvDescs,
    algo: Algo,
    bytes: usize,
}

thread_local! {
    // Descriptors are per thread, as the handles are.
    static PLANS: RefCell<HashMap<(ConvShape, Pass), Rc<Plan>>> = RefCell::new(HashMap::new());
}

/// The plan for `pass` on `shape`, made once per shape and pass: cuDNN's heuristics
/// rank the pass's algorithms (PyTorch's default, `benchmark=False`), and the best
/// one that the precision rule allows and whose workspace cuDNN can size is used.
fn plan(h: &Handle, shape: ConvShape, pass: Pass) -> Result<Rc<Plan>> {
    if let Some(p) = PLANS.with(|p| p.borrow().get(&(shape, pass)).cloned()) {
        return Ok(p);
    }
    use sys::cudnnMathType_t as M;
    // Strict FP32: FMA kernels only (on Ampere and later the default math type lets
    // cuDNN use TF32 for f32 data).
    let strict = !tf32();
    let d = ConvDescs::new(
        shape,
        if strict {
            M::CUDNN_FMA_MATH
        } else {
            M::CUDNN_DEFAULT_MATH
        },
    )?;
    // The v7 heuristics rank every algorithm of a pass (8, 6 and 7 of them); each
    // result carries its status and the math type it runs with.
    macro_rules! ranked {
        ($perf:ty, $count:expr, $query:expr, $variant:path) => {{
            // SAFETY: plain C structs that cuDNN fills; zero is a valid bit pattern.
            #[allow(unsafe_code)]
            let mut perf: [$perf; $count] = unsafe { std::mem::zeroed() };
            let mut n: c_int = 0;
            // SAFETY: live handle and descriptors; `perf` holds `$count` results.
            #[allow(unsafe_code)]
            unsafe { $query(&mut n, perf.as_mut_ptr()) }
                .check("cudnnGetConvolution*Algorithm_v7")?;
            perf[..n.clamp(0, $count as c_int) as usize]
                .iter()
                .filter(|p| {
                    p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                        && (!strict
                            || matches!(p.mathType, M::CUDNN_DEFAULT_MATH | M::CUDNN_FMA_MATH))
                })
                .map(|p| {
                    (
                        $variant(p.algo),
                        if strict {
                            M::CUDNN_FMA_MATH
                        } else {
                            p.mathType
                        },
                    )
                })
                .collect::<Vec<_>>()
        }};
    }
    let candidates = match pass {
        Pass::Forward => ranked!(
            sys::cudnnConvolutionFwdAlgoPerf_t,
            8,
            |n: &mut c_int, p| result::get_convolution_forward_algorithm(
                h.raw, d.x.0, d.w.0, d.conv.0, d.y.0, 8, n, p
            ),
            Algo::Forward
        ),
        Pass::Data => ranked!(
            sys::cudnnConvolutionBwdDataAlgoPerf_t,
            6,
            |n: &mut c_int, p| result::get_convolution_backward_data_algorithm(
                h.raw, d.w.0, d.y.0, d.conv.0, d.x.0, 6, n, p
            ),
            Algo::Data
        ),
        Pass::Filter => ranked!(
            sys::cudnnConvolutionBwdFilterAlgoPerf_t,
            7,
            |n: &mut c_int, p| result::get_convolution_backward_filter_algorithm(
                h.raw, d.x.0, d.y.0, d.conv.0, d.w.0, 7, n, p
            ),
            Algo::Filter
        ),
    };
    for (algo, math) in candidates {
        // The workspace under the math type the algorithm will run with.
        let descs = ConvDescs::new(shape, math)?;
        let d = &descs;
        // SAFETY: live handle and descriptors.
        #[allow(unsafe_code)]
        let bytes = unsafe {
            match algo {
                Algo::Forward(a) => result::get_convolution_forward_workspace_size(
                    h.raw, d.x.0, d.w.0, d.conv.0, d.y.0, a,
                ),
                Algo::Data(a) => result::get_convolution_backward_data_workspace_size(
                    h.raw, d.w.0, d.y.0, d.conv.0, d.x.0, a,
                ),
                Algo::Filter(a) => result::get_convolution_backward_filter_workspace_size(
                    h.raw, d.x.0, d.y.0, d.conv.0, d.w.0, a,
                ),
            }
        };
        let Ok(bytes) = bytes else { continue };
        let plan = Rc::new(Plan { descs, algo, bytes });
        PLANS.with(|p| p.borrow_mut().insert((shape, pass), plan.clone()));
        return Ok(plan);
    }
    candle_core::bail!("cuDNN has no usable {pass:?} algorithm for the convolution {shape:?}")
}

/// The f32 data of a contiguous CUDA input.
fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: a non-contiguous input")))?;
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// `len` uninitialised floats on `dev`, every one of which the caller's cuDNN call
/// writes.
fn output(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: each caller passes the buffer to a cuDNN call that writes all of it
    // (β = 0) before anything reads it.
    #[allow(unsafe_code)]
    unsafe {
        dev.alloc::<f32>(len)
    }
}

/// Runs one pass of a convolution: `out = pass(a, b)` with `(a, b)` = `(x, W)` for
/// the forward, `(∂y, W)` for `∂x` and `(x, ∂y)` for `∂W`.
fn run(
    dev: &CudaDevice,
    shape: ConvShape,
    pass: Pass,
    a: &CudaView<f32>,
    b: &CudaView<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let h = handle(dev)?;
    let plan = plan(&h, shape, pass)?;
    let (d, algo, bytes) = (&plan.descs, plan.algo, plan.bytes);
    let stream = &h.stream;
    let mut ws = (bytes > 0)
        .then(|| {
            // SAFETY: cuDNN's scratch space, never read before cuDNN writes it.
            #[allow(unsafe_code)]
            unsafe {
                stream.alloc::<u8>(bytes)
            }
        })
        .transpose()
        .check("allocating cuDNN's workspace")?;
    let (one, zero) = (1f32, 0f32);
    let (alpha, beta) = (
        (&one as *const f32).cast::<c_void>(),
        (&zero as *const f32).cast::<c_void>(),
    );
    let (ap, _ra) = a.device_ptr(stream);
    let (bp, _rb) = b.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    let (wsp, _rws) = match ws.as_mut() {
        Some(ws) => {
            let (p, r) = ws.device_ptr_mut(stream);
            (p as *mut c_void, Some(r))
        }
        None => (std::ptr::null_mut(), None),
    };
    let (ap, bp, op) = (ap as *const c_void, bp as *const c_void, op as *mut c_void);
    // SAFETY: the handle and descriptors are live; the pointers hold the tensors
    // the descriptors describe (contiguous NCHW f32, sizes from `shape`), on the
    // handle's stream; the workspace has the bytes cuDNN asked for.
    #[allow(unsafe_code)]
    unsafe {
        match algo {
            Algo::Forward(algo) => result::convolution_forward(
                h.raw, alpha, d.x.0, ap, d.w.0, bp, d.conv.0, algo, wsp, bytes, beta, d.y.0, op,
            )
            .check("cudnnConvolutionForward"),
            Algo::Data(algo) => result::convolution_backward_data(
                h.raw, alpha, d.w.0, bp, d.y.0, ap, d.conv.0, algo, wsp, bytes, beta, d.x.0, op,
            )
            .check("cudnnConvolutionBackwardData"),
            Algo::Filter(algo) => result::convolution_backward_filter(
                h.raw, alpha, d.x.0, ap, d.y.0, bp, d.conv.0, algo, wsp, bytes, beta, d.w.0, op,
            )
            .check("cudnnConvolutionBackwardFilter"),
        }
    }
}

fn cpu_refused(op: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{op} runs on CUDA only")
}

/// One pass of the 3×3 convolution as a graph node; the forward's backward runs the
/// other two.
#[derive(Debug, Clone, Copy)]
struct Conv {
    pad: usize,
    pass: Pass,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "cudnn-conv3x3",
            Pass::Data => "cudnn-conv3x3-dx",
            Pass::Filter => "cudnn-conv3x3-dw",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (shape, out) = match self.pass {
            // (x, W) → y
            Pass::Forward => {
                let s = ConvShape::new(la.shape(), lb.shape(), self.pad)?;
                (s, s.y())
            }
            // (∂y, W) → ∂x: x's side is y's less 2·pad − 2.
            Pass::Data => {
                let (b, o, ho, wo) = la.shape().dims4()?;
                let (_, c, _, _) = lb.shape().dims4()?;
                let side = |n: usize| (n + 2).checked_sub(2 * self.pad).filter(|&s| s > 0);
                let (Some(h), Some(w)) = (side(ho), side(wo)) else {
                    candle_core::bail!("cuDNN conv3x3 ∂x: gradient {:?}", la.shape().dims());
                };
                let s = ConvShape::new(&Shape::from((b, c, h, w)), lb.shape(), self.pad)?;
                if s.y() != [b, o, ho, wo] {
                    candle_core::bail!("cuDNN conv3x3 ∂x: gradient {:?}", la.shape().dims());
                }
                (s, s.x())
            }
            // (x, ∂y) → ∂W
            Pass::Filter => {
                let (_, o, _, _) = lb.shape().dims4()?;
                let (_, c, _, _) = la.shape().dims4()?;
                let s = ConvShape::new(la.shape(), &Shape::from((o, c, 3, 3)), self.pad)?;
                if s.y().as_slice() != lb.shape().dims() {
                    candle_core::bail!("cuDNN conv3x3 ∂W: gradient {:?}", lb.shape().dims());
                }
                (s, s.weight())
            }
        };
        let dev = &a.device;
        let mut y = output(dev, out.iter().product())?;
        let what = self.name();
        run(
            dev,
            shape,
            self.pass,
            &view(a, la, what)?,
            &view(b, lb, what)?,
            &mut y,
        )?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from(out.to_vec()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.pass != Pass::Forward {
            candle_core::bail!("{}: no second derivative", self.name());
        }
        let g = g.contiguous()?;
        let pass = |pass| Conv {
            pad: self.pad,
            pass,
        };
        let dx = if x.track_op() {
            Some(g.apply_op2_no_bwd(weight, &pass(Pass::Data))?)
        } else {
            None
        };
        let dw = x.apply_op2_no_bwd(&g, &pass(Pass::Filter))?;
        Ok((dx, Some(dw)))
    }
}

/// `x: [B, C, H, W]` convolved with `weight: [O, C, 3, 3]` (stride 1, zero padding
/// `pad`), batch-major `[B, O, Ho, Wo]`, through cuDNN.
pub fn conv3x3(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        Conv {
            pad,
            pass: Pass::Forward,
        },
    )
}

/// The per-channel statistics a BatchNorm forward saved for its backward: the batch
/// mean and `1/√(var + ε)`.
#[derive(Debug)]
struct Saved {
    mean: CudaSlice<f32>,
    inv_std: CudaSlice<f32>,
}

type SavedCell = Arc<Mutex<Option<Saved>>>;

/// `[B, C, H, W]` of a BatchNorm input `[B, C]` or `[B, C, H, W]`.
fn bn_dims(s: &Shape) -> Result<[usize; 4]> {
    match *s.dims() {
        [b, c] => Ok([b, c, 1, 1]),
        [b, c, h, w] => Ok([b, c, h, w]),
        _ => candle_core::bail!("cuDNN BatchNorm: input {:?} (rank 2 or 4)", s.dims()),
    }
}

const BN_MODE: sys::cudnnBatchNormMode_t = sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;

/// Training-mode BatchNorm as a graph node: `(x, γ, β) → y`, or with `grad` its
/// backward `(x, ∂y, γ) → [∂x | ∂γ | ∂β]` (flat, [`grad_layout`]) from the
/// statistics the forward saved.
#[derive(Debug)]
struct BatchNorm {
    eps: f64,
    saved: SavedCell,
    grad: bool,
}

fn lock(cell: &SavedCell) -> Result<std::sync::MutexGuard<'_, Option<Saved>>> {
    cell.lock()
        .map_err(|_| candle_core::Error::Msg("cuDNN BatchNorm: poisoned statistics".into()))
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        if self.grad {
            "cudnn-batch-norm-grad"
        } else {
            "cudnn-batch-norm"
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if self.grad {
            self.backward((s1, l1), (s2, l2), (s3, l3))
        } else {
            self.forward((s1, l1), (s2, l2), (s3, l3))
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = (x.elem_count(), gamma.elem_count());
        let grads = x.apply_op3_no_bwd(
            &g.contiguous()?,
            gamma,
            &BatchNorm {
                eps: self.eps,
                saved: self.saved.clone(),
                grad: true,
            },
        )?;
        let (at_gamma, at_beta, _) = grad_layout(n, c);
        let dx = grads.narrow(0, 0, n)?.reshape(x.shape())?;
        // Copies: as views, they would keep the whole buffer (∂x's too) alive in the
        // gradient store until the update.
        let dgamma = grads
            .narrow(0, at_gamma, c)?
            .force_contiguous()?
            .reshape(gamma.shape())?;
        let dbeta = grads
            .narrow(0, at_beta, c)?
            .force_contiguous()?
            .reshape(beta.shape())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Where `∂γ` and `∂β` start in the flat output of [`BatchNorm`]'s backward, after
/// `n` values of `∂x`, and its length: each starts on a 256-byte boundary, as a
/// buffer of its own would (the gaps are never read).
fn grad_layout(n: usize, c: usize) -> (usize, usize, usize) {
    let at_gamma = n.next_multiple_of(64);
    let at_beta = (at_gamma + c).next_multiple_of(64);
    (at_gamma, at_beta, at_beta + c)
}

impl BatchNorm {
    /// `(x, γ, β) → y`, saving the batch statistics.
    fn forward(
        &self,
        (x, lx): (&CudaStorage, &Layout),
        (gamma, lg): (&CudaStorage, &Layout),
        (beta, lb): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dims = bn_dims(lx.shape())?;
        let c = dims[1];
        if lg.shape().elem_count() != c || lb.shape().elem_count() != c {
            candle_core::bail!("cuDNN BatchNorm: γ and β of {c} channels expected");
        }
        let dev = &x.device;
        let mut y = output(dev, lx.shape().elem_count())?;
        let mut mean = output(dev, c)?;
        let mut inv_std = output(dev, c)?;
        let h = handle(dev)?;
        let (xd, pd) = (TensorDesc::new(dims)?, TensorDesc::new([1, c, 1, 1])?);
        let stream = &*h.stream;
        let (xv, gv, bv) = (
            view(x, lx, self.name())?,
            view(gamma, lg, self.name())?,
            view(beta, lb, self.name())?,
        );
        let (xp, _rx) = xv.device_ptr(stream);
        let (gp, _rg) = gv.device_ptr(stream);
        let (bp, _rb) = bv.device_ptr(stream);
        let (yp, _ry) = y.device_ptr_mut(stream);
        let (mp, _rm) = mean.device_ptr_mut(stream);
        let (ip, _ri) = inv_std.device_ptr_mut(stream);
        let (one, zero) = (1f32, 0f32);
        // SAFETY: live handle and descriptors; every pointer holds the tensor its
        // descriptor describes on the handle's stream. No running averages are
        // passed (null: not updated; `Norm` updates its own from the statistics).
        #[allow(unsafe_code)]
        unsafe {
            sys::cudnnBatchNormalizationForwardTraining(
                h.raw,
                BN_MODE,
                (&one as *const f32).cast(),
                (&zero as *const f32).cast(),
                xd.0,
                xp as *const c_void,
                xd.0,
                yp as *mut c_void,
                pd.0,
                gp as *const c_void,
                bp as *const c_void,
                0.0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                self.eps,
                mp as *mut c_void,
                ip as *mut c_void,
            )
        }
        .result()
        .check("cudnnBatchNormalizationForwardTraining")?;
        drop((_rm, _ri, _ry));
        *lock(&self.saved)? = Some(Saved { mean, inv_std });
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            lx.shape().clone(),
        ))
    }

    /// `(x, ∂y, γ) → [∂x | ∂γ | ∂β]` from the saved statistics.
    fn backward(
        &self,
        (x, lx): (&CudaStorage, &Layout),
        (g, lg): (&CudaStorage, &Layout),
        (gamma, lgamma): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dims = bn_dims(lx.shape())?;
        let (n, c) = (lx.shape().elem_count(), dims[1]);
        if lg.shape().dims() != lx.shape().dims() {
            candle_core::bail!("cuDNN BatchNorm ∂x: gradient {:?}", lg.shape().dims());
        }
        let saved = lock(&self.saved)?;
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("cuDNN BatchNorm: backward without the forward's statistics");
        };
        let dev = &x.device;
        let (at_gamma, at_beta, len) = grad_layout(n, c);
        let mut out = output(dev, len)?;
        let h = handle(dev)?;
        let (xd, pd) = (TensorDesc::new(dims)?, TensorDesc::new([1, c, 1, 1])?);
        let stream = &*h.stream;
        let (xv, gv, gammav) = (
            view(x, lx, self.name())?,
            view(g, lg, self.name())?,
            view(gamma, lgamma, self.name())?,
        );
        let (xp, _rx) = xv.device_ptr(stream);
        let (gp, _rg) = gv.device_ptr(stream);
        let (gammap, _rgamma) = gammav.device_ptr(stream);
        let (mp, _rm) = saved.mean.device_ptr(stream);
        let (ip, _ri) = saved.inv_std.device_ptr(stream);
        let (op, _ro) = out.device_ptr_mut(stream);
        let f = std::mem::size_of::<f32>() as u64;
        let (dx, dgamma, dbeta) = (op, op + at_gamma as u64 * f, op + at_beta as u64 * f);
        let (one, zero) = (1f32, 0f32);
        let (one, zero) = ((&one as *const f32).cast(), (&zero as *const f32).cast());
        // SAFETY: live handle and descriptors; every pointer holds the tensor its
        // descriptor describes on the handle's stream; `out` has room for ∂x (n
        // floats), ∂γ and ∂β (c each) at their places in `grad_layout`.
        #[allow(unsafe_code)]
        unsafe {
            sys::cudnnBatchNormalizationBackward(
                h.raw,
                BN_MODE,
                one,
                zero,
                one,
                zero,
                xd.0,
                xp as *const c_void,
                xd.0,
                gp as *const c_void,
                xd.0,
                dx as *mut c_void,
                pd.0,
                gammap as *const c_void,
                dgamma as *mut c_void,
                dbeta as *mut c_void,
                self.eps,
                mp as *const c_void,
                ip as *const c_void,
            )
        }
        .result()
        .check("cudnnBatchNormalizationBackward")?;
        drop(_ro);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(len),
        ))
    }
}

/// Training-mode BatchNorm over channel 1 of `x: [B, C]` or `[B, C, H, W]` with the
/// batch's statistics: `y = γ·(x − μ)/√(σ² + ε) + β`, and `(μ, σ²)` per channel
/// (the biased variance, as the CPU kernel's) for the running averages.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    if eps <= 0.0 {
        candle_core::bail!("cuDNN BatchNorm: ε = {eps} (it must be positive)");
    }
    let saved: SavedCell = Arc::new(Mutex::new(None));
    let y = x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BatchNorm {
            eps,
            saved: saved.clone(),
            grad: false,
        },
    )?;
    let dev = x.device().as_cuda_device()?;
    let stats = lock(&saved)?;
    let Some(s) = stats.as_ref() else {
        candle_core::bail!("cuDNN BatchNorm: the forward saved no statistics");
    };
    let stream = dev.cuda_stream();
    let tensor = |slice: &CudaSlice<f32>| -> Result<Tensor> {
        let copy = stream
            .clone_dtod(slice)
            .check("copying BatchNorm's statistics")?;
        let n = copy.len();
        Ok(Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(copy, dev.clone())),
            n,
            BackpropOp::none(),
            false,
        ))
    };
    let mean = tensor(&s.mean)?;
    // σ² = 1/(1/√(σ² + ε))² − ε, which f32 rounding can take a hair below 0.
    let var = (tensor(&s.inv_std)?.sqr()?.recip()? - eps)?.relu()?;
    Ok((y, mean, var))
}

/// CUDA device `ordinal`, or a clear error where this machine has no NVIDIA driver:
/// with cudarc's `dynamic-loading`, candle would panic there instead.
pub fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    // SAFETY: tries to open the driver library under its usual names, nothing else.
    #[allow(unsafe_code)]
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        return Err(candle_core::Error::Msg(
            "no CUDA driver here (libcuda.so.1 is not on the library path); run on a machine with an NVIDIA GPU and its driver, or use --device cpu".into(),
        ));
    }
    candle_core::Device::new_cuda(ordinal)
}

/// The GPU for a test that needs one and cuDNN, or `None` (said on stderr) on a
/// machine without a GPU; a GPU without cuDNN fails the test.
#[cfg(test)]
pub(crate) fn test_gpu(test: &str) -> Option<candle_core::Device> {
    // SAFETY: tries to open the library, nothing else.
    #[allow(unsafe_code)]
    let cudnn = unsafe { sys::is_culib_present() };
    match cuda_device(0) {
        Ok(gpu) if cudnn => Some(gpu),
        Ok(_) => panic!("{test}: a GPU but no cuDNN: put libcudnn.so.9 on LD_LIBRARY_PATH"),
        Err(e) => {
            eprintln!("{test}: no GPU here ({e}); nothing compared");
            None
        }
    }
}

/// These need a GPU and cuDNN (`scripts/gpu/bench.sh` runs them there); elsewhere
/// they say so and return. Each compares a cuDNN node with the CPU kernels on the
/// same data, in value and gradient.
#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::ops::test_util::{grads_of, rand, rel_diff};

    use super::test_gpu as gpu;

    fn on(t: &Tensor, dev: &Device) -> Var {
        Var::from_tensor(&t.to_device(dev).expect("to device")).expect("var")
    }

    fn close(what: &str, gpu: &Tensor, cpu: &Tensor) {
        let d = rel_diff(&gpu.to_device(&Device::Cpu).expect("to cpu"), cpu);
        assert!(d < 1e-4, "{what}: GPU and CPU differ by {d}");
    }

    #[test]
    fn conv_matches_the_cpu_kernels() {
        let Some(dev) = gpu("conv_matches_the_cpu_kernels") else {
            return;
        };
        for (b, c, h, w, o, pad) in [(3, 4, 9, 7, 5, 1), (2, 3, 12, 12, 8, 0), (4, 8, 4, 4, 8, 1)] {
            let (x, wt) = (rand(&[b, c, h, w], 1), rand(&[o, c, 3, 3], 2));
            let (xc, wc) = (
                Var::from_tensor(&x).expect("x"),
                Var::from_tensor(&wt).expect("w"),
            );
            let y_cpu = crate::ops::conv3x3(xc.as_tensor(), wc.as_tensor(), pad).expect("cpu");
            let (xg, wg) = (on(&x, &dev), on(&wt, &dev));
            let y_gpu = conv3x3(xg.as_tensor(), wg.as_tensor(), pad).expect("gpu");
            close("y", &y_gpu, &y_cpu);
            let up = rand(y_cpu.dims(), 3);
            let g_cpu = grads_of(&y_cpu, &up);
            let g_gpu = grads_of(&y_gpu, &up.to_device(&dev).expect("up"));
            let grad = |g: &candle_core::backprop::GradStore, v: &Var| {
                g.get(v.as_tensor()).expect("gradient").clone()
            };
            close("∂x", &grad(&g_gpu, &xg), &grad(&g_cpu, &xc));
            close("∂W", &grad(&g_gpu, &wg), &grad(&g_cpu, &wc));
        }
    }

    #[test]
    fn pooling_matches_the_cpu_kernel_ties_included() {
        let Some(dev) = gpu("pooling_matches_the_cpu_kernel_ties_included") else {
            return;
        };
        // Odd sides (a dropped row and column) and values on a coarse grid, so that
        // many windows hold tied maxima: the gradient must go to the first of them.
        let x = (rand(&[3, 4, 9, 7], 8) * 4.0)
            .and_then(|t| t.round())
            .expect("x");
        let xc = Var::from_tensor(&x).expect("x");
        let xg = on(&x, &dev);
        assert!(
            crate::ops::cuda_nodes(xg.as_tensor()),
            "the CUDA nodes are off (MODTRAIN_CUDNN=0?): the kernel would go untested"
        );
        let y_cpu = crate::ops::max_pool2x2(xc.as_tensor()).expect("cpu");
        let y_gpu = crate::ops::max_pool2x2(xg.as_tensor()).expect("gpu");
        close("y", &y_gpu, &y_cpu);
        let up = rand(y_cpu.dims(), 9);
        let g_cpu = grads_of(&y_cpu, &up);
        let g_gpu = grads_of(&y_gpu, &up.to_device(&dev).expect("up"));
        let dx = |g: &candle_core::backprop::GradStore, v: &Var| {
            g.get(v.as_tensor()).expect("gradient").clone()
        };
        close("∂x", &dx(&g_gpu, &xg), &dx(&g_cpu, &xc));
    }

    #[test]
    fn batch_norm_matches_the_cpu_kernel() {
        let Some(dev) = gpu("batch_norm_matches_the_cpu_kernel") else {
            return;
        };
        for shape in [vec![6, 5, 4, 3], vec![16, 7]] {
            let c = shape[1];
            let x = rand(&shape, 4).affine(3.0, 0.5).expect("x");
            let (gamma, beta) = (rand(&[c], 5).affine(1.0, 1.0).expect("γ"), rand(&[c], 6));
            let vars = [&x, &gamma, &beta].map(|t| Var::from_tensor(t).expect("var"));
            let xc = vars[0].as_tensor().transpose(0, 1).expect("channel-major");
            let (y_cpu, stats) = crate::ops::batch_norm_train(
                &xc,
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                1e-5,
                false,
                None,
            )
            .expect("cpu");
            let gvars = [&x, &gamma, &beta].map(|t| on(t, &dev));
            let (y_gpu, mean, var) = batch_norm_train(
                gvars[0].as_tensor(),
                gvars[1].as_tensor(),
                gvars[2].as_tensor(),
                1e-5,
            )
            .expect("gpu");
            close("y", &y_gpu, &y_cpu);
            close(
                "μ",
                &mean,
                &Tensor::new(stats.mean.as_slice(), &Device::Cpu).expect("μ"),
            );
            close(
                "σ²",
                &var,
                &Tensor::new(stats.var.as_slice(), &Device::Cpu).expect("σ²"),
            );
            let up = rand(&shape, 7);
            let g_cpu = grads_of(&y_cpu, &up);
            let g_gpu = grads_of(&y_gpu, &up.to_device(&dev).expect("up"));
            for (name, (vc, vg)) in ["∂x", "∂γ", "∂β"].iter().zip(vars.iter().zip(&gvars)) {
                let a = g_gpu.get(vg.as_tensor()).expect("gpu gradient");
                let b = g_cpu.get(vc.as_tensor()).expect("cpu gradient");
                close(name, a, b);
            }
        }
    }
}

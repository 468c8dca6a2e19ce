//! Fast CPU kernels for the two ops whose candle backward is slow or approximate.
//!
//! * [`conv3x3`]: a 3×3 stride-1 convolution as `im2col` + matmul. The matmul's
//!   backward is candle's (fast GEMM); `im2col`'s backward is `col2im`. candle's own
//!   conv2d backward runs a direct transposed convolution, ~6× the forward.
//! * [`max_pool2x2`]: 2×2 stride-2 max-pool with floor semantics for odd sizes and an
//!   exact backward (candle's upsampling-based backward assumes even sizes).
//!
//! On other devices both fall back to candle's built-in ops. Each kernel is checked
//! against candle's reference implementation in its tests.

mod im2col;
mod maxpool;

pub use im2col::{Col2Im, Im2Col, conv3x3};
pub use maxpool::max_pool2x2;

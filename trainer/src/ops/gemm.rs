//! A bounds-checked front for the `gemm` crate (the GEMM candle's CPU matmul runs),
//! on strided views into plain slices: the convolution multiplies sub-blocks of
//! larger buffers in place, which candle's `matmul` cannot express without copies
//! and zero-filled outputs.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use gemm::Parallelism;

/// A `rows × cols` matrix inside a slice: element `(i, j)` at
/// `offset + i·rs + j·cs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct View {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// A row-major block of `rows × cols` whose rows are `rs` apart.
    pub fn rows(offset: usize, rows: usize, cols: usize, rs: usize) -> Self {
        View {
            offset,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The same elements read as the transpose.
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// One past the largest index the view reads (0 when empty).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
    }
}

/// The destination of a product: a slice this thread owns, or (for outputs that
/// several threads fill in disjoint blocks) a pointer shared between them.
pub(super) enum Dst<'a> {
    Slice(&'a mut [f32]),
    /// Safety contract of the constructor [`SharedOut::dst`].
    Shared(&'a SharedOut<'a>),
}

/// An output buffer, borrowed exclusively and possibly uninitialised, that threads
/// write in disjoint blocks through [`gemm`] (which, not accumulating, never reads
/// its destination).
pub(super) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: the pointer is only written through `gemm` at views that the callers of
// `SharedOut::dst` guarantee to be disjoint between threads, and the buffer stays
// borrowed (so unread and alive) while it is shared.
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    /// Shares `buf` for as long as the borrow lasts.
    pub fn new(buf: &'a mut [MaybeUninit<f32>]) -> Self {
        SharedOut {
            ptr: buf.as_mut_ptr().cast(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// A destination for one thread.
    ///
    /// # Safety
    /// The views written through it must not overlap those any other thread reads
    /// or writes while the buffer is shared, and may only be written without
    /// `accumulate` unless already initialised.
    #[allow(unsafe_code)]
    pub unsafe fn dst(&'a self) -> Dst<'a> {
        Dst::Shared(self)
    }
}

/// `dst[d] = lhs[l] · rhs[r]`, or `dst[d] += …` when `accumulate`, on the calling
/// thread (the callers parallelise over independent blocks).
///
/// # Panics
/// If the shapes do not chain or a view reaches past its slice: both are bugs of
/// the caller, never data-dependent.
pub(super) fn gemm(
    dst: Dst,
    d: View,
    accumulate: bool,
    lhs: &[f32],
    l: View,
    rhs: &[f32],
    r: View,
) {
    assert!(
        d.rows == l.rows && d.cols == r.cols && l.cols == r.rows,
        "gemm: [{}×{}] = [{}×{}]·[{}×{}]",
        d.rows,
        d.cols,
        l.rows,
        l.cols,
        r.rows,
        r.cols
    );
    let (ptr, len) = match dst {
        Dst::Slice(s) => (s.as_mut_ptr(), s.len()),
        Dst::Shared(s) => (s.ptr, s.len),
    };
    assert!(
        d.end() <= len && l.end() <= lhs.len() && r.end() <= rhs.len(),
        "gemm: a view reaches past its buffer"
    );
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    if l.cols == 0 {
        // An empty sum: gemm would leave `dst` untouched.
        if !accumulate {
            for i in 0..d.rows {
                for j in 0..d.cols {
                    // SAFETY: (i, j) is inside the view, checked against `len` above.
                    #[allow(unsafe_code)]
                    unsafe {
                        *ptr.add(d.offset + i * d.rs + j * d.cs) = 0.0
                    };
                }
            }
        }
        return;
    }
    // SAFETY: every index each view reaches is below its buffer's length (checked
    // above); `dst` is either a `&mut` slice (exclusive) or a shared buffer whose
    // views are disjoint between threads (the contract of `SharedOut::dst`), and
    // lhs/rhs are shared borrows that cannot alias a `&mut` destination.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            l.cols,
            ptr.add(d.offset),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs.as_ptr().add(l.offset),
            l.cs as isize,
            l.rs as isize,
            rhs.as_ptr().add(r.offset),
            r.cs as isize,
            r.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Writes the `rows × cols` view `v` of `src` into `dst` transposed and packed:
/// `dst[j·rows + i] = v(i, j)`.
///
/// The convolution's weight gradient multiplies its output gradient `g: [O,
/// pixels]` (pixels contiguous) three times per chunk, once per kernel row. `gemm`
/// wants that operand's `O` contiguous and packs it into that order itself, for each
/// product: ~25–35% of those products' time at the tiny spec's 16–32 channels
/// (`docs/performance.md`, session 14). Transposed once here, the three products read
/// it in place.
///
/// # Panics
/// If `v` reaches past `src` or `dst` is shorter than the view (a bug of the caller).
pub(super) fn transpose(src: &[f32], v: View, dst: &mut [f32]) {
    let (rows, cols) = (v.rows, v.cols);
    assert!(
        v.end() <= src.len() && dst.len() >= rows * cols,
        "transpose: a view reaches past its buffer"
    );
    let (brows, bcols) = transpose_blocks(src, v, dst);
    let mut scalar = |is: std::ops::Range<usize>, js: std::ops::Range<usize>| {
        for i in is {
            for j in js.clone() {
                dst[j * rows + i] = src[v.offset + i * v.rs + j * v.cs];
            }
        }
    };
    // The columns right of the blocks in the blocks' rows, then the rows below.
    scalar(0..brows, bcols..cols);
    scalar(brows..rows, 0..cols);
}

/// The part of [`transpose`] done in whole 8 × 8 blocks through AVX, where the CPU
/// has it and the view's rows are contiguous: its rows and columns from 0 (none
/// otherwise). The caller checked the view against both buffers.
#[cfg(target_arch = "x86_64")]
fn transpose_blocks(src: &[f32], v: View, dst: &mut [f32]) -> (usize, usize) {
    if v.cs != 1 || !std::arch::is_x86_feature_detected!("avx") {
        return (0, 0);
    }
    let (brows, bcols) = (v.rows / 8 * 8, v.cols / 8 * 8);
    for i0 in (0..brows).step_by(8) {
        for j0 in (0..bcols).step_by(8) {
            // SAFETY: AVX is present (checked above); the block reads rows i0..i0+8,
            // columns j0..j0+8 of the view, inside `src` (`v.end()` bounds every
            // element of the view, and `cs` is 1), and writes rows j0..j0+8, columns
            // i0..i0+8 of `dst`'s `cols × rows`, inside `dst` (both checked by
            // `transpose`).
            #[allow(unsafe_code)]
            unsafe {
                transpose8x8(
                    src.as_ptr().add(v.offset + i0 * v.rs + j0),
                    v.rs,
                    dst.as_mut_ptr().add(j0 * v.rows + i0),
                    v.rows,
                )
            };
        }
    }
    (brows, bcols)
}

/// No blocks off x86-64: [`transpose`] goes element by element.
#[cfg(not(target_arch = "x86_64"))]
fn transpose_blocks(_: &[f32], _: View, _: &mut [f32]) -> (usize, usize) {
    (0, 0)
}

/// One 8 × 8 block: `dst[j·ds + i] = src[i·rs + j]`.
///
/// # Safety
/// The CPU has AVX, and the 8 rows of 8 floats at `src` (`rs` apart) and at `dst`
/// (`ds` apart) are inside their buffers.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx")]
unsafe fn transpose8x8(src: *const f32, rs: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::{
        _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_setzero_ps, _mm256_shuffle_ps,
        _mm256_storeu_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };
    // SAFETY: the caller guarantees the 8 rows at `src` and `dst`.
    unsafe {
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, row) in r.iter_mut().enumerate() {
            *row = _mm256_loadu_ps(src.add(i * rs));
        }
        // Pairs of rows interleaved, then pairs of pairs: u[j] holds columns j (low
        // half) and j + 4 (high half) of the block's top four rows, u[j + 4] those of
        // its bottom four; exchanging halves makes the output rows.
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm256_setzero_ps(); 8];
        for h in [0, 4] {
            for i in 0..2 {
                let (a, b) = (t[h + i], t[h + i + 2]);
                u[h + 2 * i] = _mm256_shuffle_ps::<0x44>(a, b);
                u[h + 2 * i + 1] = _mm256_shuffle_ps::<0xEE>(a, b);
            }
        }
        for j in 0..4 {
            _mm256_storeu_ps(
                dst.add(j * ds),
                _mm256_permute2f128_ps::<0x20>(u[j], u[j + 4]),
            );
            _mm256_storeu_ps(
                dst.add((j + 4) * ds),
                _mm256_permute2f128_ps::<0x31>(u[j], u[j + 4]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], l: View, b: &[f32], r: View) -> Vec<f32> {
        let mut out = vec![0.0; l.rows * r.cols];
        for i in 0..l.rows {
            for j in 0..r.cols {
                out[i * r.cols + j] = (0..l.cols)
                    .map(|k| a[l.offset + i * l.rs + k * l.cs] * b[r.offset + k * r.rs + j * r.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_views_and_accumulation_match_a_naive_product() {
        let a: Vec<f32> = (0..60).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..80).map(|i| (i as f32 * 0.91).cos()).collect();
        // A 3×4 block of a 6-wide matrix, times the transpose of a 5×4 block.
        let l = View::rows(7, 3, 4, 6);
        let r = View::rows(2, 5, 4, 8).t();
        let want = naive(&a, l, &b, r);
        let mut out = vec![1.0; 3 * 5 + 4];
        let d = View::rows(4, 3, 5, 5);
        gemm(Dst::Slice(&mut out), d, false, &a, l, &b, r);
        assert!(out[..4].iter().all(|&v| v == 1.0), "wrote before the view");
        for (o, w) in out[4..].iter().zip(&want) {
            assert!((o - w).abs() < 1e-5, "{o} vs {w}");
        }
        gemm(Dst::Slice(&mut out), d, true, &a, l, &b, r);
        for (o, w) in out[4..].iter().zip(&want) {
            assert!((o - 2.0 * w).abs() < 1e-5, "accumulate: {o} vs {}", 2.0 * w);
        }
        // An empty inner dimension zeroes the destination, or leaves it when adding.
        let (el, er) = (View::rows(0, 3, 0, 1), View::rows(0, 0, 5, 5));
        gemm(Dst::Slice(&mut out), d, true, &a, el, &b, er);
        assert!((out[4] - 2.0 * want[0]).abs() < 1e-5);
        gemm(Dst::Slice(&mut out), d, false, &a, el, &b, er);
        assert!(out[4..].iter().all(|&v| v == 0.0));
        assert_eq!(out[..4], [1.0; 4]);
    }

    #[test]
    fn transpose_matches_indexing_with_and_without_whole_blocks() {
        let src: Vec<f32> = (0..40 * 30).map(|i| i as f32).collect();
        // Block-aligned, ragged on both sides, a strided column step (no blocks),
        // and views smaller than a block.
        for v in [
            View::rows(0, 16, 24, 30),
            View::rows(33, 13, 19, 30),
            View::rows(5, 9, 7, 30).t(),
            View::rows(61, 3, 5, 30),
            View::rows(0, 8, 8, 8),
        ] {
            let mut dst = vec![f32::NAN; v.rows * v.cols + 1];
            transpose(&src, v, &mut dst);
            for i in 0..v.rows {
                for j in 0..v.cols {
                    assert_eq!(
                        dst[j * v.rows + i],
                        src[v.offset + i * v.rs + j * v.cs],
                        "{v:?} ({i}, {j})"
                    );
                }
            }
            assert!(
                dst[v.rows * v.cols].is_nan(),
                "{v:?}: wrote past the view's size"
            );
        }
    }

    #[test]
    #[should_panic(expected = "past its buffer")]
    fn a_view_past_the_buffer_is_refused() {
        let a = vec![0.0; 8];
        let mut out = vec![0.0; 4];
        let l = View::rows(0, 2, 4, 4);
        let r = View::rows(1, 4, 2, 2);
        gemm(
            Dst::Slice(&mut out),
            View::rows(0, 2, 2, 2),
            false,
            &a,
            l,
            &a,
            r,
        );
    }
}

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

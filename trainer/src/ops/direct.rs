//! 3×3 stride-1 convolutions computed directly, without `im2col`: the CPU path
//! of [`Lowering::Direct`](super::conv::Lowering::Direct).
//!
//! A group of images is stacked channel-major on a zero-padded grid of
//! `(H + pad) × (W + pad)` positions per image ([`Plan`]): a zero column ends each
//! row and starts the next, a zero row ends each image and starts the next, so
//! neighbours share their padding. On it, the output pixel `(y, x)` of an image is
//! grid position `q = y·cols + x`, and its nine taps read positions
//! `q + ky·cols + kx`: one flat 1-D correlation per tap, whose inputs are shifted
//! slices of the grid itself. The kernel keeps an 8-channel × 48-position block of
//! the output in 24 AVX-512 registers and adds, for every input channel and tap,
//! three unaligned loads of the input times eight broadcast weights: 24 FMAs for 11
//! loads, no packing, no columns, and stores the block straight into the output
//! with masked stores ([`Sink`]). The grid positions that are not outputs are
//! computed and dropped: 8% of them at 22×22, 17% at 10×10, 36% at 4×4, against
//! `im2col`'s three or nine copies of the input and `gemm`'s packing.
//!
//! * `∂x` is the same correlation of the output gradient, placed on the same grid
//!   at `(2 − pad, 2 − pad)`, with the weight flipped and its channels swapped.
//! * `∂W[o, c, ky, kx] = Σ_q g[o, q] · x[c, q + ky·cols + kx]`, `g` being that same
//!   buffer and `x` the input read [`Plan::lead`] positions earlier: 8 channels × 3
//!   taps of vector partial sums in registers, aligned loads of `g`, summed across
//!   lanes once per group.
//!
//! One thread (best of 20, 48 images, operands in L2; `docs/performance.md`,
//! session 16): the forward at 140–150 GFLOP/s of useful work on 8→16 @46 and
//! 16→16 @22 against `gemm`'s 73–79 for the same products without `im2col`, and
//! `∂W` at 130–136 GFLOP/s. The kernels need AVX-512F, detected at run time; the
//! portable loops below compute the same sums where it is missing (tests only:
//! [`available`] keeps [`Geom::new`](super::conv::Geom::new) on `im2col` there).

#![allow(unsafe_code)]

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::conv::{Geom, Masked, OutGrad, assume_init, image_groups, per_group, with_scratch};
use super::filled;

/// Output channels per register block.
const OB: usize = 8;
/// Positions per register block: three vectors of 16.
const TILE: usize = 48;
/// Lanes of a vector.
const LANES: usize = 16;
/// Floats of one sub-batch's buffers (1 MB, half this machine's L2): images are
/// taken a few at a time so that their grids stay in cache from the stacking
/// through the kernels to the unstacking.
const BATCH_FLOATS: usize = 256 * 1024;
/// Positions of `g` that `∂W` sums per pass over the channels: `g`'s 8-channel
/// block of them (32 KB) stays in L1 while every input channel and kernel row
/// reads it.
const DW_CHUNK: usize = 1024;
/// The smallest padded side the direct kernels take: 4×4 images with padding 1
/// run 1.46–1.91× faster than with `im2col` + `gemm`; 2×2 ones, and 4×4 without
/// padding, 0.6× backward.
const MIN_GRID: usize = 6;

/// Whether the direct kernels run on this CPU: AVX-512F, unless `MODTRAIN_DIRECT=0`
/// asks for `im2col` + `gemm` everywhere (for comparing the two).
pub(super) fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("MODTRAIN_DIRECT").map_or(true, |v| v != "0") && simd())
}

fn simd() -> bool {
    #[cfg(test)]
    if tests::PORTABLE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        static SIMD: OnceLock<bool> = OnceLock::new();
        *SIMD.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether a convolution of `C` into `O` channels on `H × W` images with padding
/// `pad` runs the direct kernels: whole 8-channel output blocks, a padded side of
/// at least [`MIN_GRID`], one image's buffers within a sub-batch, and few channels.
/// Measured per layer against `im2col` + `gemm` (96 images, 2 threads,
/// `tests::timing`, forward / backward): 1.15–1.59× faster at the tiny spec's
/// layers of up to 16 input channels, 1.02–1.12× for 16 → 32 on 22×22, 1.21–1.91×
/// for 32 → 32 with padding; 0.9–1.1× for 32 → 32 on 10×10 without it, and
/// 0.8–1.27× (noisy) for the paper spec's 64–128 channels, which stay with
/// `im2col`.
pub(super) fn suits((c, h, w): (usize, usize, usize), o: usize, pad: usize) -> bool {
    let (hg, wg) = (h + 2 * pad, w + 2 * pad);
    o.is_multiple_of(OB)
        && hg.min(wg) >= MIN_GRID
        && (c + o) * 2 * (h + pad) * (w + pad) <= BATCH_FLOATS
        && (c <= 16 && o <= 32 || pad == 1 && c + o <= 64)
}

/// An image grid: `rows × cols`, row stride `cols`.
#[derive(Debug, Clone, Copy)]
struct Grid {
    rows: usize,
    cols: usize,
}

impl Grid {
    fn len(self) -> usize {
        self.rows * self.cols
    }

    /// The positions a sub-batch of `k` images spans, rounded up to whole tiles.
    fn tiles(self, k: usize) -> usize {
        (k * self.len()).div_ceil(TILE) * TILE
    }

    /// The floats of one channel of `k` stacked images that a correlation over
    /// `tiles(k)` positions reads, `lead` zeros before them included: the taps
    /// reach `2·cols + 2` past the last position.
    fn stride(self, k: usize, lead: usize) -> usize {
        round16(lead + self.tiles(k) + 2 * self.cols + 2)
    }

    /// The nine taps' offsets.
    fn taps(self) -> [usize; 9] {
        std::array::from_fn(|t| t / 3 * self.cols + t % 3)
    }
}

fn round16(n: usize) -> usize {
    n.div_ceil(LANES) * LANES
}

/// One convolution's shapes for the direct kernels.
///
/// Every product runs on one grid of `(H + pad) × (W + pad)` positions per image,
/// its last `pad` columns and rows zero: a zero column ends each row and starts the
/// next, and a zero row ends each image and starts the next, so neighbours share
/// their padding. The input sits at `(pad, pad)` (the forward and `∂W` read it),
/// the output gradient at `(2 − pad, 2 − pad)` (`∂x` reads it, padded by
/// `2 − pad`, and `∂W` sums it against the input `lead` positions earlier). Per
/// image, `(H + 1)·(W + 1)` positions instead of `(H + 2)·(W + 2)`: 92% outputs
/// at 22×22 against 84%, 83% at 10×10 against 69%.
#[derive(Debug, Clone, Copy)]
struct Plan {
    geom: Geom,
    o: usize,
    grid: Grid,
    /// Zeros before the stacked input: `∂W`'s taps reach that far back from the
    /// gradient's first position.
    lead: usize,
    /// Images per sub-batch.
    batch: usize,
}

impl Plan {
    fn new(geom: &Geom, o: usize) -> Self {
        let (p, c) = (geom.pad, geom.c);
        let grid = Grid {
            rows: geom.h + p,
            cols: geom.w + p,
        };
        let per_image = (c + o) * grid.len() + o * geom.ho * geom.wo;
        Plan {
            geom: *geom,
            o,
            grid,
            lead: (2 - p) * (grid.cols + 1),
            batch: (BATCH_FLOATS / per_image).max(1),
        }
    }

    /// `(first, count)` of the sub-batches of `nb` images.
    fn batches(&self, nb: usize) -> impl Iterator<Item = (usize, usize)> + use<> {
        let step = self.batch;
        (0..nb).step_by(step).map(move |i| (i, step.min(nb - i)))
    }

    /// The channel stride of a sub-batch's stacked input.
    fn input_stride(&self, k: usize) -> usize {
        self.grid.stride(k, self.lead)
    }

    /// Stacks images `b..b + k` of `x: [B, C, H, W]` channel-major on the grid,
    /// after [`Plan::lead`] zeros: `xs[c·stride + lead + i·G + (y + pad)·cols + x +
    /// pad]`, zero elsewhere.
    fn stack_input(&self, x: &[f32], b: usize, k: usize, xs: &mut [f32]) {
        let g = &self.geom;
        let plane = g.h * g.w;
        let channels = xs.chunks_exact_mut(self.input_stride(k)).take(g.c);
        for (c, dst) in channels.enumerate() {
            let (lead, dst) = dst.split_at_mut(self.lead);
            lead.fill(0.0);
            place(dst, self.grid, (g.pad, g.pad), (g.h, g.w), k, |i| {
                &x[((b + i) * g.c + c) * plane..][..plane]
            });
        }
    }

    /// The weight `[O, C·9]` as the forward reads it: `[C, 9, O]`.
    fn forward_weight(&self, wt: &[f32]) -> Vec<f32> {
        let (c, o) = (self.geom.c, self.o);
        let mut out = vec![0.0; c * 9 * o];
        for (i, v) in out.iter_mut().enumerate() {
            let (ct, oo) = (i / o, i % o);
            *v = wt[oo * c * 9 + ct];
        }
        out
    }

    /// The weight as `∂x`'s correlation reads it: flipped and transposed, `[O, 9, C]`.
    fn backward_weight(&self, wt: &[f32]) -> Vec<f32> {
        let (c, o) = (self.geom.c, self.o);
        let mut out = vec![0.0; o * 9 * c];
        for (i, v) in out.iter_mut().enumerate() {
            let (oo, t, cc) = (i / (9 * c), i / c % 9, i % c);
            *v = wt[oo * c * 9 + cc * 9 + 8 - t];
        }
        out
    }
}

/// Writes one channel of `k` images stacked on `grid`: image `i`'s `h × w` plane
/// `image(i)` at `(top, left)` of its grid, zeros around it and after the last
/// image to the end of `dst`. Every float is written once: zeroing whole buffers
/// first was 4% of a tiny step.
fn place<'a>(
    dst: &mut [f32],
    grid: Grid,
    (top, left): (usize, usize),
    (h, w): (usize, usize),
    k: usize,
    image: impl Fn(usize) -> &'a [f32],
) {
    assert!(top + h <= grid.rows && left + w <= grid.cols && k * grid.len() <= dst.len());
    let (stacked, tail) = dst.split_at_mut(k * grid.len());
    for (i, img) in stacked.chunks_exact_mut(grid.len()).enumerate() {
        let mut lines = image(i).chunks_exact(w);
        for (r, row) in img.chunks_exact_mut(grid.cols).enumerate() {
            let line = if r >= top { lines.next() } else { None };
            match line {
                Some(line) => {
                    zero_short(&mut row[..left]);
                    copy_line(&mut row[left..left + w], line);
                    zero_short(&mut row[left + w..]);
                }
                None => row.fill(0.0),
            }
        }
    }
    tail.fill(0.0);
}

/// Zeroes a span of a few floats with stores, not a `memset` call.
fn zero_short(span: &mut [f32]) {
    if span.len() <= 4 {
        for v in span {
            *v = 0.0;
        }
    } else {
        span.fill(0.0);
    }
}

/// Where a correlation's outputs go: the `valid.0 × valid.1` positions at the top
/// left of each image's grid, position `(i, r, x)` of channel `ch` to
/// `ptr[ch·chan + i·image + r·row + x]`, inside `len` floats. The other positions
/// are computed and dropped.
#[derive(Debug, Clone, Copy)]
struct Sink {
    ptr: *mut f32,
    len: usize,
    chan: usize,
    image: usize,
    row: usize,
    valid: (usize, usize),
}

/// A run of a vector's lanes bound for consecutive floats: lane `l` (in `mask`) goes
/// to index `at + l` of a channel.
#[derive(Debug, Clone, Copy, Default)]
struct Seg {
    mask: u16,
    at: isize,
}

/// The most runs a vector's 16 positions split into: one per lane, on grids of
/// rows of one or two outputs (at most 4 on the grids [`suits`] takes, whose rows
/// are at least 5 positions).
const MAX_SEGS: usize = LANES;

/// Each of a tile's three vectors as runs of consecutive outputs.
#[derive(Debug, Clone, Copy, Default)]
struct Segs {
    runs: [[Seg; MAX_SEGS]; 3],
    count: [usize; 3],
}

impl Sink {
    /// The runs of every tile of `k` images stacked on `grid`, in order. They
    /// depend on the shapes only, so a group computes them once for all its
    /// sub-batches of `k` images (per tile, they were 5% of a tiny step).
    fn runs(&self, grid: Grid, k: usize) -> Vec<Segs> {
        let (mut i, mut r, mut x) = (0, 0, 0);
        let tiles = grid.tiles(k) / TILE;
        (0..tiles)
            .map(|_| {
                let mut segs = Segs::default();
                for j in 0..3 {
                    let mut prev: Option<usize> = None;
                    for l in 0..LANES {
                        if i < k && r < self.valid.0 && x < self.valid.1 {
                            let idx = i * self.image + r * self.row + x;
                            let n = &mut segs.count[j];
                            if prev.is_some_and(|p| p + 1 == idx) {
                                segs.runs[j][*n - 1].mask |= 1 << l;
                            } else {
                                segs.runs[j][*n] = Seg {
                                    mask: 1 << l,
                                    at: idx as isize - l as isize,
                                };
                                *n += 1;
                            }
                            prev = Some(idx);
                        } else {
                            prev = None;
                        }
                        x += 1;
                        if x == grid.cols {
                            (x, r) = (0, r + 1);
                            if r == grid.rows {
                                (r, i) = (0, i + 1);
                            }
                        }
                    }
                }
                segs
            })
            .collect()
    }

    /// Checks that every output of `k` images and `cout` channels lies inside the
    /// sink: the largest index bounds them all.
    fn check(&self, k: usize, cout: usize) {
        let (rows, cols) = self.valid;
        let last = (cout - 1) * self.chan + (k - 1) * self.image + (rows - 1) * self.row + cols - 1;
        assert!(
            rows > 0 && cols > 0 && cols <= self.row && last < self.len,
            "direct conv: an output past its buffer"
        );
    }
}

/// A group's tile runs, kept while its sub-batches have the same size.
#[derive(Debug, Default)]
struct RunCache {
    k: usize,
    runs: Vec<Segs>,
}

impl RunCache {
    fn get(&mut self, sink: &Sink, grid: Grid, k: usize) -> &[Segs] {
        if self.k != k || self.runs.is_empty() {
            self.runs = sink.runs(grid, k);
            self.k = k;
        }
        &self.runs
    }
}

/// The correlation of a stacked input `inp: [cin, stride]` of `k` images on `grid`
/// with `w: [cin, 9, cout]`, into `out`.
#[allow(clippy::too_many_arguments)]
fn correlate(
    inp: &[f32],
    stride: usize,
    cin: usize,
    w: &[f32],
    cout: usize,
    grid: Grid,
    k: usize,
    out: Sink,
    cache: &mut RunCache,
) {
    let taps = grid.taps();
    out.check(k, cout);
    let runs = cache.get(&out, grid, k);
    for (segs, q) in runs.iter().zip((0..grid.tiles(k)).step_by(TILE)) {
        let mut o0 = 0;
        while o0 < cout {
            let t = Tile {
                inp,
                stride,
                cin,
                w,
                cout,
                o0,
                taps: &taps,
                q,
            };
            if cout - o0 >= OB {
                t.run::<OB>(&out, segs);
                o0 += OB;
            } else {
                t.run::<1>(&out, segs);
                o0 += 1;
            }
        }
    }
}

/// One block of a correlation: output channels `o0..o0 + N`, positions `q..q + TILE`.
struct Tile<'a> {
    inp: &'a [f32],
    stride: usize,
    cin: usize,
    w: &'a [f32],
    cout: usize,
    o0: usize,
    taps: &'a [usize; 9],
    q: usize,
}

impl Tile<'_> {
    /// `Σ_c Σ_t w[(c·9 + t)·cout + o0 + o] · inp[c·stride + q + j + taps[t]]` for
    /// each output channel `o0 + o` and position `q + j`, stored where `segs` say.
    fn run<const N: usize>(&self, out: &Sink, segs: &Segs) {
        assert!(
            self.o0 + N <= self.cout
                && self.w.len() >= self.cin * 9 * self.cout
                && self.inp.len() >= (self.cin - 1) * self.stride + self.q + TILE + self.taps[8],
            "direct conv: a tile reaches past its buffers"
        );
        #[cfg(target_arch = "x86_64")]
        if simd() {
            // SAFETY: AVX-512F is present (`simd`), the bounds above cover every
            // input index, and `Sink::check` checked every output index.
            unsafe { self.avx512::<N>(out, segs) };
            return;
        }
        for o in 0..N {
            let mut acc = [0f32; TILE];
            for c in 0..self.cin {
                for (t, off) in self.taps.iter().enumerate() {
                    let wv = self.w[(c * 9 + t) * self.cout + self.o0 + o];
                    let src = &self.inp[c * self.stride + self.q + off..][..TILE];
                    for (a, v) in acc.iter_mut().zip(src) {
                        *a = wv.mul_add(*v, *a);
                    }
                }
            }
            let base = ((self.o0 + o) * out.chan) as isize;
            for (j, runs) in segs.runs.iter().enumerate() {
                for seg in &runs[..segs.count[j]] {
                    for l in (0..LANES).filter(|l| seg.mask >> l & 1 == 1) {
                        // SAFETY: `Sink::check` checked the index.
                        unsafe { *out.ptr.offset(base + seg.at + l as isize) = acc[LANES * j + l] };
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F must be present, the bounds of [`Tile::run`] hold, and `segs` come
    /// from `out.runs` for this tile, checked by `out.check`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const N: usize>(&self, out: &Sink, segs: &Segs) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 3]; N];
        let (inp, w) = (self.inp.as_ptr(), self.w.as_ptr());
        for c in 0..self.cin {
            // SAFETY (every pointer below): within the bounds `run` checked.
            let ip = unsafe { inp.add(c * self.stride + self.q) };
            let wp = unsafe { w.add(c * 9 * self.cout + self.o0) };
            for (t, &off) in self.taps.iter().enumerate() {
                let v: [__m512; 3] =
                    std::array::from_fn(|j| unsafe { _mm512_loadu_ps(ip.add(off + LANES * j)) });
                for (o, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(unsafe { *wp.add(t * self.cout + o) });
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a = _mm512_fmadd_ps(b, v, *a);
                    }
                }
            }
        }
        for (o, acc) in acc.iter().enumerate() {
            let base = ((self.o0 + o) * out.chan) as isize;
            for (j, a) in acc.iter().enumerate() {
                for seg in &segs.runs[j][..segs.count[j]] {
                    // SAFETY: the masked lanes' indices were checked by
                    // `Sink::check`; the others are not accessed.
                    unsafe {
                        let p = out.ptr.wrapping_offset(base + seg.at);
                        _mm512_mask_storeu_ps(p, seg.mask, *a);
                    }
                }
            }
        }
    }
}

/// `∂W`'s partial sums over positions `q0..q1` (multiples of 16): for each input
/// channel `c`, kernel row `ky`, output channel `o` and column `kx`, the vector
/// `acc[((c·3 + ky)·O + o)·3 + kx] += g[o·gs + q..] · x[c·xs + ky·cols + kx + q..]`.
struct DwChunk<'a> {
    x: &'a [f32],
    xs: usize,
    cin: usize,
    g: &'a [f32],
    gs: usize,
    cout: usize,
    cols: usize,
    q0: usize,
    q1: usize,
}

impl DwChunk<'_> {
    fn run(&self, acc: &mut [[f32; LANES]]) {
        assert!(
            self.q0.is_multiple_of(LANES)
                && self.q1.is_multiple_of(LANES)
                && self.q1 <= self.gs
                && self.g.len() >= self.cout * self.gs
                && self.x.len() >= (self.cin - 1) * self.xs + 2 * self.cols + 2 + self.q1
                && acc.len() >= self.cin * 3 * self.cout * 3,
            "direct conv: a ∂W chunk reaches past its buffers"
        );
        let mut o0 = 0;
        while o0 < self.cout {
            let block = if self.cout - o0 >= OB { OB } else { 1 };
            for c in 0..self.cin {
                for ky in 0..3 {
                    let at = ((c * 3 + ky) * self.cout + o0) * 3;
                    let acc = &mut acc[at..at + block * 3];
                    if block == OB {
                        self.block::<OB>(c, ky, o0, acc);
                    } else {
                        self.block::<1>(c, ky, o0, acc);
                    }
                }
            }
            o0 += block;
        }
    }

    fn block<const N: usize>(&self, c: usize, ky: usize, o0: usize, acc: &mut [[f32; LANES]]) {
        #[cfg(target_arch = "x86_64")]
        if simd() {
            // SAFETY: AVX-512F is present, and `run` checked the bounds.
            unsafe { self.avx512::<N>(c, ky, o0, acc) };
            return;
        }
        let xb = c * self.xs + ky * self.cols;
        for o in 0..N {
            let g = &self.g[(o0 + o) * self.gs..];
            for kx in 0..3 {
                let a = &mut acc[o * 3 + kx];
                for q in (self.q0..self.q1).step_by(LANES) {
                    for l in 0..LANES {
                        a[l] = g[q + l].mul_add(self.x[xb + kx + q + l], a[l]);
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F must be present and the bounds of [`DwChunk::run`] hold.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const N: usize>(
        &self,
        c: usize,
        ky: usize,
        o0: usize,
        acc: &mut [[f32; LANES]],
    ) {
        use std::arch::x86_64::*;
        let ap = acc.as_mut_ptr().cast::<f32>();
        // SAFETY (every pointer below): within the bounds `run` checked.
        let mut a: [[__m512; 3]; N] = std::array::from_fn(|o| {
            std::array::from_fn(|kx| unsafe { _mm512_loadu_ps(ap.add((o * 3 + kx) * LANES)) })
        });
        let xp = unsafe { self.x.as_ptr().add(c * self.xs + ky * self.cols) };
        let gp = unsafe { self.g.as_ptr().add(o0 * self.gs) };
        for q in (self.q0..self.q1).step_by(LANES) {
            let v: [__m512; 3] =
                std::array::from_fn(|kx| unsafe { _mm512_loadu_ps(xp.add(q + kx)) });
            for (o, a) in a.iter_mut().enumerate() {
                let gv = unsafe { _mm512_loadu_ps(gp.add(o * self.gs + q)) };
                for (a, v) in a.iter_mut().zip(v) {
                    *a = _mm512_fmadd_ps(gv, v, *a);
                }
            }
        }
        for (o, a) in a.iter().enumerate() {
            for (kx, a) in a.iter().enumerate() {
                unsafe { _mm512_storeu_ps(ap.add((o * 3 + kx) * LANES), *a) };
            }
        }
    }
}

/// Copies `src` to `dst` (of the same length): a line of 4–46 floats, where a
/// `memcpy` call per line was 9% of a tiny step's samples.
fn copy_line(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "direct conv: line lengths");
    // SAFETY: `dst` is `src.len()` initialised floats.
    unsafe { copy_to(dst.as_mut_ptr(), src) }
}

/// Writes `src` to the `src.len()` floats at `dst`.
///
/// # Safety
/// `dst` must be valid for `src.len()` writes and not overlap `src`.
unsafe fn copy_to(dst: *mut f32, src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX-512F is present; the caller vouches for `dst`.
        unsafe { copy_avx512(dst, src) };
        return;
    }
    // SAFETY: as the caller guarantees.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
}

/// # Safety
/// AVX-512F must be present, and `dst` valid for `src.len()` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_avx512(dst: *mut f32, src: &[f32]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let mut i = 0;
    // SAFETY (the loads and stores): inside `src` and `dst`'s `n` floats.
    while i + LANES <= n {
        unsafe { _mm512_storeu_ps(dst.add(i), _mm512_loadu_ps(src.as_ptr().add(i))) };
        i += LANES;
    }
    if i < n {
        let mask: __mmask16 = (1u16 << (n - i)) - 1;
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
            _mm512_mask_storeu_ps(dst.add(i), mask, v);
        }
    }
}

/// A 64-byte-aligned run of `len` floats at the start of `buf`'s aligned part, and
/// the rest after it.
fn take_aligned(buf: &mut [f32], len: usize) -> (&mut [f32], &mut [f32]) {
    let skip = buf.as_ptr().align_offset(64).min(buf.len());
    buf[skip..].split_at_mut(len)
}

/// Scratch floats for `parts` aligned buffers of these lengths.
fn scratch_len(parts: &[usize]) -> usize {
    parts.iter().map(|p| p + LANES).sum()
}

/// An output that the image groups write in disjoint blocks.
struct SharedPtr(*mut f32, usize);

// SAFETY: written only at the indices of each group's own images (`forward`), while
// the buffer stays exclusively borrowed by `filled`'s closure.
unsafe impl Sync for SharedPtr {}

/// The convolution of `x: [B, C, H, W]` with `wt: [O, C·9]`, channel-major
/// `[O, B, Ho, Wo]`.
pub(super) fn forward(geom: &Geom, x: &[f32], wt: &[f32], o: usize) -> Vec<f32> {
    let plan = Plan::new(geom, o);
    let wk = plan.forward_weight(wt);
    let (grid, n, bn) = (plan.grid, geom.ho * geom.wo, geom.b * geom.ho * geom.wo);
    let fill = |y: &mut [MaybeUninit<f32>]| {
        let out = SharedPtr(y.as_mut_ptr().cast(), y.len());
        image_groups(geom.b).into_par_iter().for_each(|(b0, nb)| {
            let out = &out;
            let mut cache = RunCache::default();
            for (i0, k) in plan.batches(nb) {
                let xs_len = geom.c * plan.input_stride(k);
                with_scratch(scratch_len(&[xs_len]), |buf| {
                    let (xs, _) = take_aligned(buf, xs_len);
                    plan.stack_input(x, b0 + i0, k, xs);
                    let at = (b0 + i0) * n;
                    let sink = Sink {
                        // In bounds: `at` is an image of this output.
                        ptr: out.0.wrapping_add(at),
                        len: out.1 - at,
                        chan: bn,
                        image: n,
                        row: geom.wo,
                        valid: (geom.ho, geom.wo),
                    };
                    correlate(
                        &xs[plan.lead..],
                        plan.input_stride(k),
                        geom.c,
                        &wk,
                        o,
                        grid,
                        k,
                        sink,
                        &mut cache,
                    );
                });
            }
        });
    };
    // SAFETY: the groups partition the images, and every group writes all `O`
    // channels of every output row of its images.
    unsafe { filled(o * bn, fill) }
}

/// The backward from `x: [B, C, H, W]`, `wt: [O, C·9]` and the output gradient `g`
/// (channel-major `[O, B, Ho, Wo]`): `∂W: [O, C·9]`, and `∂x: [B, C, H, W]` (plus
/// `then_add`) when `with_dx`.
pub(super) fn backward(
    geom: &Geom,
    x: &[f32],
    wt: &[f32],
    g: OutGrad,
    o: usize,
    with_dx: bool,
    then_add: Option<Masked>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let plan = Plan::new(geom, o);
    let wd = plan.backward_weight(wt);
    let (c, image, n) = (geom.c, geom.c * geom.h * geom.w, geom.ho * geom.wo);
    let (grid, pad) = (plan.grid, geom.pad);
    let groups = image_groups(geom.b);
    let group = |(b0, nb): (usize, usize), dx: &mut [MaybeUninit<f32>]| {
        let mut acc = vec![[0f32; LANES]; c * 3 * o * 3];
        let mut cache = RunCache::default();
        for (i0, k) in plan.batches(nb) {
            let (stride, gs) = (plan.input_stride(k), grid.stride(k, 0));
            let gk_len = if matches!(g, OutGrad::Rows(_)) {
                o * k * n
            } else {
                0
            };
            let parts = [c * stride, gk_len, o * gs];
            with_scratch(scratch_len(&parts), |buf| {
                let (xs, rest) = take_aligned(buf, c * stride);
                let (gk, rest) = take_aligned(rest, gk_len);
                let (gp, _) = take_aligned(rest, o * gs);
                plan.stack_input(x, b0 + i0, k, xs);
                // This sub-batch's `g`, `[O, k·Ho·Wo]` in a buffer of channel stride
                // `src_stride` from `g0`, on the grid at `(2 − pad, 2 − pad)`.
                let first = (b0 + i0) * n;
                let (src, src_stride, g0): (&[f32], usize, usize) = match g {
                    OutGrad::Dense(g) => (g, geom.b * n, first),
                    OutGrad::Rows(fill) => {
                        for (ch, dst) in gk.chunks_exact_mut(k * n).enumerate() {
                            fill(ch, first, dst);
                        }
                        (gk, k * n, 0)
                    }
                };
                let at = (2 - pad, 2 - pad);
                for (ch, dst) in gp.chunks_exact_mut(gs).enumerate() {
                    let plane = |i: usize| &src[ch * src_stride + g0 + i * n..][..n];
                    place(dst, grid, at, (geom.ho, geom.wo), k, plane);
                }
                // ∂W: the gradient at position q times the input `lead` positions
                // earlier, shifted by each tap.
                let positions = round16(k * grid.len());
                for q0 in (0..positions).step_by(DW_CHUNK) {
                    DwChunk {
                        x: xs,
                        xs: stride,
                        cin: c,
                        g: gp,
                        gs,
                        cout: o,
                        cols: grid.cols,
                        q0,
                        q1: (q0 + DW_CHUNK).min(positions),
                    }
                    .run(&mut acc);
                }
                if with_dx {
                    let at = i0 * image;
                    let sink = Sink {
                        ptr: dx[at..].as_mut_ptr().cast(),
                        len: dx.len() - at,
                        chan: geom.h * geom.w,
                        image,
                        row: geom.w,
                        valid: (geom.h, geom.w),
                    };
                    correlate(gp, gs, o, &wd, c, grid, k, sink, &mut cache);
                    for i in 0..k {
                        // SAFETY: the correlation wrote every element of the image.
                        let dst = unsafe { assume_init(&mut dx[(i0 + i) * image..][..image]) };
                        if let Some(add) = then_add {
                            add.add_to(dst, (b0 + i0 + i) * image);
                        }
                    }
                }
            });
        }
        acc
    };
    // SAFETY: each group writes every element of each of its images (the
    // correlation into `∂x`).
    let (parts, dx) = unsafe { per_group(&groups, image, with_dx, group) };
    // Σ over the lanes and the groups, into the weight's `[O, C·9]`.
    let mut dw = vec![0f32; o * c * 9];
    for part in parts {
        for (i, v) in part.iter().enumerate() {
            let (cky, oo, kx) = (i / (3 * o), i / 3 % o, i % 3);
            dw[oo * c * 9 + cky * 3 + kx] += v.iter().sum::<f32>();
        }
    }
    (dw, dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::{CHUNK_FLOATS, Lowering};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    /// Set, the kernels take their portable loops (other tests running meanwhile
    /// get the same sums, more slowly).
    pub(super) static PORTABLE: AtomicBool = AtomicBool::new(false);

    /// The AVX-512 kernels and the portable loops give the same bits: forward,
    /// `∂W`, and `∂x` with a masked gradient added, on grids of 3 to 24 positions a
    /// side with 1 to 16 output channels (blocks of 8 and single channels), images
    /// stacked, one per sub-batch (48×48), and outputs split into many runs per
    /// vector.
    #[test]
    fn simd_and_portable_kernels_agree() {
        if !simd() {
            eprintln!("no AVX-512 here: the portable loops are what every test runs");
            return;
        }
        let vec = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        for (b, c, o, h, w, pad) in [
            (5, 3, 8, 12, 11, 0),
            (4, 8, 16, 22, 22, 1),
            (3, 5, 9, 6, 7, 1),
            (7, 4, 3, 1, 1, 1),
            (30, 2, 8, 4, 4, 1),
            (3, 16, 16, 48, 48, 1),
        ] {
            let geom =
                Geom::lowered((b, c, h, w), pad, CHUNK_FLOATS, Lowering::Direct).expect("geom");
            let (x, wt) = (vec(b * c * h * w, 1), vec(o * c * 9, 2));
            let g = vec(o * b * geom.ho * geom.wo, 3);
            let (y, gy) = (vec(b * c * h * w, 4), vec(b * c * h * w, 5));
            let add = Masked {
                y: &y,
                g: &gy,
                relu: true,
            };
            let run = || {
                let out = forward(&geom, &x, &wt, o);
                let (dw, dx) = backward(&geom, &x, &wt, OutGrad::Dense(&g), o, true, Some(add));
                (out, dw, dx)
            };
            let fast = run();
            PORTABLE.store(true, Ordering::Relaxed);
            let slow = run();
            PORTABLE.store(false, Ordering::Relaxed);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let case = format!("{b}×{c}→{o} {h}×{w} pad {pad}");
            assert_eq!(bits(&fast.0), bits(&slow.0), "{case}: forward");
            assert_eq!(bits(&fast.1), bits(&slow.1), "{case}: ∂W");
            let (fx, sx) = (fast.2.expect("dx"), slow.2.expect("dx"));
            assert_eq!(bits(&fx), bits(&sx), "{case}: ∂x");
        }
    }

    /// `im2col` + `gemm` against the direct kernels (forward, and backward with
    /// `∂x` except for 3-channel inputs) for each layer shape of the tiny spec at
    /// 48×48 and the paper spec at 64×64, timed in turn on 2 threads, best of 7;
    /// in brackets what `Geom::new` chooses (`cargo test --release -p
    /// modkit-trainer --lib direct::tests::timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn timing() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        pool.install(|| {
            for (c, o, h, pad) in [
                (3, 8, 48, 0),
                (8, 16, 46, 0),
                (16, 16, 22, 1),
                (16, 32, 22, 0),
                (32, 32, 10, 1),
                (32, 32, 10, 0),
                (32, 32, 4, 1),
                (32, 32, 4, 0),
                (32, 32, 2, 1),
                (3, 32, 64, 0),
                (32, 64, 31, 0),
                (64, 64, 30, 1),
                (64, 64, 14, 1),
                (64, 128, 14, 0),
                (128, 128, 6, 1),
            ] {
                let chosen = if suits((c, h, h), o, pad) { "direct" } else { "im2col" };
                let b = 96;
                let x: Vec<f32> = (0..b * c * h * h).map(|i| (i % 13) as f32 * 0.1 - 0.5).collect();
                let wt: Vec<f32> = (0..o * c * 9).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
                let by_columns = Geom::lowered_by_columns((b, c, h, h), o, pad, CHUNK_FLOATS).expect("geom");
                let direct = Geom::lowered((b, c, h, h), pad, CHUNK_FLOATS, Lowering::Direct).expect("geom");
                let g: Vec<f32> = (0..o * b * direct.ho * direct.wo).map(|i| (i % 11) as f32 * 0.1 - 0.5).collect();
                let mut best = [[f64::MAX; 2]; 2];
                for _ in 0..7 {
                    for (j, geom) in [&by_columns, &direct].into_iter().enumerate() {
                        let t = Instant::now();
                        let y = geom.forward(&x, &wt, o);
                        best[j][0] = best[j][0].min(t.elapsed().as_secs_f64());
                        let t = Instant::now();
                        let dense = OutGrad::Dense(&g);
                        // The direct backward itself, also where `Geom` would not
                        // choose it.
                        let r = if j == 0 {
                            geom.backward(&x, &wt, dense, o, c > 3, None)
                        } else {
                            backward(geom, &x, &wt, dense, o, c > 3, None)
                        };
                        best[j][1] = best[j][1].min(t.elapsed().as_secs_f64());
                        std::hint::black_box((y, r));
                    }
                }
                println!(
                    "{c}->{o} @{h} p{pad} ({chosen}): forward {:.3} -> {:.3} ms ({:.2}x), backward {:.3} -> {:.3} ms ({:.2}x)",
                    best[0][0] * 1e3, best[1][0] * 1e3, best[0][0] / best[1][0],
                    best[0][1] * 1e3, best[1][1] * 1e3, best[0][1] / best[1][1],
                );
            }
        });
    }
}

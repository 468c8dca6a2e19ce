//! 3×3 stride-1 convolutions computed directly, without `im2col`: the CPU path
//! of [`Lowering::Direct`](super::conv::Lowering::Direct).
//!
//! A group of images is stacked channel-major on a zero-padded grid of
//! `(H + pad) × (W + pad)` positions per image ([`Plan`]): a zero column ends each
//! row and starts the next, a zero row ends each image and starts the next, so
//! neighbours share their padding. On it, the output pixel `(y, x)` of an image is
//! grid position `q = y·cols + x`, and its nine taps read positions
//! `q + ky·cols + kx`: one flat 1-D correlation per tap, whose inputs are shifted
//! slices of the grid itself. The AVX-512 kernel keeps an 8-channel × 48-position
//! block of the output in 24 registers and adds, for every input channel and tap,
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
//! `∂W` at 130–136 GFLOP/s. The kernels need AVX-512F or AVX2 with FMA, detected
//! at run time ([`Isa`]). With AVX2's 16 registers a block is 4 channels × 24
//! positions ([`fma_4x3`]); operands in cache, it runs at ~81% of the FMA peak
//! forward and ~77% for `∂W` (`tests::kernel_efficiency`), about as near it as
//! `gemm`'s own AVX2 kernels, so on AVX2 [`rule`] gives it only the layers whose
//! `im2col` costs most against their product. The portable loops below compute
//! the same sums, bit for bit, where neither is present (tests only: [`available`]
//! keeps [`Geom::new`](super::conv::Geom::new) on `im2col` there).

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
/// Floats of one sub-batch's buffers where the L2 size is unknown (1 MB): images
/// are taken a few at a time so that their grids stay in cache from the stacking
/// through the kernels to the unstacking ([`batch_floats`]).
const BATCH_FLOATS: usize = 256 * 1024;
/// Positions of `g` that `∂W` sums per pass over the channels: `g`'s 8-channel
/// block of them (32 KB) stays in L1 while every input channel and kernel row
/// reads it.
const DW_CHUNK: usize = 1024;
/// The smallest padded side the direct kernels take: 4×4 images with padding 1
/// run 1.46–1.91× faster than with `im2col` + `gemm`; 2×2 ones, and 4×4 without
/// padding, 0.6× backward.
const MIN_GRID: usize = 6;

/// Whether the direct kernels run on this CPU: AVX-512F, or AVX2 with FMA, unless
/// `MODTRAIN_DIRECT=0` asks for `im2col` + `gemm` everywhere (for comparing the
/// two).
pub(super) fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MODTRAIN_DIRECT").map_or(true, |v| v != "0") && detected().is_some()
    })
}

/// The vector instructions the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    /// 16 lanes, 32 registers, masked stores.
    Avx512,
    /// 8 lanes, 16 registers (a 16-lane vector of the layout is two of them).
    Avx2,
}

/// The best [`Isa`] of this CPU.
fn detected() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        static SIMD: OnceLock<Option<Isa>> = OnceLock::new();
        *SIMD.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                Some(Isa::Avx512)
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                Some(Isa::Avx2)
            } else {
                None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// The [`Isa`] the kernels take now: [`detected`], unless a test asks for the
/// portable loops or for AVX2 on an AVX-512 machine.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn simd() -> Option<Isa> {
    #[cfg(test)]
    match tests::FORCE.load(std::sync::atomic::Ordering::Relaxed) {
        tests::PORTABLE => return None,
        tests::AVX2 => return detected().map(|_| Isa::Avx2),
        _ => {}
    }
    detected()
}

/// Floats of one sub-batch's buffers: half of this core's L2 cache, read from
/// Linux's sysfs (1 MB on the AVX-512 Xeon the kernels were tuned on, whose L2 is
/// 2 MB; 256 KB on a 512 KB-L2 AMD EPYC, where 1 MB sub-batches made the tiny step
/// with every narrow layer direct 8% slower), [`BATCH_FLOATS`] where it is not
/// there.
fn batch_floats() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        l2_bytes().map_or(BATCH_FLOATS, |b| (b / 2 / 4).clamp(16 * 1024, BATCH_FLOATS))
    })
}

/// The size of the first CPU's L2 data cache, from `/sys/devices/system/cpu`.
fn l2_bytes() -> Option<usize> {
    let base = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..8).find_map(|i| {
        let read = |f: &str| std::fs::read_to_string(base.join(format!("index{i}/{f}")));
        let level = read("level").ok()?;
        let kind = read("type").ok()?;
        if level.trim() != "2" || kind.trim() == "Instruction" {
            return None;
        }
        parse_size(read("size").ok()?.trim())
    })
}

/// `512K`, `2048K`, `1M` or plain bytes, as sysfs writes a cache's size.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.strip_suffix(['K', 'M']) {
        Some(d) => (d, if s.ends_with('K') { 1 << 10 } else { 1 << 20 }),
        None => (s, 1),
    };
    digits.parse::<usize>().ok().map(|n| n * unit)
}

/// Whether a convolution of `C` into `O` channels on `H × W` images with padding
/// `pad` runs the direct kernels on this CPU: [`rule`] for its [`Isa`] and L2.
pub(super) fn suits((c, h, w): (usize, usize, usize), o: usize, pad: usize) -> bool {
    detected().is_some_and(|isa| rule(isa, batch_floats(), (c, h, w), o, pad))
}

/// The direct kernels' shapes: whole 8-channel output blocks, a padded side of at
/// least [`MIN_GRID`], one image's buffers within a sub-batch of `budget` floats,
/// and few channels, as measured per layer against `im2col` + `gemm` (96 images,
/// 2 threads, `tests::timing` and `modtrain bench-step --layers`, forward /
/// backward):
///
/// * AVX-512 (Intel Xeon, 2 FMA units): 1.15–1.59× faster at the tiny spec's
///   layers of up to 16 input channels, 1.02–1.12× for 16 → 32 on 22×22,
///   1.21–1.91× for 32 → 32 with padding; 0.9–1.1× for 32 → 32 on 10×10 without
///   it, and 0.8–1.27× (noisy) for the paper spec's 64–128 channels, which stay
///   with `im2col`.
/// * AVX2 (AMD EPYC, Zen 3): 1.1–1.8× / 1.1–1.35× for the 3-channel input layer;
///   0.6–1.1× for every wider one, where `gemm`'s AVX2 kernels run as near their
///   peak as these do (82% of it, operands in cache) and the copies they save
///   weigh less than the stores and stacking these add.
fn rule(isa: Isa, budget: usize, (c, h, w): (usize, usize, usize), o: usize, pad: usize) -> bool {
    let (hg, wg) = (h + 2 * pad, w + 2 * pad);
    let fits = o.is_multiple_of(OB)
        && hg.min(wg) >= MIN_GRID
        && (c + o) * 2 * (h + pad) * (w + pad) <= budget;
    fits && match isa {
        Isa::Avx512 => c <= 16 && o <= 32 || pad == 1 && c + o <= 64,
        Isa::Avx2 => c <= 4,
    }
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
            batch: (batch_floats() / per_image).max(1),
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
        match simd() {
            // SAFETY (both): the instructions are present (`simd`), the bounds above
            // cover every input index, and `Sink::check` checked every output index.
            Some(Isa::Avx512) => return unsafe { self.avx512::<N>(out, segs) },
            Some(Isa::Avx2) => {
                for half in 0..2 {
                    if N.is_multiple_of(4) {
                        for o in (0..N).step_by(4) {
                            unsafe { self.avx2::<4>(out, segs, o, half) };
                        }
                    } else {
                        for o in 0..N {
                            unsafe { self.avx2::<1>(out, segs, o, half) };
                        }
                    }
                }
                return;
            }
            None => {}
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

    /// Channels `o0 + o..o0 + o + M` × positions `q + 24·half..q + 24·half + 24`
    /// of [`Tile::run`] with AVX2: 3·M of its 16 registers accumulate, 3 loads of
    /// the input and M broadcasts feed 3·M FMAs ([`fma_4x3`] for 4 channels). Each
    /// lane sums in the same order as the portable loops.
    ///
    /// # Safety
    /// AVX2 and FMA must be present, `o + M ≤ N` of a tile whose bounds
    /// [`Tile::run`] checked, and `segs` come from `out.runs` for this tile, checked
    /// by `out.check`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const M: usize>(&self, out: &Sink, segs: &Segs, o: usize, half: usize) {
        use std::arch::x86_64::*;
        const YMM: usize = LANES / 2;
        let mut acc = [[_mm256_setzero_ps(); 3]; M];
        let (inp, w) = (self.inp.as_ptr(), self.w.as_ptr());
        let (q, o0) = (self.q + half * 3 * YMM, self.o0 + o);
        for c in 0..self.cin {
            // SAFETY (every pointer below): within the bounds `run` checked.
            let ip = unsafe { inp.add(c * self.stride + q) };
            let wp = unsafe { w.add(c * 9 * self.cout + o0) };
            for (t, &off) in self.taps.iter().enumerate() {
                let (ip, wp) = unsafe { (ip.add(off), wp.add(t * self.cout)) };
                if M == 4 {
                    // SAFETY: `acc` is `[[__m256; 3]; 4]` here; `ip` has 24 floats
                    // and `wp` 4 inside the bounds.
                    unsafe { fma_4x3(&mut *acc.as_mut_ptr().cast::<[[__m256; 3]; 4]>(), ip, wp) };
                    continue;
                }
                let v: [__m256; 3] =
                    std::array::from_fn(|j| unsafe { _mm256_loadu_ps(ip.add(YMM * j)) });
                for (o, acc) in acc.iter_mut().enumerate() {
                    let b = _mm256_set1_ps(unsafe { *wp.add(o) });
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a = _mm256_fmadd_ps(b, v, *a);
                    }
                }
            }
        }
        let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (o, acc) in acc.iter().enumerate() {
            let base = ((o0 + o) * out.chan) as isize;
            for (m, a) in acc.iter().enumerate() {
                // The 16-lane vector and its half this register holds.
                let (j, lo) = ((3 * half + m) / 2, (3 * half + m) % 2 * YMM);
                for seg in &segs.runs[j][..segs.count[j]] {
                    let bits = (seg.mask >> lo) & 0xff;
                    let p = out.ptr.wrapping_offset(base + seg.at + lo as isize);
                    // SAFETY: the set lanes' indices were checked by `Sink::check`;
                    // the others are not accessed.
                    if bits == 0xff {
                        unsafe { _mm256_storeu_ps(p, *a) };
                    } else if bits != 0 {
                        let set = _mm256_and_si256(_mm256_set1_epi32(i32::from(bits)), lane_bits);
                        let mask = _mm256_cmpeq_epi32(set, lane_bits);
                        unsafe { _mm256_maskstore_ps(p, mask, *a) };
                    }
                }
            }
        }
    }
}

/// `acc[o][j] += wp[o] · ip[8·j..8·j + 8]` for 4 channels × 3 vectors: the 16
/// registers of AVX2 exactly, written out because LLVM, given the intrinsics,
/// hoisted the next taps' broadcasts and spilled the sums to the stack (the kernel
/// ran at a third of the FMA peak).
///
/// # Safety
/// AVX2 and FMA must be present, `ip` valid for 24 reads and `wp` for 4.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn fma_4x3(acc: &mut [[std::arch::x86_64::__m256; 3]; 4], ip: *const f32, wp: *const f32) {
    let [[a0, a1, a2], [a3, a4, a5], [a6, a7, a8], [a9, a10, a11]] = acc;
    // SAFETY: as the caller guarantees; the block reads 24 floats at `ip` and 4 at
    // `wp`, and writes only the registers it names.
    unsafe {
        std::arch::asm!(
            "vmovups {v0}, [{ip}]",
            "vmovups {v1}, [{ip} + 32]",
            "vmovups {v2}, [{ip} + 64]",
            "vbroadcastss {b}, dword ptr [{wp}]",
            "vfmadd231ps {a0}, {b}, {v0}",
            "vfmadd231ps {a1}, {b}, {v1}",
            "vfmadd231ps {a2}, {b}, {v2}",
            "vbroadcastss {b}, dword ptr [{wp} + 4]",
            "vfmadd231ps {a3}, {b}, {v0}",
            "vfmadd231ps {a4}, {b}, {v1}",
            "vfmadd231ps {a5}, {b}, {v2}",
            "vbroadcastss {b}, dword ptr [{wp} + 8]",
            "vfmadd231ps {a6}, {b}, {v0}",
            "vfmadd231ps {a7}, {b}, {v1}",
            "vfmadd231ps {a8}, {b}, {v2}",
            "vbroadcastss {b}, dword ptr [{wp} + 12]",
            "vfmadd231ps {a9}, {b}, {v0}",
            "vfmadd231ps {a10}, {b}, {v1}",
            "vfmadd231ps {a11}, {b}, {v2}",
            ip = in(reg) ip,
            wp = in(reg) wp,
            v0 = out(ymm_reg) _,
            v1 = out(ymm_reg) _,
            v2 = out(ymm_reg) _,
            b = out(ymm_reg) _,
            a0 = inout(ymm_reg) *a0,
            a1 = inout(ymm_reg) *a1,
            a2 = inout(ymm_reg) *a2,
            a3 = inout(ymm_reg) *a3,
            a4 = inout(ymm_reg) *a4,
            a5 = inout(ymm_reg) *a5,
            a6 = inout(ymm_reg) *a6,
            a7 = inout(ymm_reg) *a7,
            a8 = inout(ymm_reg) *a8,
            a9 = inout(ymm_reg) *a9,
            a10 = inout(ymm_reg) *a10,
            a11 = inout(ymm_reg) *a11,
            options(nostack, readonly, preserves_flags),
        );
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
        match simd() {
            // SAFETY (both): the instructions are present, and `run` checked the
            // bounds.
            Some(Isa::Avx512) => return unsafe { self.avx512::<N>(c, ky, o0, acc) },
            Some(Isa::Avx2) => {
                if N.is_multiple_of(4) {
                    for o in (0..N).step_by(4) {
                        unsafe { self.avx2::<4>(c, ky, o0 + o, &mut acc[o * 3..]) };
                    }
                } else {
                    for o in 0..N {
                        unsafe { self.avx2::<1>(c, ky, o0 + o, &mut acc[o * 3..]) };
                    }
                }
                return;
            }
            None => {}
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

    /// [`DwChunk::block`] for `M` output channels from `o0` with AVX2: each half of
    /// the 16 lanes in turn, 3·M registers of sums, 3 loads of the input and `M` of
    /// the gradient per 3·M FMAs. Each lane sums in the same order as the portable
    /// loops.
    ///
    /// # Safety
    /// AVX2 and FMA must be present, the bounds of [`DwChunk::run`] hold, `o0 + M ≤
    /// cout`, and `acc` holds at least `3·M` sums.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const M: usize>(
        &self,
        c: usize,
        ky: usize,
        o0: usize,
        acc: &mut [[f32; LANES]],
    ) {
        use std::arch::x86_64::*;
        const YMM: usize = LANES / 2;
        assert!(acc.len() >= 3 * M);
        let ap = acc.as_mut_ptr().cast::<f32>();
        // SAFETY (every pointer below): within the bounds `run` checked.
        let xp = unsafe { self.x.as_ptr().add(c * self.xs + ky * self.cols) };
        let gp = unsafe { self.g.as_ptr().add(o0 * self.gs) };
        for lo in [0, YMM] {
            let mut a: [[__m256; 3]; M] = std::array::from_fn(|o| {
                std::array::from_fn(|kx| unsafe {
                    _mm256_loadu_ps(ap.add((o * 3 + kx) * LANES + lo))
                })
            });
            for q in (self.q0 + lo..self.q1).step_by(LANES) {
                let v: [__m256; 3] =
                    std::array::from_fn(|kx| unsafe { _mm256_loadu_ps(xp.add(q + kx)) });
                for (o, a) in a.iter_mut().enumerate() {
                    let gv = unsafe { _mm256_loadu_ps(gp.add(o * self.gs + q)) };
                    for (a, v) in a.iter_mut().zip(v) {
                        *a = _mm256_fmadd_ps(gv, v, *a);
                    }
                }
            }
            for (o, a) in a.iter().enumerate() {
                for (kx, a) in a.iter().enumerate() {
                    unsafe { _mm256_storeu_ps(ap.add((o * 3 + kx) * LANES + lo), *a) };
                }
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
    match simd() {
        // SAFETY (both): the instructions are present; the caller vouches for `dst`.
        Some(Isa::Avx512) => return unsafe { copy_avx512(dst, src) },
        Some(Isa::Avx2) => return unsafe { copy_avx2(dst, src) },
        None => {}
    }
    // SAFETY: as the caller guarantees.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
}

/// # Safety
/// AVX must be present, and `dst` valid for `src.len()` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn copy_avx2(dst: *mut f32, src: &[f32]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let mut i = 0;
    // SAFETY (the loads and stores): inside `src` and `dst`'s `n` floats.
    while i + 8 <= n {
        unsafe { _mm256_storeu_ps(dst.add(i), _mm256_loadu_ps(src.as_ptr().add(i))) };
        i += 8;
    }
    while i < n {
        unsafe { *dst.add(i) = src[i] };
        i += 1;
    }
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
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::time::Instant;

    /// Which kernels [`simd`] picks: [`NATIVE`], [`PORTABLE`] or [`AVX2`] (other
    /// tests running meanwhile get the same sums, more slowly or not).
    pub(super) static FORCE: AtomicU8 = AtomicU8::new(NATIVE);
    /// The best this CPU has.
    pub(super) const NATIVE: u8 = 0;
    /// The portable loops.
    pub(super) const PORTABLE: u8 = 1;
    /// The AVX2 kernels, also where AVX-512 is present.
    pub(super) const AVX2: u8 = 2;

    /// The AVX-512 and AVX2 kernels (where this CPU has them) and the portable
    /// loops give the same bits: forward, `∂W`, and `∂x` with a masked gradient
    /// added, on grids of 3 to 24 positions a side with 1 to 16 output channels
    /// (blocks of 8 and single channels), images stacked, one per sub-batch
    /// (48×48), and outputs split into many runs per vector.
    #[test]
    fn simd_and_portable_kernels_agree() {
        let Some(native) = detected() else {
            eprintln!("no AVX2 or AVX-512 here: the portable loops are what every test runs");
            return;
        };
        let vec = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let mut kernels = vec![(NATIVE, format!("{native:?}"))];
        if native == Isa::Avx512 {
            kernels.push((AVX2, "Avx2".into()));
        }
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
            let run = |kernels: u8| {
                FORCE.store(kernels, Ordering::Relaxed);
                let out = forward(&geom, &x, &wt, o);
                let (dw, dx) = backward(&geom, &x, &wt, OutGrad::Dense(&g), o, true, Some(add));
                FORCE.store(NATIVE, Ordering::Relaxed);
                (out, dw, dx.expect("dx"))
            };
            let slow = run(PORTABLE);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for (force, name) in &kernels {
                let fast = run(*force);
                let case = format!("{name}, {b}×{c}→{o} {h}×{w} pad {pad}");
                assert_eq!(bits(&fast.0), bits(&slow.0), "{case}: forward");
                assert_eq!(bits(&fast.1), bits(&slow.1), "{case}: ∂W");
                assert_eq!(bits(&fast.2), bits(&slow.2), "{case}: ∂x");
            }
        }
    }

    /// Which layers take the direct kernels per [`Isa`], as measured (see
    /// [`rule`]): on AVX-512 the tiny spec's layers of up to 16 input channels into
    /// 32 and its padded 32-channel ones; on AVX2 the 3-channel input layer only;
    /// never 32 → 32 unpadded, 2×2 images, outputs of 12 channels, or an image past
    /// the sub-batch.
    #[test]
    fn the_rule_follows_the_measurements() {
        const MB: usize = 256 * 1024;
        for ((c, o, h, pad), avx512, avx2) in [
            ((3, 8, 48, 0), true, true),
            ((8, 16, 46, 0), true, false),
            ((16, 16, 22, 1), true, false),
            ((16, 32, 22, 0), true, false),
            ((32, 32, 10, 1), true, false),
            ((32, 32, 10, 0), false, false),
            ((32, 32, 4, 1), true, false),
            ((32, 32, 4, 0), false, false),
            ((32, 32, 2, 1), false, false),
            ((64, 64, 14, 1), false, false),
            ((8, 12, 22, 1), false, false),
            ((3, 32, 64, 0), false, false),
        ] {
            let shape = (c, h, h);
            assert_eq!(
                rule(Isa::Avx512, MB, shape, o, pad),
                avx512,
                "AVX-512 {c}→{o} @{h}"
            );
            assert_eq!(
                rule(Isa::Avx2, MB, shape, o, pad),
                avx2,
                "AVX2 {c}→{o} @{h}"
            );
        }
        // A 512 KB L2 (sub-batches of 256 KB) leaves out 8 → 16 @46, whose one
        // image needs 397 KB, and keeps the input layer's 198 KB.
        assert!(!rule(Isa::Avx512, MB / 4, (8, 46, 46), 16, 0));
        assert!(rule(Isa::Avx2, MB / 4, (3, 48, 48), 8, 0));
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("big"), None);
    }

    /// `im2col` + `gemm` against the direct kernels (forward, and backward with
    /// `∂x` except for 3-channel inputs) for each layer shape of the tiny spec at
    /// 48×48 and the paper spec at 64×64, timed in turn on 2 threads, best of 7;
    /// in brackets what `Geom::new` chooses (`cargo test --release -p
    /// modkit-trainer --lib direct::tests::timing -- --ignored --nocapture`; env
    /// `REPS` for best of more, `TINY=1` for the tiny spec's shapes only).
    #[test]
    #[ignore]
    fn timing() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let reps: usize = std::env::var("REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(7);
        let only_tiny = std::env::var("TINY").is_ok();
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
                if only_tiny && c + o > 64 {
                    continue;
                }
                let chosen = if suits((c, h, h), o, pad) { "direct" } else { "im2col" };
                let b = 96;
                let x: Vec<f32> = (0..b * c * h * h).map(|i| (i % 13) as f32 * 0.1 - 0.5).collect();
                let wt: Vec<f32> = (0..o * c * 9).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
                let by_columns = Geom::lowered_by_columns((b, c, h, h), o, pad, CHUNK_FLOATS).expect("geom");
                let direct = Geom::lowered((b, c, h, h), pad, CHUNK_FLOATS, Lowering::Direct).expect("geom");
                let g: Vec<f32> = (0..o * b * direct.ho * direct.wo).map(|i| (i % 11) as f32 * 0.1 - 0.5).collect();
                let mut best = [[f64::MAX; 2]; 2];
                for _ in 0..reps {
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

    /// The kernels alone against the FMA peak, one thread, operands in cache: the
    /// forward correlation and the `∂W` sums of 16 → 16 channels on 22×22 images
    /// (grids of 23×23, all positions counted), and a loop of 12 independent
    /// register FMAs for the peak, timed in turn, best of 300 (`cargo test
    /// --release -p modkit-trainer --lib direct::tests::kernel_efficiency --
    /// --ignored --nocapture`).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn kernel_efficiency() {
        /// `n` rounds of 12 dependent-free 8-lane FMAs.
        #[target_feature(enable = "avx2,fma")]
        fn fma_peak(n: usize) -> f32 {
            use std::arch::x86_64::*;
            let mut a = [_mm256_set1_ps(0.0); 12];
            let (b, c) = (_mm256_set1_ps(0.999), _mm256_set1_ps(0.001));
            for _ in 0..n {
                for a in a.iter_mut() {
                    *a = _mm256_fmadd_ps(*a, b, c);
                }
            }
            let mut v = [0f32; 8];
            let sum = a
                .iter()
                .fold(_mm256_set1_ps(0.0), |s, a| _mm256_add_ps(s, *a));
            // SAFETY: `v` holds 8 floats.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), sum) };
            v.iter().sum()
        }
        let Some(isa) = detected() else {
            return;
        };
        let (cin, cout, k) = (16, 16, 4);
        let grid = Grid { rows: 23, cols: 23 };
        let stride = grid.stride(k, 0);
        let inp: Vec<f32> = (0..cin * stride).map(|i| (i % 13) as f32 * 0.1).collect();
        let g: Vec<f32> = (0..cout * stride).map(|i| (i % 11) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..cin * 9 * cout).map(|i| (i % 7) as f32 * 0.1).collect();
        let n = 22 * 22;
        let mut out = vec![0f32; cout * k * n];
        let sink = Sink {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            chan: k * n,
            image: n,
            row: 22,
            valid: (22, 22),
        };
        let (mut cache, mut acc) = (RunCache::default(), vec![[0f32; LANES]; cin * 3 * cout * 3]);
        let positions = round16(k * grid.len());
        let mut best = [f64::MAX; 3];
        for _ in 0..300 {
            let t = Instant::now();
            correlate(&inp, stride, cin, &w, cout, grid, k, sink, &mut cache);
            best[0] = best[0].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for q0 in (0..positions).step_by(DW_CHUNK) {
                let q1 = (q0 + DW_CHUNK).min(positions);
                let (x, xs, gs, cols) = (&inp[..], stride, stride, grid.cols);
                DwChunk {
                    x,
                    xs,
                    cin,
                    g: &g,
                    gs,
                    cout,
                    cols,
                    q0,
                    q1,
                }
                .run(&mut acc);
            }
            best[1] = best[1].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            // SAFETY: `detected` found AVX2 and FMA at least.
            std::hint::black_box(unsafe { fma_peak(10_000) });
            best[2] = best[2].min(t.elapsed().as_secs_f64());
        }
        let gflops = |flops: usize, s: f64| flops as f64 / s / 1e9;
        let peak = gflops(10_000 * 12 * 16, best[2]);
        let fwd = gflops(2 * grid.tiles(k) * cout * cin * 9, best[0]);
        let dw = gflops(2 * positions * cout * cin * 9, best[1]);
        println!(
            "{isa:?}: forward {fwd:.1} GFLOP/s ({:.0}% of the FMA peak), ∂W {dw:.1} ({:.0}%), peak {peak:.1} (AVX2)",
            100.0 * fwd / peak,
            100.0 * dw / peak
        );
    }
}

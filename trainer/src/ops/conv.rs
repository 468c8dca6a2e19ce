//! 3×3 stride-1 convolution on the CPU as `im2col` + GEMM, a few output rows at a
//! time, and on other devices from candle's ops.
//!
//! `im2col` lays patches out as `cols: [C·9, N]`, row `c·9 + ky·3 + kx`, column
//! `b·Ho·Wo + oy·Wo + ox` holding `x[b, c, oy+ky−p, ox+kx−p]` (0 outside); then
//! `y = W · cols` with `W: [O, C·9]`, `∂W = g · colsᵀ` and `∂cols = Wᵀ · g`, which
//! `col2im` (the scatter-add of the same indexing) folds into `∂x`.
//!
//! The columns are 9× the input. Built for the whole batch, they went to memory
//! and back in every conv, twice per step (the backward rebuilt them), and `col2im`
//! read 9× the input again: at the tiny spec, `im2col` and `col2im` were 24% of a
//! training step and their GEMMs ran on cold data. Here the batch is split into a
//! fixed number of groups of images ([`IMAGE_GROUPS`]) that the threads share out,
//! and each group is walked in chunks of whole output rows whose columns fit in
//! the L2 cache ([`CHUNK_FLOATS`]); each chunk is built, multiplied (the `gemm` crate,
//! writing straight into the output's block) and dropped before the next. No
//! columns outlive a chunk, so the backward's memory is the gradients alone.
//!
//! Where the columns outweigh the output (few input channels per output channel,
//! the tiny spec's layers), a chunk is lowered by kernel rows instead
//! ([`Lowering::Rows`]): columns of the three horizontal taps over the chunk's
//! input lines, `[C·3, (rows + 2)·Wo]`, serve all three kernel rows as views
//! shifted by one line each, so three GEMMs with `K = C·3` replace one with
//! `K = C·9` and `im2col`/`col2im` move a third as much.
//!
//! Off the CPU ([`conv3x3_generic`]), the output is candle's own `conv2d` and the
//! backward is built from candle's tensor ops, so it runs on any device.

use std::borrow::Cow;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::batchnorm::relu_mask;
use super::direct;
use super::gemm::{Dst, SharedOut, View, gemm, transpose};
use super::{contiguous, filled, with_slice};

/// Floats of one chunk's columns: 256 KB, a quarter of this machine's L2, so that
/// the columns, the GEMM's packed blocks and the output block stay in cache.
pub(super) const CHUNK_FLOATS: usize = 64 * 1024;

/// The fewest output columns in a chunk: with many input channels, a chunk is
/// allowed past [`CHUNK_FLOATS`] so that each GEMM is wide enough to pay for
/// packing the weight.
const MIN_CHUNK_COLS: usize = 256;

/// The fewest output rows of a [`Lowering::Rows`] chunk: each chunk builds the
/// columns of two rows more than it multiplies.
const MIN_ROWS: usize = 4;

/// The fewest output columns of a [`Lowering::Rows`] chunk. Measured down to 4×4
/// images (10×10 and 4×4: 4–15% faster than [`Lowering::Taps`]); smaller images
/// (2×2, 1×1) stay with taps, whose chunks span many images, untimed with rows.
const MIN_ROWS_COLS: usize = 16;

/// The most input channels a [`Lowering::Rows`] layer has. Measured per layer
/// (forward + backward, rows ÷ taps, 96 images, 2 threads): 0.75–0.95 at the tiny
/// spec's 3–32 channels, 1.01–1.02 at 32 → 64 channels (62×62), 0.96–1.18 at 64 and
/// 128 channels, worst on 6×6 images.
const MAX_ROWS_CHANNELS: usize = 32;

fn out_size(n: usize, pad: usize) -> Result<usize> {
    (n + 2 * pad)
        .checked_sub(2)
        .filter(|&o| o > 0)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("3×3 conv on a {n}-pixel side with padding {pad}"))
        })
}

/// How a chunk of output rows becomes columns and GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lowering {
    /// All nine taps: columns `[C·9, rows·Wo]` and one GEMM with the weight. A
    /// chunk may span images, so that small images still make wide GEMMs.
    Taps,
    /// The three horizontal taps only, over the chunk's input lines: columns
    /// `[C·3, (rows + 2)·Wo]`, in which kernel row `ky` reads the same columns
    /// shifted by `ky` lines. The convolution is three GEMMs (`K = C·3`, added up)
    /// on shifted views of one buffer, for a third of the copying (plus two lines
    /// per chunk). A chunk stays inside one image.
    Rows,
    /// No columns: AVX-512 or AVX2 kernels that read the taps as shifted slices
    /// of the zero-padded input ([`super::direct`]). The chunk fields are unused.
    Direct,
}

/// The shape of one convolution, and how its output rows are chunked and lowered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub(super) b: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) pad: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
    /// Output rows (of `wo` pixels) per chunk.
    chunk_rows: usize,
    lowering: Lowering,
}

impl Geom {
    /// The geometry of a convolution of `[B, C, H, W]` into `o` channels with
    /// padding `pad`, lowered as fits its shape. [`Lowering::Rows`] copies a third
    /// as much but runs three GEMMs of a third the depth, adding into the output
    /// twice, so it is used where the copying weighs most: at most
    /// [`MAX_ROWS_CHANNELS`] input channels, the columns outweighing the output
    /// (`O ≤ 4·C`), and images with enough rows ([`MIN_ROWS`]) and pixels
    /// ([`MIN_ROWS_COLS`]) for a chunk's GEMMs.
    pub(super) fn new(
        dims: (usize, usize, usize, usize),
        o: usize,
        pad: usize,
        chunk_floats: usize,
    ) -> Result<Self> {
        if direct::available() && direct::suits((dims.1, dims.2, dims.3), o, pad) {
            return Self::lowered(dims, pad, chunk_floats, Lowering::Direct);
        }
        Self::lowered_by_columns(dims, o, pad, chunk_floats)
    }

    /// The geometry with the `im2col` lowering that fits the shape.
    pub(super) fn lowered_by_columns(
        dims: (usize, usize, usize, usize),
        o: usize,
        pad: usize,
        chunk_floats: usize,
    ) -> Result<Self> {
        let rows = Self::lowered(dims, pad, chunk_floats, Lowering::Rows)?;
        if rows.c <= MAX_ROWS_CHANNELS
            && o <= 4 * rows.c
            && rows.chunk_rows >= MIN_ROWS.min(rows.ho)
            && rows.chunk_rows * rows.wo >= MIN_ROWS_COLS
        {
            Ok(rows)
        } else {
            Self::lowered(dims, pad, chunk_floats, Lowering::Taps)
        }
    }

    /// The geometry with a given lowering.
    pub(super) fn lowered(
        (b, c, h, w): (usize, usize, usize, usize),
        pad: usize,
        chunk_floats: usize,
        lowering: Lowering,
    ) -> Result<Self> {
        if b == 0 || c == 0 {
            candle_core::bail!("conv3x3: empty input [{b}, {c}, {h}, {w}]");
        }
        let (ho, wo) = (out_size(h, pad)?, out_size(w, pad)?);
        let chunk_rows = match lowering {
            Lowering::Taps | Lowering::Direct => {
                let cols = (chunk_floats / (c * 9)).max(MIN_CHUNK_COLS.min(chunk_floats));
                (cols / wo).max(1)
            }
            Lowering::Rows => (chunk_floats / (c * 3 * wo)).saturating_sub(2).clamp(1, ho),
        };
        Ok(Geom {
            b,
            c,
            h,
            w,
            pad,
            ho,
            wo,
            chunk_rows,
            lowering,
        })
    }

    /// Columns of the weight `[O, C·9]`.
    pub(super) fn k(&self) -> usize {
        self.c * 9
    }

    /// Output pixels per image.
    pub(super) fn n(&self) -> usize {
        self.ho * self.wo
    }

    /// Floats of one input image.
    fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Kernel rows the columns hold.
    fn kh(&self) -> usize {
        match self.lowering {
            Lowering::Taps | Lowering::Direct => 3,
            Lowering::Rows => 1,
        }
    }

    /// GEMMs per chunk, one per kernel row the columns do not hold.
    fn passes(&self) -> usize {
        3 / self.kh()
    }

    /// Rows of the columns: the inner dimension of each GEMM.
    fn col_rows(&self) -> usize {
        self.c * 3 * self.kh()
    }

    /// Lines per image that the columns are built for: the output rows, or for
    /// [`Lowering::Rows`] the padded input's rows.
    fn lines(&self) -> usize {
        match self.lowering {
            Lowering::Taps | Lowering::Direct => self.ho,
            Lowering::Rows => self.h + 2 * self.pad,
        }
    }

    /// `(first image, images)` of each group of images ([`image_groups`]).
    fn groups(&self) -> Vec<(usize, usize)> {
        image_groups(self.b)
    }

    /// The chunks of a group of `nb` images: `(first row, rows)`, counting the
    /// output rows of the group's images one after another.
    fn chunks(&self, nb: usize) -> Vec<(usize, usize)> {
        let (ho, step) = (self.ho, self.chunk_rows);
        let spans = |total: usize| {
            (0..total)
                .step_by(step)
                .map(move |r| (r, step.min(total - r)))
        };
        match self.lowering {
            Lowering::Taps | Lowering::Direct => spans(nb * ho).collect(),
            Lowering::Rows => (0..nb)
                .flat_map(|i| spans(ho).map(move |(r, n)| (i * ho + r, n)))
                .collect(),
        }
    }

    /// The lines `(first, count)` whose columns a chunk of output rows needs.
    fn chunk_lines(&self, (r0, rows): (usize, usize)) -> (usize, usize) {
        match self.lowering {
            Lowering::Taps | Lowering::Direct => (r0, rows),
            Lowering::Rows => (r0 / self.ho * self.lines() + r0 % self.ho, rows + 2),
        }
    }

    /// Floats of the largest chunk's columns.
    fn cols_len(&self) -> usize {
        self.col_rows() * self.chunk_lines((0, self.chunk_rows)).1 * self.wo
    }

    /// Row `r` of the columns: channel, kernel row (0 for [`Lowering::Rows`]) and column.
    fn tap(&self, r: usize) -> Tap {
        let taps = 3 * self.kh();
        let (ch, ky, kx) = (r / taps, r % taps / 3, r % 3);
        // The output columns [lo, hi) read inside the input; the rest read padding.
        let lo = self.pad.saturating_sub(kx);
        let hi = self.wo.min((self.w + self.pad).saturating_sub(kx));
        Tap {
            ch,
            ky,
            kx,
            lo,
            hi: hi.max(lo),
        }
    }

    /// For each line of `(first, count)`, where the input line that kernel row
    /// `ky` reads starts in channel 0, or `None` where it reads padding: the
    /// divisions done once per line, not once per line and tap.
    fn line_starts(&self, (l0, count): (usize, usize)) -> Vec<[Option<usize>; 3]> {
        let lines = self.lines();
        let (mut bi, mut oy) = (l0 / lines, l0 % lines);
        (0..count)
            .map(|_| {
                let starts = std::array::from_fn(|ky| {
                    let iy = (oy + ky).checked_sub(self.pad).filter(|&iy| iy < self.h)?;
                    Some((bi * self.c * self.h + iy) * self.w)
                });
                oy += 1;
                if oy == lines {
                    (bi, oy) = (bi + 1, 0);
                }
                starts
            })
            .collect()
    }

    /// Where `tap`'s valid span starts relative to its line's start in channel 0.
    fn tap_shift(&self, tap: &Tap) -> usize {
        tap.ch * self.h * self.w + tap.lo + tap.kx - self.pad
    }

    /// The columns of a chunk of output rows of the images in `x` (a group), into
    /// `cols: [col_rows, lines·Wo]`.
    fn im2col(&self, x: &[f32], chunk: (usize, usize), cols: &mut [f32]) {
        let span = self.chunk_lines(chunk);
        let lines = self.line_starts(span);
        let width = span.1 * self.wo;
        for (r, dst) in cols
            .chunks_exact_mut(width)
            .take(self.col_rows())
            .enumerate()
        {
            let t = self.tap(r);
            let shift = self.tap_shift(&t);
            for (start, line) in lines.iter().zip(dst.chunks_exact_mut(self.wo)) {
                let Some(s0) = start[t.ky].map(|s| s + shift) else {
                    line.fill(0.0);
                    continue;
                };
                zero_pad(&mut line[..t.lo]);
                line[t.lo..t.hi].copy_from_slice(&x[s0..s0 + t.hi - t.lo]);
                zero_pad(&mut line[t.hi..]);
            }
        }
    }

    /// `col2im`: adds a chunk's columns (the layout of [`Geom::im2col`]) into `dx`
    /// (the group's input gradient).
    fn col2im(&self, cols: &[f32], chunk: (usize, usize), dx: &mut [f32]) {
        let span = self.chunk_lines(chunk);
        let lines = self.line_starts(span);
        let width = span.1 * self.wo;
        for (r, src) in cols.chunks_exact(width).take(self.col_rows()).enumerate() {
            let t = self.tap(r);
            let shift = self.tap_shift(&t);
            for (start, line) in lines.iter().zip(src.chunks_exact(self.wo)) {
                let Some(d0) = start[t.ky].map(|s| s + shift) else {
                    continue;
                };
                for (d, s) in dx[d0..d0 + t.hi - t.lo].iter_mut().zip(&line[t.lo..t.hi]) {
                    *d += s;
                }
            }
        }
    }

    /// The chunk's columns that GEMM pass `p` multiplies: `[col_rows, rows·Wo]`,
    /// for [`Lowering::Rows`] shifted by `p` lines.
    fn col_view(&self, chunk: (usize, usize), p: usize) -> View {
        let width = self.chunk_lines(chunk).1 * self.wo;
        View::rows(p * self.wo, self.col_rows(), chunk.1 * self.wo, width)
    }

    /// Pass `p`'s block `[O, col_rows]` of the weight as [`Geom::lower_weight`]
    /// lays it out.
    fn weight_view(&self, o: usize, p: usize) -> View {
        let kp = self.col_rows();
        View::rows(p * o * kp, o, kp, kp)
    }

    /// The weight's column (`c·9 + ky·3 + kx`) of row `i` of the stacked passes'
    /// columns.
    fn weight_column(&self, i: usize) -> usize {
        match self.lowering {
            Lowering::Taps | Lowering::Direct => i,
            Lowering::Rows => {
                let (p, j) = (i / self.col_rows(), i % self.col_rows());
                j / 3 * 9 + p * 3 + j % 3
            }
        }
    }

    /// The weight `[O, C·9]` as the passes read it: itself, or for
    /// [`Lowering::Rows`] one `[O, C·3]` block per kernel row.
    fn lower_weight<'a>(&self, wt: &'a [f32], o: usize) -> Cow<'a, [f32]> {
        if self.lowering != Lowering::Rows {
            return Cow::Borrowed(wt);
        }
        let (k, kp) = (self.k(), self.col_rows());
        let lowered = (0..3 * o * kp)
            .map(|i| {
                let (p, oo, j) = (i / (o * kp), i / kp % o, i % kp);
                wt[oo * k + self.weight_column(p * kp + j)]
            })
            .collect();
        Cow::Owned(lowered)
    }

    /// The convolution of `x: [B, C, H, W]` with `wt: [O, C·9]`, channel-major
    /// `[O, B, Ho, Wo]`.
    pub(super) fn forward(&self, x: &[f32], wt: &[f32], o: usize) -> Vec<f32> {
        if self.lowering == Lowering::Direct {
            return direct::forward(self, x, wt, o);
        }
        let wl = self.lower_weight(wt, o);
        let fill = |y: &mut [MaybeUninit<f32>]| {
            let out = SharedOut::new(y);
            self.groups().into_par_iter().for_each(|(b0, nb)| {
                let x = &x[b0 * self.image()..(b0 + nb) * self.image()];
                with_scratch(self.cols_len(), |cols| {
                    for chunk in self.chunks(nb) {
                        self.im2col(x, chunk, cols);
                        for p in 0..self.passes() {
                            // SAFETY (of `dst`): each thread writes the output columns
                            // of its own images only; pass 0 writes them all, later
                            // passes add to them.
                            #[allow(unsafe_code)]
                            let dst = unsafe { out.dst() };
                            let (wv, cv) = (self.weight_view(o, p), self.col_view(chunk, p));
                            gemm(dst, self.out_view(o, b0, chunk), p > 0, &wl, wv, cols, cv);
                        }
                    }
                });
            });
        };
        // SAFETY: the groups partition the images and the chunks a group's output
        // rows, and each chunk's first GEMM writes all `O` rows of its columns.
        #[allow(unsafe_code)]
        unsafe {
            filled(o * self.b * self.n(), fill)
        }
    }

    /// The backward from `x: [B, C, H, W]`, `wt: [O, C·9]` and the output gradient
    /// `g` (channel-major `[O, B, Ho, Wo]`): `∂W: [O, C·9]`, and `∂x: [B, C, H, W]`
    /// when `with_dx`. Both walk the same chunks in one loop, so each chunk of `g`
    /// is read (or computed, [`OutGrad::Rows`]) once, for `∂W = g·colsᵀ` and
    /// `∂cols = Wᵀ·g` in turn.
    pub(super) fn backward(
        &self,
        x: &[f32],
        wt: &[f32],
        g: OutGrad,
        o: usize,
        with_dx: bool,
        then_add: Option<Masked>,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        if self.lowering == Lowering::Direct {
            return direct::backward(self, x, wt, g, o, with_dx, then_add);
        }
        let (k, kp) = (self.k(), self.col_rows());
        let wl = self.lower_weight(wt, o);
        let groups = self.groups();
        let image = self.image();
        let (cols_len, chunk_len) = (self.cols_len(), self.chunk_rows * self.wo);
        // ∂W's products want `g` with `O` contiguous, and `gemm` packs it so for
        // each of them; transposed once per chunk, they read it in place (a third
        // less time at the tiny spec's larger layers, `docs/performance.md`, session
        // 14). Not where ∂W is at most 16 × 16 floats: there `gemm` takes dot
        // products along the pixels, which need `g` as it is (conv1: 3× slower
        // transposed).
        let transpose_g = o * kp > 16 * 16;
        // The columns, `g`'s chunk transposed, and for `OutGrad::Rows` the chunk.
        let scratch = match g {
            OutGrad::Dense(_) => cols_len + o * chunk_len,
            OutGrad::Rows(_) => cols_len + 2 * o * chunk_len,
        };
        // One partial sum of ∂W per group: as one GEMM over the whole batch, the
        // long reduction (B·Ho·Wo) would run on one thread.
        let group = |(b0, nb): (usize, usize), dx: &mut [MaybeUninit<f32>]| {
            let x = &x[b0 * image..(b0 + nb) * image];
            // Each pass's `[O, C·3·kh]` block, column-major: the GEMM's preferred
            // destination.
            let mut dw = vec![0f32; o * k];
            // ∂x is zeroed an image at a time, just before the first chunk that adds
            // to it, so that the zeros are still in cache when `col2im` adds to
            // them (zeroing the whole batch first was one more pass over memory).
            let mut zeroed = 0;
            // Images `..finished` have had all their chunks (and `then_add`).
            let mut finished = 0;
            with_scratch(scratch, |buf| {
                let (cols, rest) = buf.split_at_mut(cols_len);
                let (gt, gbuf) = rest.split_at_mut(o * chunk_len);
                let chunks = self.chunks(nb);
                for (ci, &chunk) in chunks.iter().enumerate() {
                    let (g, gv) = match g {
                        OutGrad::Dense(g) => (g, self.out_view(o, b0, chunk)),
                        OutGrad::Rows(fill) => {
                            let len = chunk.1 * self.wo;
                            let first = (b0 * self.ho + chunk.0) * self.wo;
                            for (ch, dst) in gbuf.chunks_exact_mut(len).take(o).enumerate() {
                                fill(ch, first, dst);
                            }
                            (&*gbuf, View::rows(0, o, len, len))
                        }
                    };
                    self.im2col(x, chunk, cols);
                    let (g_dw, gv_dw) = if transpose_g {
                        transpose(g, gv, gt);
                        (&*gt, View::rows(0, gv.cols, o, o).t())
                    } else {
                        (g, gv)
                    };
                    for p in 0..self.passes() {
                        let dwv = View::rows(p * kp * o, kp, o, o).t();
                        let cv = self.col_view(chunk, p).t();
                        gemm(Dst::Slice(&mut dw), dwv, true, g_dw, gv_dw, cols, cv);
                    }
                    if with_dx {
                        // The lines past the first pass's view, which the later passes
                        // add to.
                        let (first, width) =
                            (chunk.1 * self.wo, self.chunk_lines(chunk).1 * self.wo);
                        for row in cols.chunks_exact_mut(width).take(kp) {
                            row[first..].fill(0.0);
                        }
                        for p in 0..self.passes() {
                            let (wv, cv) = (self.weight_view(o, p).t(), self.col_view(chunk, p));
                            gemm(Dst::Slice(cols), cv, p > 0, &wl, wv, g, gv);
                        }
                        zero_images(dx, &mut zeroed, self.chunk_last_image(chunk) + 1, image);
                        // SAFETY: images `..zeroed` of the group's ∂x are initialised (just
                        // above or for earlier chunks), and they include every image
                        // whose lines the chunk reads, all that `col2im` writes to.
                        #[allow(unsafe_code)]
                        let init = unsafe { assume_init(&mut dx[..zeroed * image]) };
                        self.col2im(cols, chunk, init);
                        if let Some(add) = then_add {
                            // The images no later chunk reads: complete, and in cache.
                            let next = chunks
                                .get(ci + 1)
                                .map_or(nb, |&c| self.chunk_first_image(c));
                            for i in finished..next {
                                add.add_to(&mut init[i * image..(i + 1) * image], (b0 + i) * image);
                            }
                            finished = finished.max(next);
                        }
                    }
                }
            });
            if with_dx {
                // Every image has chunks, so this zeroes nothing; it keeps the
                // contract of `filled` below without relying on that.
                zero_images(dx, &mut zeroed, nb, image);
            }
            dw
        };
        // SAFETY: each group zeroes all of its images (`zero_images` up to `nb`)
        // before it returns.
        #[allow(unsafe_code)]
        let (parts, dx) = unsafe { per_group(&groups, image, with_dx, group) };
        // Σ over the groups, into the weight's `[O, C·9]`.
        let mut dw = vec![0f32; o * k];
        for part in parts {
            for (i, row) in part.chunks_exact(o).enumerate() {
                let col = self.weight_column(i);
                for (j, v) in row.iter().enumerate() {
                    dw[j * k + col] += v;
                }
            }
        }
        (dw, dx)
    }

    /// The first image (counted in its group) whose input lines a chunk reads.
    fn chunk_first_image(&self, chunk: (usize, usize)) -> usize {
        self.chunk_lines(chunk).0 / self.lines()
    }

    /// The last image (counted in its group) whose input lines a chunk reads.
    fn chunk_last_image(&self, chunk: (usize, usize)) -> usize {
        let (l0, count) = self.chunk_lines(chunk);
        (l0 + count - 1) / self.lines()
    }

    /// The view of a chunk in a channel-major `[O, B·Ho·Wo]` tensor (the output, or
    /// its gradient), for the group starting at image `b0`.
    fn out_view(&self, o: usize, b0: usize, (r0, rows): (usize, usize)) -> View {
        View::rows(
            b0 * self.n() + r0 * self.wo,
            o,
            rows * self.wo,
            self.b * self.n(),
        )
    }
}

/// The output gradient a convolution's backward multiplies, channel-major
/// `[O, B·Ho·Wo]`.
#[derive(Clone, Copy)]
pub(super) enum OutGrad<'a> {
    /// In memory.
    Dense(&'a [f32]),
    /// Computed a chunk at a time: `fill(ch, first, dst)` writes channel `ch`'s
    /// values `first..first + dst.len()` (whole output rows). A BatchNorm's `∂x`
    /// this way is never written to memory, nor read back from it.
    Rows(&'a (dyn Fn(usize, usize, &mut [f32]) + Sync)),
}

thread_local! {
    /// Each thread's buffer for a chunk's columns, kept between convolutions.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch buffer, grown as needed. Its
/// contents are whatever the last user left: every use writes the columns before
/// it reads them. Allocated (zeroed) per call, the buffers were a `memset` of
/// 256 KB–1 MB for each image group of every convolution, forward and backward.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // In use further up this thread's stack (not the case today): a fresh one.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Fills this thread's scratch buffer with `len` NaNs.
#[cfg(test)]
fn poison_scratch(len: usize) {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.clear();
        buf.resize(len, f32::NAN);
    });
}

/// Zeroes a line's padding, a float or two with padding 1: stores, where `fill`
/// is a `memset` call per span (1.2% of a tiny step's samples in `im2col`).
fn zero_pad(span: &mut [f32]) {
    match span {
        [] => {}
        [a] => *a = 0.0,
        [a, b] => (*a, *b) = (0.0, 0.0),
        _ => span.fill(0.0),
    }
}

/// `g` after a ReLU's mask from its output `y`, both batch-major like a
/// convolution's `∂x`: the gradient a residual pair's skip connection adds to its
/// input's. [`Geom::backward`] adds it to each image of `∂x` as soon as the image
/// is complete, while it is in cache, instead of the pair writing it to a tensor of
/// its own and adding that afterwards (the same additions in the same order).
#[derive(Debug, Clone, Copy)]
pub(super) struct Masked<'a> {
    pub y: &'a [f32],
    pub g: &'a [f32],
    pub relu: bool,
}

impl Masked<'_> {
    /// Adds values `at..at + dst.len()` to `dst`.
    pub(super) fn add_to(&self, dst: &mut [f32], at: usize) {
        let n = dst.len();
        for ((d, &y), &g) in dst
            .iter_mut()
            .zip(&self.y[at..at + n])
            .zip(&self.g[at..at + n])
        {
            *d += relu_mask(self.relu, y, g);
        }
    }
}

/// Zeroes images `zeroed..upto` of `dx` (of `image` floats each) and moves
/// `zeroed` on to `upto`.
fn zero_images(dx: &mut [MaybeUninit<f32>], zeroed: &mut usize, upto: usize, image: usize) {
    if upto > *zeroed {
        for v in &mut dx[*zeroed * image..upto * image] {
            v.write(0.0);
        }
        *zeroed = upto;
    }
}

/// `s`, every element of which has been written, as the floats it holds.
///
/// # Safety
/// Every element of `s` must be initialised.
#[allow(unsafe_code)]
pub(super) unsafe fn assume_init(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller guarantees
    // that every element is initialised.
    unsafe { &mut *(std::ptr::from_mut(s) as *mut [f32]) }
}

/// One row of the columns: input channel, tap, and the span of an output line that
/// reads inside the input.
#[derive(Debug, Clone, Copy)]
struct Tap {
    ch: usize,
    ky: usize,
    kx: usize,
    lo: usize,
    hi: usize,
}

/// Runs `group` on each image group in parallel, with the group's block of a new
/// `∂x` of `image` floats per image when `with_dx` (else an empty block): what
/// each returned, in group order, and `∂x`.
///
/// # Safety
/// With `with_dx`, every call must initialise every element of its block.
#[allow(unsafe_code)]
pub(super) unsafe fn per_group<T: Send>(
    groups: &[(usize, usize)],
    image: usize,
    with_dx: bool,
    group: impl Fn((usize, usize), &mut [MaybeUninit<f32>]) -> T + Sync,
) -> (Vec<T>, Option<Vec<f32>>) {
    if !with_dx {
        let parts = groups.par_iter().map(|&grp| group(grp, &mut [])).collect();
        return (parts, None);
    }
    let images: usize = groups.iter().map(|g| g.1).sum();
    let per = groups[0].1 * image;
    let mut parts = Vec::new();
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        parts = dx
            .par_chunks_mut(per)
            .zip(groups)
            .map(|(dx, &grp)| group(grp, dx))
            .collect();
    };
    // SAFETY: the groups' blocks of ∂x tile it (every group but the last has
    // `groups[0].1` images), and the caller's `group` initialises each block.
    let dx = unsafe { filled(images * image, fill) };
    (parts, Some(dx))
}

/// How many groups [`image_groups`] splits a batch into: a constant, not the
/// thread count, so that `∂W`, summed per group and then over the groups in
/// order, and so all of training, comes out bit for bit the same on any number
/// of threads (`tests/pipeline.rs`). 12 groups share out evenly over 1, 2, 3, 4,
/// 6 and 12 threads (for a batch of a multiple of 12 images; 96 is the default);
/// on 2 threads they were no slower than one group per thread
/// (`docs/performance.md`, session 28). More than 12 threads find no group to
/// take: the cost of the fixed count on a large machine.
pub(super) const IMAGE_GROUPS: usize = 12;

/// `(start, count)` of the groups of images that the convolutions' threads take
/// ([`IMAGE_GROUPS`] of them, fewer when `b` is small).
pub(super) fn image_groups(b: usize) -> Vec<(usize, usize)> {
    let per = b.div_ceil(IMAGE_GROUPS).max(1);
    (0..b).step_by(per).map(|s| (s, per.min(b - s))).collect()
}

/// The CPU convolution `(x: [B, C, H, W], w: [O, C, 3, 3]) → [O, B, Ho, Wo]`
/// (channel-major), one node of candle's graph with its own backward.
#[derive(Debug, Clone, Copy)]
struct Conv3x3 {
    pad: usize,
    chunk_floats: usize,
    /// The lowering to use, or `None` to choose by shape (tests force each).
    lowering: Option<Lowering>,
}

impl Conv3x3 {
    fn geom(&self, dims: (usize, usize, usize, usize), o: usize) -> Result<Geom> {
        match self.lowering {
            Some(lowering) => Geom::lowered(dims, self.pad, self.chunk_floats, lowering),
            None => Geom::new(dims, o, self.pad, self.chunk_floats),
        }
    }
}

/// `[O, C·9]` from a weight layout `[O, C, 3, 3]`, checked against `c` channels.
fn weight_dims(l: &Layout, c: usize) -> Result<usize> {
    let (o, wc, kh, kw) = l.shape().dims4()?;
    if wc != c || kh != 3 || kw != 3 || o == 0 {
        candle_core::bail!(
            "conv3x3: weight {:?} for {c} input channels",
            l.shape().dims()
        );
    }
    Ok(o)
}

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xl.shape().dims4()?;
        let o = weight_dims(wl, dims.1)?;
        let geom = self.geom(dims, o)?;
        let (x, wt) = (
            contiguous(xs, xl, "conv3x3")?,
            contiguous(ws, wl, "conv3x3")?,
        );
        let y = geom.forward(x, wt, o);
        let shape = Shape::from((o, geom.b, geom.ho, geom.wo));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The network's input needs no gradient: a third of conv1's backward.
        let (dx, dw) = self.grads(x, weight, grad, x.track_op())?;
        Ok((dx, Some(dw)))
    }
}

impl Conv3x3 {
    /// `(∂x, ∂W)` of the CPU kernels, `∂x` only when `with_dx`.
    fn grads(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
        with_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let dims = x.dims4()?;
        let o = weight_dims(weight.layout(), dims.1)?;
        let geom = self.geom(dims, o)?;
        if grad_dims(grad.layout(), &geom)? != o {
            candle_core::bail!("conv3x3: gradient {:?} for {o} channels", grad.dims());
        }
        let (dw, dx) = with_slice(x, |x| {
            with_slice(weight, |wt| {
                with_slice(grad, |g| {
                    Ok(geom.backward(x, wt, OutGrad::Dense(g), o, with_dx, None))
                })
            })
        })?;
        let dev = x.device();
        let dx = dx
            .map(|d| Tensor::from_vec(d, x.shape(), dev))
            .transpose()?;
        Ok((dx, Tensor::from_vec(dw, weight.shape(), dev)?))
    }
}

/// The backward of [`conv3x3_channel_major`] on the CPU, called directly (what
/// candle's backprop runs for it): `(∂x, ∂W)` for the output gradient `grad:
/// [O, B, Ho, Wo]`, `∂x` only when `with_dx`. For timing the kernels layer by layer
/// (`modtrain bench-step --layers`).
pub fn conv3x3_grads(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    pad: usize,
    with_dx: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    if !x.device().is_cpu() {
        candle_core::bail!("conv3x3_grads: the CPU kernels only (got {:?})", x.device());
    }
    let op = Conv3x3 {
        pad,
        chunk_floats: CHUNK_FLOATS,
        lowering: None,
    };
    op.grads(
        &x.contiguous()?,
        &weight.contiguous()?,
        &grad.contiguous()?,
        with_dx,
    )
}

/// The `[O, B, Ho, Wo]` gradient of a convolution of `geom`, as `O`.
fn grad_dims(l: &Layout, geom: &Geom) -> Result<usize> {
    let (o, b, ho, wo) = l.shape().dims4()?;
    if (b, ho, wo) != (geom.b, geom.ho, geom.wo) {
        candle_core::bail!(
            "conv3x3: gradient {:?} for an output of {}×{}×{}",
            l.shape().dims(),
            geom.b,
            geom.ho,
            geom.wo
        );
    }
    Ok(o)
}

/// `x: [B, C, H, W]` convolved with `weight: [O, C, 3, 3]` (stride 1, zero padding
/// `pad`), no bias, returned channel-major: `[O, B, Ho, Wo]` (what BatchNorm
/// consumes on the CPU). On CPU the chunked kernels of this module; elsewhere a
/// transposed view of [`conv3x3`].
pub fn conv3x3_channel_major(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    conv3x3_chunked(x, weight, pad, CHUNK_FLOATS, None)
}

fn conv3x3_chunked(
    x: &Tensor,
    weight: &Tensor,
    pad: usize,
    chunk_floats: usize,
    lowering: Option<Lowering>,
) -> Result<Tensor> {
    if !super::cpu_kernels(x) {
        return conv3x3(x, weight, pad)?.transpose(0, 1);
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    x.apply_op2(
        &weight,
        Conv3x3 {
            pad,
            chunk_floats,
            lowering,
        },
    )
}

/// The convolution as one node of candle's graph on any device (the generic path).
///
/// Its arguments are `x`, the weight and the output, already computed by candle's
/// `conv2d` from detached tensors; forward hands that output on, and backward is
/// built from candle's tensor ops: `∂W = g · colsᵀ` with `cols` gathered as nine
/// shifted views ([`im2col_ops`]), and `∂x` as a 3×3 convolution of `g` with the
/// flipped, transposed weight. candle's own conv2d backward computes `∂W` as a
/// convolution whose kernel is the whole gradient image (40 GB of GPU memory for
/// 24 images at 150×150) and `∂x` with a direct transposed-convolution kernel.
#[derive(Debug)]
struct GenericConv3x3 {
    pad: usize,
}

impl CustomOp3 for GenericConv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3-generic"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _w: &CpuStorage,
        _lw: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = contiguous(y, ly, "conv3x3")?.to_vec();
        Ok((CpuStorage::F32(out), ly.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _lx: &Layout,
        _w: &candle_core::CudaStorage,
        _lw: &Layout,
        y: &candle_core::CudaStorage,
        ly: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if !ly.is_contiguous() || ly.start_offset() != 0 {
            candle_core::bail!("conv3x3: the output must be a fresh contiguous tensor");
        }
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        conv3x3_generic_bwd(x, weight, grad, self.pad)
    }
}

/// The convolution on any device, batch-major `[B, O, Ho, Wo]`: candle's `conv2d`
/// forward with the backward of [`GenericConv3x3`]. What CUDA runs.
pub fn conv3x3_generic(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    if pad > 2 {
        candle_core::bail!("conv3x3: padding {pad} (at most 2)");
    }
    let y = x.detach().conv2d(&weight.detach(), pad, 1, 1, 1)?;
    x.apply_op3(weight, &y, GenericConv3x3 { pad })
}

/// `[C·9, B·Ho·Wo]` columns (the layout of the module's `im2col`) from candle's tensor ops: the nine
/// shifted views of the zero-padded input, stacked.
fn im2col_ops(x: &Tensor, pad: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (out_size(h, pad)?, out_size(w, pad)?);
    let xp = x
        .pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?
        .transpose(0, 1)?;
    let taps = (0..9)
        .map(|t| xp.narrow(2, t / 3, ho)?.narrow(3, t % 3, wo))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&taps, 1)?.reshape((c * 9, b * ho * wo))
}

fn conv3x3_generic_bwd(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    pad: usize,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let o = weight.dim(0)?;
    let g = grad.contiguous()?;
    let gc = g.transpose(0, 1)?.contiguous()?.reshape((o, ()))?;
    let dw = gc
        .matmul(&im2col_ops(x, pad)?.t()?)?
        .reshape(weight.shape())?;
    let dx = if x.track_op() {
        // ∂x[c, y, x] = Σ_{o,i,j} W[o, c, i, j] · g[o, y+p−i, x+p−j]: a convolution of g
        // (padded by 2 − p) with W flipped in space, input and output channels swapped.
        let rev = Tensor::new(&[2u32, 1, 0], weight.device())?;
        let wf = weight
            .index_select(&rev, 2)?
            .index_select(&rev, 3)?
            .transpose(0, 1)?
            .contiguous()?;
        Some(g.conv2d(&wf, 2 - pad, 1, 1, 1)?)
    } else {
        None
    };
    Ok((dx, Some(dw), None))
}

/// The convolution batch-major, `[B, O, Ho, Wo]`: on the CPU kernels a transposed
/// view of their channel-major output; elsewhere as computed, by cuDNN where it
/// loads ([`super::cudnn`]) or candle's ops ([`conv3x3_generic`]), with no
/// transposes in the graph (candle copies a transpose's gradient).
pub fn conv3x3(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    if super::cpu_kernels(x) {
        return conv3x3_channel_major(x, weight, pad)?.transpose(0, 1);
    }
    #[cfg(feature = "cuda")]
    if super::cudnn::applies(x) {
        return super::cudnn::conv3x3(x, weight, pad);
    }
    conv3x3_generic(x, weight, pad)
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::ops::test_util::{grads_of, max_diff, rand, rel_diff};

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        // The CPU kernels, and the generic path CUDA runs (here on the CPU).
        type Conv = fn(&Tensor, &Tensor, usize) -> Result<Tensor>;
        let convs: [(&str, Conv); 2] = [("cpu", conv3x3), ("generic", conv3x3_generic)];
        for ((name, conv), (pad, h, w)) in convs
            .into_iter()
            .flat_map(|c| [(0, 7, 9), (1, 5, 6), (1, 3, 3), (0, 3, 4)].map(|s| (c, s)))
        {
            let x = Var::from_tensor(&rand(&[2, 3, h, w], 1)).expect("x");
            let k = Var::from_tensor(&rand(&[4, 3, 3, 3], 2)).expect("k");
            let up = rand(&[2, 4, h + 2 * pad - 2, w + 2 * pad - 2], 3);

            let ours = conv(&x, &k, pad).expect("ours");
            let theirs = x.conv2d(&k, pad, 1, 1, 1).expect("candle");
            let d = max_diff(&ours, &theirs);
            assert!(d < 1e-5, "{name}: forward pad {pad} {h}×{w}: max diff {d}");

            let g1 = (ours * &up)
                .expect("mul")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("bwd");
            let g2 = (theirs * &up)
                .expect("mul")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("bwd");
            for v in [&x, &k] {
                let (a, b) = (g1.get(v).expect("g1"), g2.get(v).expect("g2"));
                let d = max_diff(a, b);
                assert!(d < 1e-4, "{name}: gradient pad {pad} {h}×{w}: max diff {d}");
            }

            // An input that is not tracked (the network's images) gets no gradient;
            // the weight's is unchanged.
            let plain = x.as_tensor().detach();
            let g3 = (conv(&plain, &k, pad).expect("ours") * &up)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            assert!(g3.get(&plain).is_none());
            let d = max_diff(g3.get(&k).expect("g3"), g2.get(&k).expect("g2"));
            assert!(
                d < 1e-4,
                "{name}: weight gradient, untracked input: max diff {d}"
            );
        }
    }

    /// Both lowerings and the automatic choice, on chunks of one output row,
    /// chunks that start inside an image and end in the next (taps), chunks of 2,
    /// 2 and 1 rows of an image (rows), several image groups ([`GROUPED`] images:
    /// groups of 3 and a last of 2, on three threads) and the tiny spec's real
    /// layer shapes with the default chunk size, give candle's results.
    #[test]
    fn chunks_and_image_groups_match_candle_conv2d() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        pool.install(|| {
            for (pad, c, o, h, w, chunk_floats) in [
                (1, 4, 3, 6, 5, 1),
                // Wo = 4 and 12 columns: chunks of 3 of an image's 5 output rows.
                (1, 4, 3, 5, 4, 12),
                // Rows: 192 / (4·3·4) = 4 lines, so chunks of 2 output rows.
                (1, 4, 3, 5, 4, 192),
                (0, 4, 3, 7, 9, 4 * 9 * 7 * 2),
                (1, 4, 3, 4, 3, 1 << 20),
                (1, 8, 16, 22, 22, CHUNK_FLOATS),
                (0, 8, 16, 46, 46, CHUNK_FLOATS),
                // ∂W from `g` transposed (O·C·3 > 256), with 12 channels (one whole
                // block of 8 and 4 more) and chunks of 63 and of 7 pixels.
                (1, 8, 12, 9, 7, CHUNK_FLOATS),
                (1, 8, 12, 9, 7, 1),
                // The last blocks' small images: 4×4 with and without padding, 1×1,
                // and a 3×5 one whose rows and columns differ.
                (1, 6, 5, 4, 4, CHUNK_FLOATS),
                (0, 6, 5, 4, 4, CHUNK_FLOATS),
                (1, 6, 5, 1, 1, CHUNK_FLOATS),
                (1, 4, 3, 3, 5, 1),
                // 24 input channels, padded (direct).
                (1, 24, 8, 10, 10, CHUNK_FLOATS),
                // Direct both ways, one image per sub-batch (`direct::Plan`).
                (1, 16, 16, 48, 48, CHUNK_FLOATS),
            ] {
                for lowering in [
                    None,
                    Some(Lowering::Taps),
                    Some(Lowering::Rows),
                    Some(Lowering::Direct),
                ] {
                    // Scratch buffers full of NaN: a value read before it is written
                    // would show in the results.
                    pool.broadcast(|_| poison_scratch(1 << 21));
                    let case =
                        format!("pad {pad}, {c}→{o}, {h}×{w}, chunk {chunk_floats}, {lowering:?}");
                    let x = Var::from_tensor(&rand(&[GROUPED, c, h, w], 4)).expect("x");
                    let k = Var::from_tensor(&rand(&[o, c, 3, 3], 5)).expect("k");
                    let up = rand(&[o, GROUPED, h + 2 * pad - 2, w + 2 * pad - 2], 6);
                    let ours = conv3x3_chunked(&x, &k, pad, chunk_floats, lowering).expect("ours");
                    let theirs = x
                        .conv2d(&k, pad, 1, 1, 1)
                        .expect("candle")
                        .transpose(0, 1)
                        .expect("t");
                    let d = rel_diff(&ours, &theirs);
                    assert!(d < 1e-6, "{case}: forward differs by {d} (relative)");
                    let (g1, g2) = (grads_of(&ours, &up), grads_of(&theirs, &up));
                    for (name, v) in [("x", &x), ("w", &k)] {
                        let d = rel_diff(g1.get(v).expect("g1"), g2.get(v).expect("g2"));
                        assert!(d < 1e-5, "{case}: ∂{name} differs by {d} (relative)");
                    }
                }
            }
        });
    }

    /// A batch that [`image_groups`] splits into groups of 3 images and a last
    /// group of 2, so that chunks span images inside a group and the last group
    /// is shorter.
    const GROUPED: usize = 2 + 3 * (IMAGE_GROUPS - 3);

    #[test]
    fn the_test_batch_makes_uneven_groups_of_several_images() {
        let groups = image_groups(GROUPED);
        assert!(groups.iter().all(|&(_, n)| n == 3 || n == 2), "{groups:?}");
        assert_eq!(groups.last().map(|g| g.1), Some(2), "{groups:?}");
        assert_eq!(groups.iter().map(|g| g.1).sum::<usize>(), GROUPED);
    }

    /// `then_add` gives `∂x` plus the masked gradient, bit for bit, whether an
    /// image's chunks are one, several (taps of one row; rows of two), or shared with
    /// the next image (taps spanning images), over several image groups.
    #[test]
    fn masked_gradient_is_added_to_each_image_once() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        let vec = |n: usize, seed| rand(&[n], seed).to_vec1::<f32>().expect("vec");
        pool.install(|| {
            for (pad, c, h, w, chunk_floats, lowering) in [
                (1, 4, 5, 4, 1, Lowering::Taps),
                (1, 4, 5, 4, 192, Lowering::Rows),
                (1, 4, 4, 3, 4 * 9 * 5, Lowering::Taps),
                (1, 6, 7, 5, CHUNK_FLOATS, Lowering::Rows),
                (1, 6, 7, 5, CHUNK_FLOATS, Lowering::Direct),
                (0, 8, 9, 9, CHUNK_FLOATS, Lowering::Direct),
            ] {
                let (b, o) = (GROUPED, 3);
                let geom = Geom::lowered((b, c, h, w), pad, chunk_floats, lowering).expect("geom");
                let (x, wt) = (vec(b * c * h * w, 1), vec(o * c * 9, 2));
                let g = vec(o * b * geom.n(), 3);
                // The skip's output and gradient, shaped like ∂x; y half negative.
                let (y, gy) = (vec(b * c * h * w, 4), vec(b * c * h * w, 5));
                let plain = geom.backward(&x, &wt, OutGrad::Dense(&g), o, true, None);
                let add = Masked {
                    y: &y,
                    g: &gy,
                    relu: true,
                };
                let with = geom.backward(&x, &wt, OutGrad::Dense(&g), o, true, Some(add));
                assert_eq!(plain.0, with.0, "{lowering:?} chunk {chunk_floats}: ∂W");
                let (plain, with) = (plain.1.expect("dx"), with.1.expect("dx"));
                for (i, (p, v)) in plain.iter().zip(&with).enumerate() {
                    let want = p + relu_mask(true, y[i], gy[i]);
                    assert_eq!(
                        want.to_bits(),
                        v.to_bits(),
                        "{lowering:?} chunk {chunk_floats}: ∂x[{i}]"
                    );
                }
            }
        });
    }

    /// Among the `im2col` lowerings: rows where the columns outweigh the output
    /// and an image makes wide enough GEMMs; taps for a 3-channel input into 32
    /// channels, for 64 channels and for 2×2 images.
    #[test]
    fn the_lowering_follows_the_shape() {
        let lowering = |(c, o, h, pad)| {
            Geom::lowered_by_columns((96, c, h, h), o, pad, CHUNK_FLOATS)
                .expect("geom")
                .lowering
        };
        for (shape, want) in [
            ((3, 8, 48, 0), Lowering::Rows),
            ((8, 16, 46, 0), Lowering::Rows),
            ((32, 32, 4, 1), Lowering::Rows),
            ((3, 32, 64, 0), Lowering::Taps),
            ((64, 64, 30, 1), Lowering::Taps),
            ((32, 32, 2, 1), Lowering::Taps),
            ((32, 32, 4, 0), Lowering::Taps),
        ] {
            assert_eq!(lowering(shape), want, "{shape:?}");
        }
        // `Geom::new` takes the direct kernels exactly where `direct::suits` says
        // (the rule itself is tested in `direct`), unless they are off.
        let chosen = |(c, o, h, pad)| {
            Geom::new((96, c, h, h), o, pad, CHUNK_FLOATS)
                .expect("geom")
                .lowering
        };
        for (c, o, h, pad) in [
            (3, 8, 48, 0),
            (16, 16, 22, 1),
            (32, 32, 10, 0),
            (64, 64, 14, 1),
        ] {
            let want = direct::available() && direct::suits((c, h, h), o, pad);
            assert_eq!(
                chosen((c, o, h, pad)) == Lowering::Direct,
                want,
                "{c}→{o} @{h}"
            );
        }
    }

    #[test]
    fn conv3x3_grads_are_what_backprop_computes() {
        let x = Var::from_tensor(&rand(&[3, 4, 7, 6], 1)).expect("x");
        let k = Var::from_tensor(&rand(&[5, 4, 3, 3], 2)).expect("k");
        for pad in [0, 1] {
            let y = conv3x3_channel_major(&x, &k, pad).expect("y");
            let up = rand(y.dims(), 3);
            let grads = grads_of(&y, &up);
            let (dx, dw) = conv3x3_grads(&x, &k, &up, pad, true).expect("grads");
            let dx = dx.expect("with_dx");
            assert_eq!(max_diff(&dx, grads.get(&x).expect("∂x")), 0.0);
            assert_eq!(max_diff(&dw, grads.get(&k).expect("∂W")), 0.0);
            let (none, dw1) = conv3x3_grads(&x, &k, &up, pad, false).expect("∂W only");
            assert!(none.is_none());
            assert_eq!(max_diff(&dw1, &dw), 0.0);
        }
        let bad = conv3x3_grads(&x, &k, &rand(&[5, 3, 4, 4], 4), 0, true);
        assert!(bad.is_err(), "a gradient of the wrong shape");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = rand(&[2, 3, 2, 5], 7);
        let k = rand(&[4, 3, 3, 3], 8);
        let e = conv3x3(&x, &k, 0).expect_err("2 rows, no padding");
        assert!(e.to_string().contains("2-pixel side"), "{e}");
        let e = conv3x3(&rand(&[2, 2, 5, 5], 7), &k, 1).expect_err("channels");
        assert!(e.to_string().contains("input channels"), "{e}");
    }
}

//! The demo's one screen, drawn with embedded-graphics on any `DrawTarget` with
//! RGB888 colours (a PNG canvas on hosts and in tests, the framebuffer on a Pi):
//!
//! ```text
//! ┌──────────────────────────────────────────────┐
//! │ smiling                      task 1/8  q 3/12 │  header
//! │ ┌────────┐  ┌────┐ ┌────┐ ┌────┐              │
//! │ │ query  │  │ #1 │ │ #2 │ │ #3 │  results     │
//! │ │        │  └────┘ └────┘ └────┘              │
//! │ └────────┘  ┌────┐ ┌────┐                     │
//! │ query: yes  │ #4 │ │ #5 │                     │
//! │             └────┘ └────┘                     │
//! │ trunk 12.1 ms · tail 0.4 ms · search 0.1 ms   │  footer
//! └──────────────────────────────────────────────┘
//! ```
//!
//! Every size adapts to the target's; thumbnails are fitted to their boxes.

use std::time::Duration;

use embedded_graphics::Drawable;
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_10X20};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{DrawTarget, Point, Primitive, Size};
use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Alignment, Baseline, Text, TextStyleBuilder};
use image::RgbImage;
use modkit_models::Fit;
use modkit_runtime::sheet::fit;

const BACKGROUND: Rgb888 = Rgb888::new(16, 18, 24);
const HEADER: Rgb888 = Rgb888::new(30, 60, 120);
const TEXT: Rgb888 = Rgb888::new(235, 235, 235);
const DIM: Rgb888 = Rgb888::new(150, 150, 160);
const MATCH: Rgb888 = Rgb888::new(80, 200, 100);
const MISMATCH: Rgb888 = Rgb888::new(230, 80, 70);
const QUERY: Rgb888 = Rgb888::new(90, 150, 255);
const MISSING: Rgb888 = Rgb888::new(70, 70, 70);

const HEADER_H: u32 = 24;
const FOOTER_H: u32 = 16;
const PAD: u32 = 8;
const CAPTION_H: u32 = 12;

/// How long each stage took for this screen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timings {
    pub trunk: Duration,
    pub tail: Duration,
    pub search: Duration,
}

/// One result tile.
#[derive(Debug, Clone)]
pub struct Tile {
    /// `None`: the gallery image could not be read (drawn as a grey box).
    pub image: Option<RgbImage>,
    pub distance: f32,
    pub label: Option<bool>,
}

/// Everything one screen shows.
#[derive(Debug, Clone)]
pub struct Frame {
    pub task: String,
    /// 1-based position of the task among the cycled tasks, and their count.
    pub task_pos: (usize, usize),
    /// 1-based position of the query among the query images, and their count.
    pub query_pos: (usize, usize),
    pub query: Option<RgbImage>,
    pub query_label: Option<bool>,
    pub results: Vec<Tile>,
    /// The k asked for (more than `results.len()` when the gallery is smaller).
    pub k: usize,
    pub gallery: usize,
    /// `None` draws "-- ms" (reproducible frames for golden-image checks).
    pub timings: Option<Timings>,
    /// How the thumbnails are squared: the model's own fit.
    pub fit: Fit,
}

/// Geometry of a layout for a target size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub width: u32,
    pub height: u32,
    /// Query thumbnail side.
    pub query: u32,
    /// Result thumbnail side.
    pub thumb: u32,
    pub cols: u32,
    pub rows: u32,
}

impl Layout {
    /// Fits the screen into `size` for `k` results: the query takes the body's
    /// height (at most 40% of the width), the results a grid to its right with the
    /// largest thumbnails that still show all `k` (down to 32 px; beyond that the
    /// screen says how many more there are).
    pub fn new(size: Size, k: usize) -> Layout {
        let (w, h) = (size.width.max(160), size.height.max(120));
        let body = h - HEADER_H - FOOTER_H - 2 * PAD;
        let query = (body - CAPTION_H * 2).min(w * 2 / 5);
        let area_w = w.saturating_sub(query + 3 * PAD);
        let gap = PAD / 2;
        let rows = if body >= 2 * (48 + CAPTION_H) { 2 } else { 1 };
        let by_height = (body / rows).saturating_sub(CAPTION_H + 2);
        let want_cols = u32::try_from(k.max(1)).unwrap_or(u32::MAX).div_ceil(rows);
        let by_width = ((area_w + gap) / want_cols).saturating_sub(gap);
        let thumb = by_height.min(by_width).max(32);
        let cols = ((area_w + gap) / (thumb + gap)).max(1);
        Layout {
            width: w,
            height: h,
            query,
            thumb,
            cols,
            rows,
        }
    }

    /// How many results fit.
    pub fn capacity(&self) -> usize {
        (self.cols * self.rows) as usize
    }

    /// Top-left corner of result `i`.
    pub fn tile(&self, i: usize) -> Point {
        let (c, r) = (i as u32 % self.cols, i as u32 / self.cols);
        let x0 = 2 * PAD + self.query;
        Point::new(
            (x0 + c * (self.thumb + PAD / 2)) as i32,
            (HEADER_H + PAD + r * (self.thumb + CAPTION_H + 2)) as i32,
        )
    }
}

fn text<D: DrawTarget<Color = Rgb888>>(
    d: &mut D,
    s: &str,
    at: Point,
    colour: Rgb888,
) -> Result<(), D::Error> {
    Text::with_baseline(s, at, MonoTextStyle::new(&FONT_6X10, colour), Baseline::Top)
        .draw(d)
        .map(drop)
}

/// Draws `img` fitted into a `side` square at `at`, or a grey "missing" box.
fn thumbnail<D: DrawTarget<Color = Rgb888>>(
    d: &mut D,
    img: Option<&RgbImage>,
    at: Point,
    side: u32,
    squaring: Fit,
) -> Result<(), D::Error> {
    let area = Rectangle::new(at, Size::new(side, side));
    match img {
        Some(img) => {
            let img = modkit_runtime::input::square(
                &image::DynamicImage::ImageRgb8(img.clone()),
                side,
                squaring,
            );
            d.fill_contiguous(&area, img.pixels().map(|p| Rgb888::new(p[0], p[1], p[2])))
        }
        None => {
            area.into_styled(PrimitiveStyle::with_fill(MISSING))
                .draw(d)?;
            let centre = at + Point::new(side as i32 / 2 - 21, side as i32 / 2 - 5);
            text(d, "missing", centre, DIM)
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

/// A result's caption in `room` characters: its rank whole, then its distance
/// with as many decimals as fit, `0.12` shortened to `.12` where that is what
/// fits (no distance where the rank takes the room).
fn caption(rank: usize, distance: f32, room: usize) -> String {
    let rank = format!("#{rank}");
    (1..=3)
        .rev()
        .flat_map(|decimals| {
            let d = format!("{distance:.decimals$}");
            let short = d.strip_prefix('0').map(str::to_string);
            [Some(d), short]
        })
        .flatten()
        .map(|d| format!("{rank} {d}"))
        .find(|c| c.len() <= room)
        .unwrap_or_else(|| fit(&rank, room))
}

/// Draws `frame` on `d`, filling the whole target.
pub fn draw<D: DrawTarget<Color = Rgb888>>(d: &mut D, frame: &Frame) -> Result<Layout, D::Error> {
    let l = Layout::new(d.bounding_box().size, frame.k);
    d.clear(BACKGROUND)?;
    let chars = |px: u32, w: u32| (px / w) as usize;

    // Header: the task, large; the positions, right-aligned.
    Rectangle::new(Point::zero(), Size::new(l.width, HEADER_H))
        .into_styled(PrimitiveStyle::with_fill(HEADER))
        .draw(d)?;
    let pos = format!(
        "task {}/{}  query {}/{}",
        frame.task_pos.0, frame.task_pos.1, frame.query_pos.0, frame.query_pos.1
    );
    let pos_w = pos.len() as u32 * 6;
    let task_room = chars(l.width.saturating_sub(pos_w + 3 * PAD), 10);
    Text::with_baseline(
        &fit(&frame.task, task_room),
        Point::new(PAD as i32, 2),
        MonoTextStyle::new(&FONT_10X20, TEXT),
        Baseline::Top,
    )
    .draw(d)?;
    Text::with_text_style(
        &pos,
        Point::new((l.width - PAD) as i32, 7),
        MonoTextStyle::new(&FONT_6X10, TEXT),
        TextStyleBuilder::new()
            .alignment(Alignment::Right)
            .baseline(Baseline::Top)
            .build(),
    )
    .draw(d)?;

    // The query, framed, and its value.
    let q = Point::new(PAD as i32, (HEADER_H + PAD) as i32);
    thumbnail(d, frame.query.as_ref(), q, l.query, frame.fit)?;
    Rectangle::new(q - Point::new(2, 2), Size::new(l.query + 4, l.query + 4))
        .into_styled(PrimitiveStyle::with_stroke(QUERY, 2))
        .draw(d)?;
    let qc = q + Point::new(0, l.query as i32 + 4);
    let room = chars(l.query, 6);
    text(
        d,
        &fit(&format!("query: {}", yes_no(frame.query_label)), room),
        qc,
        QUERY,
    )?;
    let shown = frame.results.len().min(l.capacity());
    let summary = if frame.results.len() < frame.k {
        format!(
            "{} of k={} (gallery {})",
            frame.results.len(),
            frame.k,
            frame.gallery
        )
    } else {
        format!("top {shown} of {}", frame.gallery)
    };
    text(d, &fit(&summary, room), qc + Point::new(0, 12), DIM)?;

    // Results with rank and distance, coloured by whether the value matches.
    for (i, tile) in frame.results.iter().take(shown).enumerate() {
        let at = l.tile(i);
        thumbnail(d, tile.image.as_ref(), at, l.thumb, frame.fit)?;
        let colour = match (tile.label, frame.query_label) {
            (Some(a), Some(b)) if a == b => MATCH,
            (Some(_), Some(_)) => MISMATCH,
            _ => TEXT,
        };
        text(
            d,
            &caption(i + 1, tile.distance, chars(l.thumb, 6)),
            at + Point::new(0, l.thumb as i32 + 1),
            colour,
        )?;
    }
    if frame.results.len() > shown {
        let more = format!("+{} more", frame.results.len() - shown);
        let at = Point::new(
            (l.width - PAD - more.len() as u32 * 6) as i32,
            (l.height - FOOTER_H - 12) as i32,
        );
        text(d, &more, at, DIM)?;
    }
    if frame.results.is_empty() {
        text(d, "no results", l.tile(0) + Point::new(0, 4), DIM)?;
    }

    // Footer: per-stage timings.
    let footer = match frame.timings {
        Some(t) => format!(
            "trunk {} | tail {} | search {}",
            ms(t.trunk),
            ms(t.tail),
            ms(t.search)
        ),
        None => "trunk -- ms | tail -- ms | search -- ms".to_string(),
    };
    text(
        d,
        &fit(&footer, chars(l.width - 2 * PAD, 6)),
        Point::new(PAD as i32, (l.height - FOOTER_H + 3) as i32),
        DIM,
    )?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::pixelcolor::RgbColor;
    use modkit_runtime::canvas::RgbCanvas;

    fn rgb(c: Rgb888) -> [u8; 3] {
        [c.r(), c.g(), c.b()]
    }

    fn solid(v: u8) -> RgbImage {
        RgbImage::from_pixel(40, 40, image::Rgb([v, 255 - v, 7]))
    }

    fn frame(task: &str, results: usize, k: usize) -> Frame {
        Frame {
            task: task.into(),
            task_pos: (2, 8),
            query_pos: (1, 3),
            query: Some(solid(200)),
            query_label: Some(true),
            results: (0..results)
                .map(|i| Tile {
                    image: (i != 1).then(|| solid((10 * i % 250) as u8)),
                    distance: 0.1 * i as f32,
                    label: Some(i % 2 == 0),
                })
                .collect(),
            k,
            gallery: results,
            timings: None,
            fit: Fit::Crop,
        }
    }

    fn render(f: &Frame, w: u32, h: u32) -> (RgbImage, Layout) {
        let mut c = RgbCanvas::new(w, h, Rgb888::BLACK);
        let l = draw(&mut c, f).expect("infallible");
        (c.image, l)
    }

    /// The colours present in a rectangle of `img`.
    fn colours(
        img: &RgbImage,
        x: u32,
        y: u32,
        w: u32,
        h: u32,
    ) -> std::collections::HashSet<[u8; 3]> {
        let mut set = std::collections::HashSet::new();
        for yy in y..(y + h).min(img.height()) {
            for xx in x..(x + w).min(img.width()) {
                set.insert(img.get_pixel(xx, yy).0);
            }
        }
        set
    }

    #[test]
    fn lays_out_header_query_results_and_footer() {
        for (w, h) in [(480, 320), (800, 480), (320, 240)] {
            let f = frame("smiling", 5, 5);
            let (img, l) = render(&f, w, h);
            assert!(l.capacity() >= 5, "{w}x{h}: {l:?}");
            // Header bar, query thumbnail (its colour fills the box's centre), frame.
            assert_eq!(img.get_pixel(w - 2, 1).0, rgb(HEADER));
            let c = PAD + l.query / 2;
            assert_eq!(
                img.get_pixel(c, HEADER_H + PAD + l.query / 2).0,
                [200, 55, 7]
            );
            assert_eq!(img.get_pixel(PAD - 2, HEADER_H + PAD + 5).0, rgb(QUERY));
            // Every result tile sits inside the screen and right of the query.
            for i in 0..5 {
                let p = l.tile(i);
                assert!(
                    p.x as u32 > PAD + l.query && p.x as u32 + l.thumb <= w,
                    "{w}x{h} tile {i}"
                );
                assert!(
                    p.y as u32 + l.thumb + CAPTION_H <= h - FOOTER_H,
                    "{w}x{h} tile {i}"
                );
            }
            // Tile 0 shows its image; tile 1's image is missing: a grey box.
            let p0 = l.tile(0);
            assert_eq!(
                img.get_pixel(p0.x as u32 + l.thumb / 2, p0.y as u32 + 2).0,
                [0, 255, 7]
            );
            let p1 = l.tile(1);
            assert_eq!(
                img.get_pixel(p1.x as u32 + 1, p1.y as u32 + 1).0,
                rgb(MISSING)
            );
            // Captions: green where the value matches the query's (even ranks), red where not.
            let cap = |i: usize| {
                let p = l.tile(i);
                colours(&img, p.x as u32, p.y as u32 + l.thumb + 1, l.thumb, 10)
            };
            assert!(cap(0).contains(&rgb(MATCH)) && !cap(0).contains(&rgb(MISMATCH)));
            assert!(cap(1).contains(&rgb(MISMATCH)));
            // The footer has text.
            assert!(colours(&img, PAD, h - FOOTER_H + 3, w / 2, 10).contains(&rgb(DIM)));
        }
    }

    #[test]
    fn long_task_names_stay_in_the_header() {
        let long = "an_attribute_name_far_too_long_for_any_small_screen_header";
        let (img, _) = render(&frame(long, 3, 3), 320, 240);
        let (short, _) = render(&frame("x", 3, 3), 320, 240);
        // The right-aligned positions are drawn the same with either name.
        let right = |img: &RgbImage| {
            let mut v = Vec::new();
            for y in 0..HEADER_H {
                for x in 320 - 130..320 {
                    v.push(img.get_pixel(x, y).0);
                }
            }
            v
        };
        assert_eq!(
            right(&img),
            right(&short),
            "the name does not run into the positions"
        );
        assert!(colours(&img, 0, 0, 60, HEADER_H).contains(&rgb(TEXT)));
    }

    #[test]
    fn k_larger_than_the_gallery_and_more_results_than_fit_are_stated() {
        // Two images in the gallery, k = 5: two tiles, nothing where the third would be.
        let f = frame("smiling", 2, 5);
        let (img, l) = render(&f, 480, 320);
        let p2 = l.tile(2);
        assert_eq!(
            colours(&img, p2.x as u32, p2.y as u32, l.thumb, l.thumb).len(),
            1,
            "empty"
        );
        // The summary under the query mentions k and the gallery size (dim text).
        let y = HEADER_H + PAD + l.query + 16;
        assert!(colours(&img, PAD, y, l.query, 10).contains(&rgb(DIM)));
        // Far more results than fit: capacity tiles and a "+N more" note.
        let f = frame("smiling", 40, 40);
        let (img, l) = render(&f, 320, 240);
        assert!(l.capacity() < 40);
        let note = colours(&img, 320 - 80, 240 - FOOTER_H - 12, 80 - PAD, 10);
        assert!(note.contains(&rgb(DIM)), "+N more");
        // No results at all.
        let (img, l) = render(&frame("smiling", 0, 5), 480, 320);
        let p0 = l.tile(0);
        assert!(colours(&img, p0.x as u32, p0.y as u32 + 4, 60, 10).contains(&rgb(DIM)));
    }

    #[test]
    fn two_digit_ranks_are_drawn_whole() {
        // k = 14 makes the thumbnails narrow: 5 characters of caption.
        let f = frame("smiling", 14, 14);
        let (img, l) = render(&f, 480, 320);
        assert!(l.capacity() >= 14 && l.thumb / 6 <= 6, "{l:?}");
        // Rank 10 (tile 9; its value differs from the query's) reads "#10 ", as
        // drawn alone: not "#1~13".
        let at = l.tile(9) + Point::new(0, l.thumb as i32 + 1);
        let (w, h) = (4 * 6, 10);
        let mut want = RgbCanvas::new(w, h, BACKGROUND);
        text(&mut want, "#10 ", Point::zero(), MISMATCH).expect("infallible");
        let got = image::imageops::crop_imm(&img, at.x as u32, at.y as u32, w, h).to_image();
        assert!(got == want.image, "rank 10's caption is not \"#10\"");
        assert_eq!(caption(10, 0.1234, 5), "#10");
        assert_eq!(caption(1, 0.1234, 5), "#1 .1");
        assert_eq!(caption(1, 0.1234, 8), "#1 0.123");
    }

    #[test]
    fn timings_are_drawn_or_masked() {
        let mut f = frame("smiling", 3, 3);
        let (masked, _) = render(&f, 480, 320);
        f.timings = Some(Timings {
            trunk: Duration::from_micros(12_345),
            tail: Duration::from_micros(400),
            search: Duration::from_micros(90),
        });
        let (timed, _) = render(&f, 480, 320);
        let footer = |img: &RgbImage| colours(img, PAD, 320 - FOOTER_H, 300, FOOTER_H);
        assert_ne!(
            masked.as_raw(),
            timed.as_raw(),
            "the footer changes with the timings"
        );
        assert!(footer(&timed).contains(&rgb(DIM)));
        let (again, _) = render(&frame("smiling", 3, 3), 480, 320);
        assert_eq!(
            masked.as_raw(),
            again.as_raw(),
            "masked frames are reproducible"
        );
    }
}

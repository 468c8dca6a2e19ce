//! The contact sheet of `modrt query --sheet`: a row per task, the query, then the
//! top-k results with their rank, distance and (where the index knows it) the attribute value,
//! green where it matches the query's and red where it does not.

use embedded_graphics::Drawable;
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_7X13_BOLD};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{Point, Primitive, Size};
use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};
use image::{DynamicImage, RgbImage};
use modkit_models::Fit;

use crate::canvas::RgbCanvas;
use crate::input::square;

/// The most results a row draws (`modrt query -k` with `--sheet`): 50 thumbnails
/// are a 6,000-pixel-wide image already.
pub const MAX_RESULTS: usize = 50;

/// Thumbnail side in pixels.
pub const THUMB: u32 = 112;
const PAD: u32 = 8;
const HEADER: u32 = 24;
const CAPTION: u32 = 36;

/// One tile of the sheet.
#[derive(Debug, Clone)]
pub struct Tile {
    /// `None` draws a grey "missing" box (the file moved since indexing).
    pub image: Option<DynamicImage>,
    /// First caption line: "query" or "#1  d=0.123".
    pub title: String,
    /// The task's attribute value, if known.
    pub label: Option<bool>,
}

const BACKGROUND: Rgb888 = Rgb888::new(24, 24, 28);
const TEXT: Rgb888 = Rgb888::new(230, 230, 230);
const MATCH: Rgb888 = Rgb888::new(80, 200, 100);
const MISMATCH: Rgb888 = Rgb888::new(230, 80, 70);
const UNKNOWN: Rgb888 = Rgb888::new(150, 150, 150);
const QUERY: Rgb888 = Rgb888::new(90, 150, 255);

/// Fits `s` into `max` characters, eliding the middle.
pub fn fit(s: &str, max: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= max || max < 3 {
        return chars.into_iter().take(max).collect();
    }
    let keep = max - 1;
    let head: String = chars[..keep / 2].iter().collect();
    let tail: String = chars[chars.len() - (keep - keep / 2)..].iter().collect();
    format!("{head}~{tail}")
}

/// One row of the sheet: a task, the query tile (with the query's value for
/// that task) and the results for it.
#[derive(Debug, Clone)]
pub struct Row {
    pub task: String,
    pub query: Tile,
    pub results: Vec<Tile>,
}

/// Height of one row: its header, the thumbnails and their captions.
const ROW: u32 = HEADER + THUMB + CAPTION;

/// Draws the sheet, a row per task: a header naming the task (and how many
/// results share the query's value, where the index knows it), the query tile,
/// then the results, each image squared as the model saw it.
pub fn contact_sheet(squaring: Fit, rows: &[Row]) -> RgbImage {
    let n = 1 + rows.iter().map(|r| r.results.len()).max().unwrap_or(0) as u32;
    let width = PAD + n * (THUMB + PAD) + PAD;
    let height = rows.len() as u32 * ROW + PAD;
    let mut canvas = RgbCanvas::new(width, height, BACKGROUND);
    for (i, row) in rows.iter().enumerate() {
        draw_row(&mut canvas, i as u32 * ROW, squaring, row, width);
    }
    canvas.image
}

fn draw_row(canvas: &mut RgbCanvas, y: u32, squaring: Fit, row: &Row, width: u32) {
    let q = row.query.label;
    let mut header = format!(
        "task: {}   top {} of the gallery",
        row.task,
        row.results.len()
    );
    let known: Vec<bool> = row.results.iter().filter_map(|t| t.label).collect();
    if let Some(q) = q
        && !known.is_empty()
    {
        let same = known.iter().filter(|&&v| v == q).count();
        let labelled = if known.len() < row.results.len() {
            " labelled"
        } else {
            ""
        };
        header.push_str(&format!(
            ", {same} of {}{labelled} share the query's value",
            known.len()
        ));
    }
    let max = (width / 7) as usize;
    let _ = Text::with_baseline(
        &fit(&header, max),
        Point::new(PAD as i32, (y + 6) as i32),
        MonoTextStyle::new(&FONT_7X13_BOLD, TEXT),
        Baseline::Top,
    )
    .draw(canvas);
    let at = |col: u32| (col, y + HEADER, squaring);
    draw_tile(canvas, at(0), &row.query, &row.task, q, true);
    for (i, tile) in row.results.iter().enumerate() {
        draw_tile(canvas, at(i as u32 + 1), tile, &row.task, q, false);
    }
}

fn draw_tile(
    c: &mut RgbCanvas,
    (col, y, squaring): (u32, u32, Fit),
    tile: &Tile,
    task: &str,
    query: Option<bool>,
    is_query: bool,
) {
    let x = PAD + col * (THUMB + PAD) + if is_query { 0 } else { PAD };
    match &tile.image {
        Some(img) => c.blit(&square(img, THUMB, squaring), x.into(), y.into()),
        None => {
            let _ = Rectangle::new(Point::new(x as i32, y as i32), Size::new(THUMB, THUMB))
                .into_styled(PrimitiveStyle::with_fill(Rgb888::new(70, 70, 70)))
                .draw(c);
            text(c, "missing", x + 30, y + THUMB / 2 - 5, UNKNOWN);
        }
    }
    if is_query {
        let _ = Rectangle::new(
            Point::new(x as i32 - 2, y as i32 - 2),
            Size::new(THUMB + 4, THUMB + 4),
        )
        .into_styled(PrimitiveStyle::with_stroke(QUERY, 2))
        .draw(c);
    }
    let max = (THUMB / 6) as usize;
    let ty = y + THUMB + 4;
    text(
        c,
        &fit(&tile.title, max),
        x,
        ty,
        if is_query { QUERY } else { TEXT },
    );
    let (value, colour) = match (tile.label, query) {
        (None, _) => ("?".to_string(), UNKNOWN),
        (Some(v), _) if is_query => (yes_no(v), TEXT),
        (Some(v), Some(q)) => (yes_no(v), if v == q { MATCH } else { MISMATCH }),
        (Some(v), None) => (yes_no(v), TEXT),
    };
    text(
        c,
        &fit(&format!("{task}: {value}"), max),
        x,
        ty + 12,
        colour,
    );
}

fn yes_no(v: bool) -> String {
    if v { "yes" } else { "no" }.to_string()
}

fn text(c: &mut RgbCanvas, s: &str, x: u32, y: u32, colour: Rgb888) {
    let _ = Text::with_baseline(
        s,
        Point::new(x as i32, y as i32),
        MonoTextStyle::new(&FONT_6X10, colour),
        Baseline::Top,
    )
    .draw(c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::pixelcolor::RgbColor;
    use std::collections::HashSet;

    fn tile(label: Option<bool>, image: bool) -> Tile {
        Tile {
            image: image.then(|| {
                DynamicImage::ImageRgb8(RgbImage::from_pixel(48, 48, image::Rgb([200, 10, 10])))
            }),
            title: "#1 d=0.1".into(),
            label,
        }
    }

    fn row(task: &str, query: Option<bool>, results: Vec<Tile>) -> Row {
        Row {
            task: task.into(),
            query: tile(query, true),
            results,
        }
    }

    /// The distinct colours in a result's caption value line.
    fn caption_colours(sheet: &RgbImage, row: u32, col: u32) -> HashSet<[u8; 3]> {
        let x0 = PAD + col * (THUMB + PAD) + PAD;
        let y0 = row * ROW + HEADER + THUMB + 16;
        let mut set = HashSet::new();
        for y in y0..y0 + 10 {
            for x in x0..x0 + THUMB {
                set.insert(sheet.get_pixel(x, y).0);
            }
        }
        set
    }

    fn rgb(c: Rgb888) -> [u8; 3] {
        [c.r(), c.g(), c.b()]
    }

    #[test]
    fn lays_out_query_and_results_with_match_colours() {
        let sheet = contact_sheet(
            Fit::Crop,
            &[row(
                "a_very_long_attribute_name_that_does_not_fit_anywhere",
                Some(true),
                vec![
                    tile(Some(true), true),
                    tile(Some(false), false),
                    tile(None, true),
                ],
            )],
        );
        assert_eq!(sheet.width(), PAD + 4 * (THUMB + PAD) + PAD);
        assert_eq!(sheet.height(), HEADER + THUMB + CAPTION + PAD);
        // The query thumbnail sits in the first column, framed in blue.
        assert_eq!(sheet.get_pixel(PAD + 50, HEADER + 50).0, [200, 10, 10]);
        assert_eq!(sheet.get_pixel(PAD - 2, HEADER + 50).0, rgb(QUERY));
        // The caption colours: the first result matches (green text), the second not (red).
        assert!(caption_colours(&sheet, 0, 1).contains(&rgb(MATCH)));
        assert!(caption_colours(&sheet, 0, 2).contains(&rgb(MISMATCH)));
        assert!(caption_colours(&sheet, 0, 3).contains(&rgb(UNKNOWN)));
        // A missing image is a grey box.
        let x2 = PAD + 2 * (THUMB + PAD) + PAD;
        assert_eq!(sheet.get_pixel(x2 + 2, HEADER + 2).0, [70, 70, 70]);
    }

    #[test]
    fn stacks_a_row_per_task_each_coloured_against_its_own_query_value() {
        // The same results, judged against a query that is "yes" for one task and
        // "no" for the other: the colours swap between the rows.
        let results = || vec![tile(Some(true), true), tile(Some(false), true)];
        let sheet = contact_sheet(
            Fit::Pad,
            &[
                row("smiling", Some(true), results()),
                row("young", Some(false), vec![tile(Some(true), true)]),
                row("bald", None, results()),
            ],
        );
        assert_eq!(sheet.width(), PAD + 3 * (THUMB + PAD) + PAD, "widest row");
        assert_eq!(sheet.height(), 3 * ROW + PAD);
        for r in 0..3 {
            assert_eq!(
                sheet.get_pixel(PAD + 50, r * ROW + HEADER + 50).0,
                [200, 10, 10]
            );
        }
        assert!(caption_colours(&sheet, 0, 1).contains(&rgb(MATCH)));
        assert!(caption_colours(&sheet, 0, 2).contains(&rgb(MISMATCH)));
        assert!(caption_colours(&sheet, 1, 1).contains(&rgb(MISMATCH)));
        // Unknown query value: the results' values are shown, neither green nor red.
        for col in 1..3 {
            let c = caption_colours(&sheet, 2, col);
            assert!(
                c.contains(&rgb(TEXT)) && !c.contains(&rgb(MATCH)) && !c.contains(&rgb(MISMATCH))
            );
        }
        // The short second row leaves its third column empty.
        let x2 = PAD + 2 * (THUMB + PAD) + PAD;
        assert_eq!(
            sheet.get_pixel(x2 + 50, ROW + HEADER + 50).0,
            rgb(BACKGROUND)
        );
    }

    #[test]
    fn fit_elides_the_middle() {
        assert_eq!(fit("short", 10), "short");
        assert_eq!(fit("abcdefghijkl", 7), "abc~jkl");
        assert_eq!(fit("abcdefghijkl", 7).chars().count(), 7);
    }
}

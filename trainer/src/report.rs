//! `modtrain report`: the tables and plots of one or more training runs, from the
//! `OUT.metrics.jsonl` logs [`crate::train::Trainer`] writes beside each
//! checkpoint: loss and mean test accuracy per epoch, per-task accuracy, the
//! Update Compliance Ratio between tasks ([`crate::ucr`]) as a table and a
//! heatmap, and, from the checkpoint, how far apart the tasks' learned vectors
//! are (mean and variance of `|w_i − w_j|`, paper section 3.3).
//!
//! The plots are PNGs drawn with embedded-graphics (its built-in mono fonts: no
//! font files, no system libraries) into an `image` buffer.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};

use embedded_graphics::Drawable;
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_7X13_BOLD};
use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Point, Primitive, Size};
use embedded_graphics::primitives::{Line, PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Alignment, Baseline, Text, TextStyleBuilder};

use crate::train::EpochLog;
use crate::ucr::UcrLog;
use crate::{Error, Result};

/// Suffix of the per-epoch log beside a checkpoint `OUT.safetensors`.
pub const METRICS_SUFFIX: &str = "metrics.jsonl";

/// One training run's log.
#[derive(Debug, Clone)]
pub struct Run {
    /// The checkpoint's file stem (`runs/mod.safetensors` → `mod`).
    pub name: String,
    /// The log file read.
    pub path: PathBuf,
    /// The variant, from the checkpoint's header when the checkpoint is there.
    pub variant: Option<String>,
    /// One entry per epoch, in order.
    pub epochs: Vec<EpochLog>,
    /// The tasks' learned vectors compared, from the checkpoint, for variants
    /// that have them.
    pub vectors: Option<VectorDistances>,
    /// Why the checkpoint beside the log was not used, if it was not.
    pub note: Option<String>,
}

/// Mean and variance of `|w_i − w_j|` over the elements of the task vectors
/// `w_t` the network multiplies by (modulation vectors after their ReLU, every
/// modulated layer's concatenated, or projection matrices, or CSN masks after
/// their ReLU), for every pair of tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorDistances {
    pub tasks: Vec<String>,
    /// `[i][j]`: mean of `|w_i − w_j|`.
    pub mean: Vec<Vec<f64>>,
    /// `[i][j]`: variance of `|w_i − w_j|`.
    pub variance: Vec<Vec<f64>>,
}

impl VectorDistances {
    /// The distances between the task vectors of `ckpt`, or `None` for variants
    /// without them.
    pub fn of(ckpt: &modkit_models::Checkpoint) -> Option<VectorDistances> {
        use modkit_models::{Modulation, names};
        let h = &ckpt.header;
        let t = h.tasks.len();
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); t];
        let mut take = |name: &str, relu: bool| -> Option<()> {
            let data = &ckpt.tensors.get(name)?.data;
            let per = data.len() / t.max(1);
            for (row, chunk) in rows.iter_mut().zip(data.chunks(per.max(1))) {
                row.extend(chunk.iter().map(|&v| if relu { v.max(0.0) } else { v }));
            }
            Some(())
        };
        if h.variant.is_modulated() {
            for s in h.spec.modulated_stages() {
                take(
                    &names::modulation(s.name),
                    h.spec.modulation == Modulation::Vector,
                )?;
            }
        } else if h.variant == modkit_models::Variant::Csn {
            take(names::CSN_MASKS, true)?;
        } else {
            return None;
        }
        let pair = |a: &[f32], b: &[f32]| {
            let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).collect();
            let mean = d.iter().sum::<f64>() / d.len().max(1) as f64;
            let var = d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d.len().max(1) as f64;
            (mean, var)
        };
        let stats: Vec<Vec<(f64, f64)>> = rows
            .iter()
            .map(|a| rows.iter().map(|b| pair(a, b)).collect())
            .collect();
        Some(VectorDistances {
            tasks: h.tasks.clone(),
            mean: stats
                .iter()
                .map(|r| r.iter().map(|p| p.0).collect())
                .collect(),
            variance: stats
                .iter()
                .map(|r| r.iter().map(|p| p.1).collect())
                .collect(),
        })
    }
}

impl Run {
    /// Reads a run from its checkpoint (`OUT.safetensors`) or its log
    /// (`OUT.metrics.jsonl`).
    pub fn load(path: &Path) -> Result<Run> {
        let log = if path.to_string_lossy().ends_with(METRICS_SUFFIX) {
            path.to_path_buf()
        } else {
            crate::train::existing_sibling(path, METRICS_SUFFIX)
        };
        let text = std::fs::read_to_string(&log).map_err(|source| {
            let what = if !path.exists() {
                Some("does not exist")
            } else if log != path {
                Some("has no training log beside it")
            } else {
                None
            };
            if let (std::io::ErrorKind::NotFound, Some(what)) = (source.kind(), what) {
                Error::Config(format!(
                    "{path:?} {what} ({log:?}): name a checkpoint `modtrain train` wrote, its .{METRICS_SUFFIX}, or their folder"
                ))
            } else {
                Error::Io {
                    path: log.clone(),
                    source,
                }
            }
        })?;
        let mut epochs = Vec::new();
        let mut last_line = "";
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let malformed = |msg: String| Error::Malformed {
                path: log.clone(),
                line: i + 1,
                msg,
            };
            let e: EpochLog = serde_json::from_str(line).map_err(|e| {
                malformed(format!(
                    "not an epoch log entry ({e}); is this a modtrain metrics file?"
                ))
            })?;
            // One run's log counts its epochs up one at a time (from 1, or from
            // the epoch of a checkpoint resumed without its log), over the same
            // tasks.
            let first: Option<&EpochLog> = epochs.first();
            if let Some(prev) = epochs.last().map(|p: &EpochLog| p.epoch)
                && e.epoch != prev + 1
            {
                return Err(malformed(format!(
                    "epoch {} after epoch {prev}: the file holds more than one run's lines (or was edited); report each run's own log, or cut the other run's lines",
                    e.epoch
                )));
            }
            if let Some(first) = first
                && !first.test_accuracy.keys().eq(e.test_accuracy.keys())
            {
                return Err(malformed(format!(
                    "tasks {:?}, not epoch 1's {:?}: the file holds more than one run's lines; report each run's own log",
                    e.test_accuracy.keys().collect::<Vec<_>>(),
                    first.test_accuracy.keys().collect::<Vec<_>>()
                )));
            }
            epochs.push(e);
            last_line = line;
        }
        if epochs.is_empty() {
            return Err(Error::Config(format!(
                "{log:?} holds no epoch yet: train at least one epoch first"
            )));
        }
        let stem = log.to_string_lossy();
        let stem = stem.strip_suffix(METRICS_SUFFIX).unwrap_or(&stem);
        // `OUT.safetensors`'s log is `OUT.metrics.jsonl`; a checkpoint named
        // otherwise (`run.v1`) keeps its name (`run.v1.metrics.jsonl`).
        let ckpt = [
            PathBuf::from(format!("{stem}safetensors")),
            PathBuf::from(stem.trim_end_matches('.')),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_default();
        let name = Path::new(stem.trim_end_matches('.'))
            .file_name()
            .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
        let found = modkit_models::Checkpoint::load(&ckpt).ok();
        // The checkpoint beside the log is this run's only if it holds the log's
        // last line as its metrics (a run stopped between writing the two, or a
        // file copied in from elsewhere, does not); one from before checkpoints
        // held them must be at the log's last epoch, over its tasks.
        let last = &epochs[epochs.len() - 1];
        let last_line: serde_json::Value = serde_json::from_str(last_line).unwrap_or_default();
        let mut note = None;
        let ckpt = found.filter(|c| {
            let mut tasks = c.header.tasks.clone();
            tasks.sort();
            let same = match &c.header.metrics {
                serde_json::Value::Null => {
                    c.header.epoch == last.epoch && last.test_accuracy.keys().eq(tasks.iter())
                }
                metrics => *metrics == last_line,
            };
            if !same {
                note = Some(format!(
                    "{ckpt:?} (epoch {}, tasks {:?}) is not the run its log {log:?} describes (epoch {}); its variant and task vectors are left out",
                    c.header.epoch,
                    c.header.tasks,
                    last.epoch
                ));
            }
            same
        });
        Ok(Run {
            name,
            path: log,
            variant: ckpt.as_ref().map(|c| c.header.variant.to_string()),
            vectors: ckpt.as_ref().and_then(VectorDistances::of),
            epochs,
            note,
        })
    }

    /// The last epoch's log.
    pub fn last(&self) -> &EpochLog {
        // `load` refuses empty logs.
        &self.epochs[self.epochs.len() - 1]
    }

    /// The UCR of the last epoch that measured it.
    pub fn ucr(&self) -> Option<&UcrLog> {
        self.epochs.iter().rev().find_map(|e| e.ucr.as_ref())
    }

    fn label(&self) -> String {
        match &self.variant {
            Some(v) if *v != self.name => format!("{} ({v})", self.name),
            _ => self.name.clone(),
        }
    }
}

/// What [`load_runs`] read.
#[derive(Debug)]
pub struct Runs {
    pub runs: Vec<Run>,
    /// Why each log found in a named directory that could not be read was left
    /// out (another run's lines appended by builds before session 23, a log
    /// with no epoch yet, …).
    pub skipped: Vec<String>,
}

/// The runs named by `paths`: checkpoints, logs, or directories (every
/// `*.metrics.jsonl` in them, sorted by name). A file named itself must be
/// readable; a log found in a directory that is not is left out with its reason
/// in [`Runs::skipped`], unless no log there or elsewhere is readable.
pub fn load_runs(paths: &[PathBuf]) -> Result<Runs> {
    // Each file, and whether it was found in a directory rather than named.
    let mut files: Vec<(PathBuf, bool)> = Vec::new();
    for p in paths {
        if p.is_dir() {
            let io = |source| Error::Io {
                path: p.clone(),
                source,
            };
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.to_string_lossy().ends_with(METRICS_SUFFIX))
                .collect();
            if found.is_empty() {
                return Err(Error::Config(format!(
                    "{p:?} holds no *.{METRICS_SUFFIX}: name a directory `modtrain train -o DIR/NAME.safetensors` wrote into"
                )));
            }
            found.sort();
            files.extend(found.into_iter().map(|f| (f, true)));
        } else {
            files.push((p.clone(), false));
        }
    }
    // A run named twice (its checkpoint and its log, or a folder and a file in
    // it) is reported once.
    let mut seen = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    let (mut skipped, mut first_error) = (Vec::new(), None);
    for (f, found) in &files {
        let run = match Run::load(f) {
            Ok(run) => run,
            Err(e) if *found => {
                let log = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
                if !seen.contains(&log) {
                    seen.push(log);
                    skipped.push(format!("{e}; left out of the report"));
                    first_error.get_or_insert(e);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let log = std::fs::canonicalize(&run.path).unwrap_or_else(|_| run.path.clone());
        if !seen.contains(&log) {
            seen.push(log);
            runs.push(run);
        }
    }
    // Runs of one name in different directories (`a/mod`, `b/mod`) get their
    // directory's name too, so that the tables tell them apart and their
    // heatmaps (`ucr-NAME.png`) do not overwrite each other.
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for r in &mut runs {
        if names.iter().filter(|n| **n == r.name).count() > 1
            && let Some(dir) = r.path.parent().and_then(|d| d.file_name())
        {
            r.name = format!("{}-{}", dir.to_string_lossy(), r.name);
        }
    }
    match first_error {
        Some(e) if runs.is_empty() && skipped.len() == 1 => Err(e),
        Some(e) if runs.is_empty() => Err(Error::Config(format!(
            "none of the {} logs found reads; the first: {e}",
            skipped.len()
        ))),
        _ => Ok(Runs { runs, skipped }),
    }
}

/// The first line of a report's tables (and of report.md).
const SUMMARY_HEADER: &str = "| run | epochs | loss | train acc | test acc | UCR |";

/// The runs side by side as Markdown: a summary row per run, then each task's
/// test accuracy per run, then each run's UCR table.
pub fn write_summary(out: &mut dyn Write, runs: &[Run]) -> std::io::Result<()> {
    writeln!(out, "{SUMMARY_HEADER}")?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for r in runs {
        let e = r.last();
        let ucr = r
            .ucr()
            .and_then(|u| u.mean)
            .map_or_else(|| "—".into(), |m| format!("{:.1}%", m * 100.0));
        writeln!(
            out,
            "| {} | {} | {:.4} | {:.1}% | {:.2}% | {ucr} |",
            r.label(),
            e.epoch,
            e.loss,
            e.train_accuracy * 100.0,
            e.mean_accuracy * 100.0
        )?;
    }
    let tasks: BTreeSet<&String> = runs
        .iter()
        .flat_map(|r| r.last().test_accuracy.keys())
        .collect();
    writeln!(out, "\ntest triplet accuracy, last epoch:\n")?;
    write!(out, "| task |")?;
    for r in runs {
        write!(out, " {} |", r.name)?;
    }
    write!(out, "\n|---|")?;
    for _ in runs {
        write!(out, "---|")?;
    }
    writeln!(out)?;
    for task in tasks {
        write!(out, "| {task} |")?;
        for r in runs {
            match r.last().test_accuracy.get(task) {
                Some(a) => write!(out, " {:.2}% |", a * 100.0)?,
                None => write!(out, " — |")?,
            }
        }
        writeln!(out)?;
    }
    for r in runs {
        if r.ucr().is_some() || r.vectors.is_some() {
            writeln!(out, "\n{}:\n", r.label())?;
        }
        if let Some(u) = r.ucr() {
            write_ucr_table(out, u)?;
        }
        if let Some(v) = &r.vectors {
            if r.ucr().is_some() {
                writeln!(out)?;
            }
            write_vector_table(out, v)?;
        }
    }
    Ok(())
}

/// The task vectors' distances as Markdown: `mean (variance)` of `|w_i − w_j|`.
pub fn write_vector_table(out: &mut dyn Write, v: &VectorDistances) -> std::io::Result<()> {
    writeln!(
        out,
        "|w_i − w_j| of the learned task vectors, mean (variance) over their elements:\n"
    )?;
    write_task_matrix(out, &v.tasks, |i, j| {
        (i != j).then(|| format!("{:.3} ({:.3})", v.mean[i][j], v.variance[i][j]))
    })
}

/// A UCR table as Markdown: one row and column per task, in percent.
pub fn write_ucr_table(out: &mut dyn Write, ucr: &UcrLog) -> std::io::Result<()> {
    writeln!(
        out,
        "UCR (% of the {} measured minibatches whose per-task gradients on the shared parameters agree in sign, of those where both tasks had a gradient, counted in brackets; over all pairs {}):\n",
        ucr.batches,
        ucr.mean
            .map_or_else(|| "undefined".into(), |m| format!("{:.1}%", m * 100.0))
    )?;
    write_task_matrix(out, &ucr.tasks, |i, j| {
        let r = ucr.ratio.get(i)?.get(j).copied().flatten()?;
        Some(match ucr.counted.get(i).and_then(|c| c.get(j)) {
            Some(n) => format!("{:.0} ({n})", r * 100.0),
            None => format!("{:.0}", r * 100.0),
        })
    })
}

/// A Markdown matrix over `tasks`: rows named and numbered, columns numbered,
/// `cell(i, j)` in each cell (`—` for `None`).
fn write_task_matrix(
    out: &mut dyn Write,
    tasks: &[String],
    cell: impl Fn(usize, usize) -> Option<String>,
) -> std::io::Result<()> {
    write!(out, "| |")?;
    for i in 1..=tasks.len() {
        write!(out, " {i} |")?;
    }
    write!(out, "\n|---|")?;
    for _ in tasks {
        write!(out, "---|")?;
    }
    writeln!(out)?;
    for (i, task) in tasks.iter().enumerate() {
        write!(out, "| {} {task} |", i + 1)?;
        for j in 0..tasks.len() {
            write!(out, " {} |", cell(i, j).unwrap_or_else(|| "—".into()))?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Refuses `dir` as a report's folder where it is a file, or holds files and
/// no earlier report: a folder of other files (a dataset's `loss.png`) is not
/// overwritten; an earlier report, known by its report.md, is. Called before
/// any work, and by [`write_report`].
pub fn check_report_dir(dir: &Path) -> Result<()> {
    if dir.is_file() {
        return Err(Error::Config(format!(
            "-o {dir:?} is a file; the report is a folder (report.md and the plots): name a folder"
        )));
    }
    let holds_files = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    let md = dir.join("report.md");
    let earlier = std::fs::read_to_string(&md).is_ok_and(|md| md.starts_with(SUMMARY_HEADER));
    if holds_files && !earlier {
        let holds = match md.exists() {
            true => "a report.md that modtrain report did not write",
            false => "files and no earlier report (report.md)",
        };
        return Err(Error::Config(format!(
            "-o {dir:?} holds {holds}, which the report would mix with or replace: name a new or empty folder"
        )));
    }
    Ok(())
}

/// Writes `report.md`, `loss.png`, `accuracy.png`, and where runs measured UCR
/// `ucr.png` (its mean per epoch) and one `ucr-NAME.png` heatmap per run, into
/// `dir` (each file atomically); returns their paths.
pub fn write_report(runs: &[Run], dir: &Path) -> Result<Vec<PathBuf>> {
    check_report_dir(dir)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.into(),
        source,
    })?;
    let mut written = Vec::new();
    let mut save = |name: &str, bytes: Vec<u8>| -> Result<()> {
        let path = dir.join(name);
        modkit_models::write_atomic(&path, &bytes)?;
        written.push(path);
        Ok(())
    };
    let mut md = Vec::new();
    write_summary(&mut md, runs).map_err(|source| Error::Io {
        path: dir.join("report.md"),
        source,
    })?;
    save("report.md", md)?;
    let loss = curves(runs, "training loss per epoch", |e| e.loss);
    save("loss.png", png(&loss)?)?;
    let acc = curves(runs, "mean test triplet accuracy per epoch (%)", |e| {
        e.mean_accuracy * 100.0
    });
    save("accuracy.png", png(&acc)?)?;
    let measured: Vec<Run> = runs.iter().filter(|r| r.ucr().is_some()).cloned().collect();
    if !measured.is_empty() {
        let ucr = curves(&measured, "mean UCR per epoch (%)", |e| {
            e.ucr
                .as_ref()
                .and_then(|u| u.mean)
                .map_or(f64::NAN, |m| m * 100.0)
        });
        save("ucr.png", png(&ucr)?)?;
    }
    for r in runs {
        if let Some(u) = r.ucr() {
            let title = format!("UCR, {} (%, {} minibatches)", r.label(), u.batches);
            save(&format!("ucr-{}.png", r.name), png(&heatmap(u, &title))?)?;
        }
    }
    Ok(written)
}

fn png(img: &image::RgbImage) -> Result<Vec<u8>> {
    modkit_models::output::encode_png(img)
        .map_err(|e| Error::Config(format!("encoding a PNG: {e}")))
}

/// An `image` buffer embedded-graphics draws into.
struct Plot(image::RgbImage);

impl Plot {
    fn new(w: u32, h: u32) -> Plot {
        Plot(image::RgbImage::from_pixel(
            w,
            h,
            image::Rgb([255, 255, 255]),
        ))
    }
}

impl OriginDimensions for Plot {
    fn size(&self) -> Size {
        Size::new(self.0.width(), self.0.height())
    }
}

impl DrawTarget for Plot {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(
        &mut self,
        pixels: I,
    ) -> std::result::Result<(), Infallible> {
        let (w, h) = self.0.dimensions();
        for Pixel(p, c) in pixels {
            if (0..w as i32).contains(&p.x) && (0..h as i32).contains(&p.y) {
                self.0
                    .put_pixel(p.x as u32, p.y as u32, image::Rgb([c.r(), c.g(), c.b()]));
            }
        }
        Ok(())
    }
}

/// Line colours of the runs, in order.
const PALETTE: [Rgb888; 6] = [
    Rgb888::new(31, 119, 180),
    Rgb888::new(214, 39, 40),
    Rgb888::new(44, 160, 44),
    Rgb888::new(148, 103, 189),
    Rgb888::new(255, 127, 14),
    Rgb888::new(23, 190, 207),
];

const GRID: Rgb888 = Rgb888::new(225, 225, 225);

fn text(p: &mut Plot, s: &str, at: Point, align: Alignment) {
    let style = MonoTextStyle::new(&FONT_6X10, Rgb888::BLACK);
    let ts = TextStyleBuilder::new()
        .alignment(align)
        .baseline(Baseline::Middle)
        .build();
    let _ = Text::with_text_style(s, at, style, ts).draw(p);
}

fn title(p: &mut Plot, s: &str) {
    let style = MonoTextStyle::new(&FONT_7X13_BOLD, Rgb888::BLACK);
    let _ = Text::with_baseline(s, Point::new(10, 6), style, Baseline::Top).draw(p);
}

/// A line chart of `value` per epoch, one line per run, with a legend.
fn curves(runs: &[Run], name: &str, value: impl Fn(&EpochLog) -> f64) -> image::RgbImage {
    let (w, h) = (720, 420);
    let (left, right, top, bottom) = (64, 560, 34, 380);
    let mut p = Plot::new(w, h);
    title(&mut p, name);
    let points: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            r.epochs
                .iter()
                .map(|e| (e.epoch as f64, value(e)))
                .collect()
        })
        .collect();
    let all = points.iter().flatten();
    let (mut lo, mut hi) = all
        .clone()
        .map(|&(_, v)| v)
        .filter(|v| v.is_finite())
        // So that `hi - lo` stays finite (a diverged run's loss near f64::MAX).
        .map(|v| v.clamp(-1e300, 1e300))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let step = nice_step((hi - lo) / 5.0);
    let (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let last_epoch = all.map(|&(x, _)| x).fold(1.0, f64::max);
    let (first_epoch, span) = (1.0, (last_epoch - 1.0).max(1.0));
    let px = |x: f64| left + ((x - first_epoch) / span * (right - left) as f64).round() as i32;
    // Values past the axis (the clamped extremes above) sit on its edge.
    let py = |y: f64| {
        let at = (y.clamp(lo, hi) - lo) / (hi - lo) * (bottom - top) as f64;
        bottom - at.round() as i32
    };
    let thin = |c| PrimitiveStyle::with_stroke(c, 1);
    // About five grid lines; never more than a plot can show.
    let rows = (((hi - lo) / step).round() as usize).min(50);
    for i in 0..=rows {
        let y = lo + step * i as f64;
        let _ = Line::new(Point::new(left, py(y)), Point::new(right, py(y)))
            .into_styled(thin(GRID))
            .draw(&mut p);
        text(
            &mut p,
            &format!("{y:.decimals$}"),
            Point::new(left - 4, py(y)),
            Alignment::Right,
        );
    }
    let every = (span / 10.0).ceil().max(1.0) as usize;
    for e in (1..=last_epoch as usize).step_by(every) {
        let x = e as f64;
        let _ = Line::new(Point::new(px(x), top), Point::new(px(x), bottom))
            .into_styled(thin(GRID))
            .draw(&mut p);
        text(
            &mut p,
            &format!("{x:.0}"),
            Point::new(px(x), bottom + 10),
            Alignment::Center,
        );
    }
    text(
        &mut p,
        "epoch",
        Point::new((left + right) / 2, bottom + 26),
        Alignment::Center,
    );
    let _ = Rectangle::with_corners(Point::new(left, top), Point::new(right, bottom))
        .into_styled(thin(Rgb888::BLACK))
        .draw(&mut p);
    for (i, (r, pts)) in runs.iter().zip(&points).enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let finite: Vec<Point> = pts
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|&(x, v)| Point::new(px(x), py(v)))
            .collect();
        for pair in finite.windows(2) {
            let _ = Line::new(pair[0], pair[1])
                .into_styled(PrimitiveStyle::with_stroke(c, 2))
                .draw(&mut p);
        }
        for &q in &finite {
            let _ = Rectangle::with_center(q, Size::new(5, 5))
                .into_styled(PrimitiveStyle::with_fill(c))
                .draw(&mut p);
        }
        let y = top + 8 + 16 * i as i32;
        let _ = Rectangle::new(Point::new(right + 12, y - 4), Size::new(16, 8))
            .into_styled(PrimitiveStyle::with_fill(c))
            .draw(&mut p);
        let label: String = r.label().chars().take(20).collect();
        text(&mut p, &label, Point::new(right + 32, y), Alignment::Left);
    }
    p.0
}

/// The smallest of 1, 2 and 5 × 10ᵏ at least `raw`: a round axis step.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let scale = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * scale)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * scale)
}

/// The heatmap colour of a UCR: red at 0 (always conflicting), white at ½,
/// blue at 1 (always compliant); grey where there is none.
pub fn ucr_color(r: Option<f64>) -> Rgb888 {
    let Some(r) = r else {
        return Rgb888::new(200, 200, 200);
    };
    let r = r.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64, t: f64| (a + (b - a) * t).round() as u8;
    if r < 0.5 {
        let t = r / 0.5;
        Rgb888::new(
            mix(214.0, 255.0, t),
            mix(39.0, 255.0, t),
            mix(40.0, 255.0, t),
        )
    } else {
        let t = (r - 0.5) / 0.5;
        Rgb888::new(
            mix(255.0, 31.0, t),
            mix(255.0, 119.0, t),
            mix(255.0, 180.0, t),
        )
    }
}

/// Side of one heatmap cell for `tasks` tasks, in pixels.
fn cell_side(tasks: usize) -> u32 {
    (560 / tasks.max(1) as u32).clamp(12, 48)
}

/// Where the heatmap's cell grid starts.
const HEAT_ORIGIN: Point = Point::new(150, 40);

/// The UCR matrix as a heatmap, tasks labelled on the rows, numbered on the
/// columns, the percentage in each cell where it fits.
fn heatmap(ucr: &UcrLog, name: &str) -> image::RgbImage {
    let n = ucr.tasks.len();
    let cell = cell_side(n);
    let (w, h) = (
        (HEAT_ORIGIN.x as u32 + cell * n as u32 + 20).max(470),
        HEAT_ORIGIN.y as u32 + cell * n as u32 + 44,
    );
    let mut p = Plot::new(w, h);
    title(&mut p, name);
    let at = |i: usize| i as i32 * cell as i32;
    for (t, (task, row)) in ucr.tasks.iter().zip(&ucr.ratio).enumerate() {
        let y = HEAT_ORIGIN.y + at(t);
        let label: String = format!("{} {task}", t + 1).chars().take(22).collect();
        text(
            &mut p,
            &label,
            Point::new(HEAT_ORIGIN.x - 6, y + cell as i32 / 2),
            Alignment::Right,
        );
        for (u, r) in row.iter().enumerate() {
            let x = HEAT_ORIGIN.x + at(u);
            let _ = Rectangle::new(Point::new(x, y), Size::new(cell, cell))
                .into_styled(PrimitiveStyle::with_fill(ucr_color(*r)))
                .draw(&mut p);
            if let (Some(r), true) = (r, cell >= 24) {
                let center = Point::new(x + cell as i32 / 2, y + cell as i32 / 2);
                text(
                    &mut p,
                    &format!("{:.0}", r * 100.0),
                    center,
                    Alignment::Center,
                );
            }
        }
    }
    for u in 0..n {
        let x = HEAT_ORIGIN.x + at(u) + cell as i32 / 2;
        let y = HEAT_ORIGIN.y + at(n) + 10;
        if cell >= 18 || u % 2 == 0 {
            text(
                &mut p,
                &format!("{}", u + 1),
                Point::new(x, y),
                Alignment::Center,
            );
        }
    }
    text(
        &mut p,
        "blue: the tasks' gradients mostly agree; red: mostly conflict; grey: none",
        Point::new(10, HEAT_ORIGIN.y + at(n) + 28),
        Alignment::Left,
    );
    p.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(tasks: &[&str], ratio: Vec<Vec<Option<f64>>>) -> UcrLog {
        UcrLog {
            tasks: tasks.iter().map(|s| s.to_string()).collect(),
            batches: 10,
            mean: Some(0.5),
            counted: vec![vec![8; tasks.len()]; tasks.len()],
            ratio,
        }
    }

    #[test]
    fn heatmap_cells_carry_their_ratio_colour() {
        let u = log(
            &["smiling", "young", "bald"],
            vec![
                vec![None, Some(1.0), Some(0.0)],
                vec![Some(1.0), None, Some(0.5)],
                vec![Some(0.0), Some(0.5), None],
            ],
        );
        let img = heatmap(&u, "t");
        let cell = cell_side(3) as i32;
        // A corner pixel of each cell, clear of the centred number.
        let at = |t: i32, u: i32| {
            let px = img.get_pixel(
                (HEAT_ORIGIN.x + u * cell + 2) as u32,
                (HEAT_ORIGIN.y + t * cell + 2) as u32,
            );
            Rgb888::new(px[0], px[1], px[2])
        };
        assert_eq!(at(0, 1), ucr_color(Some(1.0)));
        assert_eq!(at(0, 2), ucr_color(Some(0.0)));
        assert_eq!(at(1, 2), Rgb888::WHITE);
        assert_eq!(at(2, 2), ucr_color(None));
        assert_ne!(ucr_color(Some(0.0)), ucr_color(Some(1.0)));
    }

    #[test]
    fn vector_distances_by_hand() {
        use modkit_models::{
            Checkpoint, CheckpointHeader, NetSpec, Preprocess, TensorData, Variant,
        };
        let spec = NetSpec::tiny();
        let stages = spec.modulated_stages();
        let mut tensors = std::collections::BTreeMap::new();
        // Two tasks: task 0 all ones, task 1 ones except the first channel of every
        // stage at −1, which the ReLU makes 0: |w_0 − w_1| is 1 there, else 0.
        let mut ones = 0;
        for s in &stages {
            let mut data = vec![1f32; 2 * s.channels];
            data[s.channels] = -1.0;
            ones += s.channels;
            tensors.insert(
                modkit_models::names::modulation(s.name),
                TensorData::new(vec![2, s.channels], data).expect("tensor"),
            );
        }
        let ckpt = Checkpoint {
            header: CheckpointHeader {
                spec,
                variant: Variant::Modulated,
                tasks: vec!["a".into(), "b".into()],
                preprocess: Preprocess::default(),
                epoch: 1,
                train_config: serde_json::Value::Null,
                metrics: serde_json::Value::Null,
            },
            tensors,
        };
        let v = VectorDistances::of(&ckpt).expect("modulated");
        let p = stages.len() as f64 / ones as f64;
        assert!((v.mean[0][1] - p).abs() < 1e-12, "{:?}", v.mean);
        assert!((v.variance[1][0] - p * (1.0 - p)).abs() < 1e-12);
        assert_eq!(v.mean[0][0], 0.0);
        let mut out = Vec::new();
        write_vector_table(&mut out, &v).expect("table");
        let text = String::from_utf8(out).expect("utf8");
        assert!(
            text.contains(&format!("| 1 a | — | {p:.3} ({:.3}) |", p * (1.0 - p))),
            "{text}"
        );
        let mut shared = ckpt.clone();
        shared.header.variant = Variant::Shared;
        assert!(VectorDistances::of(&shared).is_none());
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.031), 0.05);
        assert_eq!(nice_step(20.0), 20.0);
        assert_eq!(nice_step(0.0), 1.0);
    }

    /// One task's epoch with `loss`.
    fn epoch_log(epoch: usize, loss: f64) -> EpochLog {
        EpochLog {
            epoch,
            loss,
            train_accuracy: 0.5,
            test_accuracy: [("smiling".to_string(), 0.5)].into(),
            mean_accuracy: 0.5,
            lr: 0.01,
            seconds: 1.0,
            images_per_second: 1.0,
            step_seconds: Default::default(),
            ucr: None,
            relation_loss: None,
        }
    }

    /// A diverged run's loss near ±f64::MAX: a plot with a few grid lines, not
    /// an endless loop over `usize::MAX` of them.
    #[test]
    fn extreme_losses_still_plot() {
        let epoch = epoch_log;
        let run = Run {
            name: "r".into(),
            path: PathBuf::from("r.metrics.jsonl"),
            variant: None,
            epochs: vec![epoch(1, -1.7e308), epoch(2, 1.7e308), epoch(3, f64::NAN)],
            vectors: None,
            note: None,
        };
        let img = curves(&[run], "loss", |e| e.loss);
        assert_eq!(img.dimensions(), (720, 420));
    }

    /// A checkpoint resumed without its log starts its new log past epoch 1;
    /// a log that counts back or skips holds more than one run.
    #[test]
    fn a_log_counts_up_one_epoch_at_a_time_from_any_start() {
        let line = |epoch: usize| serde_json::to_string(&epoch_log(epoch, 0.5)).expect("json");
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("r.metrics.jsonl");
        std::fs::write(&log, format!("{}\n{}\n", line(3), line(4))).expect("log");
        let run = Run::load(&log).expect("from epoch 3");
        assert_eq!(
            run.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
            [3, 4]
        );
        for epochs in [[1, 3], [2, 1]] {
            let text = format!("{}\n{}\n", line(epochs[0]), line(epochs[1]));
            std::fs::write(&log, text).expect("log");
            let err = Run::load(&log).expect_err("two runs").to_string();
            assert!(
                err.contains("line 2") && err.contains("more than one run"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_missing_log_and_a_file_for_the_folder_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("a.safetensors");
        std::fs::write(&file, "x").expect("file");
        let err = write_report(&[], &file).expect_err("a file").to_string();
        assert!(err.contains("is a file"), "{err}");
        // A folder of other files: refused, untouched.
        let images = dir.path().join("images");
        std::fs::create_dir(&images).expect("mkdir");
        std::fs::write(images.join("loss.png"), b"a face").expect("png");
        let err = write_report(&[], &images)
            .expect_err("other files")
            .to_string();
        assert!(err.contains("no earlier report"), "{err}");
        assert_eq!(
            std::fs::read(images.join("loss.png")).expect("png"),
            b"a face"
        );
        let err = load_runs(&[dir.path().join("nosuch")])
            .expect_err("no such run")
            .to_string();
        assert!(err.contains("nosuch\" does not exist"), "{err}");
        let err = load_runs(&[file]).expect_err("no log").to_string();
        assert!(err.contains("has no training log beside it"), "{err}");
    }

    #[test]
    fn ucr_table_lists_every_pair() {
        let u = log(
            &["smiling", "young"],
            vec![vec![None, Some(0.625)], vec![Some(0.625), None]],
        );
        let mut out = Vec::new();
        write_ucr_table(&mut out, &u).expect("write");
        let s = String::from_utf8(out).expect("utf8");
        assert!(s.contains("| 1 smiling | — | 62 (8) |"), "{s}");
        assert!(s.contains("| 2 young | 62 (8) | — |"), "{s}");
        assert!(s.contains("10 measured minibatches"), "{s}");
    }

    #[test]
    fn bad_paths_name_themselves() {
        let dir = std::env::temp_dir().join(format!("modtrain-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let err = load_runs(std::slice::from_ref(&dir)).expect_err("empty dir");
        assert!(
            err.to_string().contains("holds no *.metrics.jsonl"),
            "{err}"
        );
        let missing = dir.join("none.safetensors");
        let err = load_runs(&[missing]).expect_err("missing");
        assert!(err.to_string().contains("none.metrics.jsonl"), "{err}");
        let bad = dir.join("bad.metrics.jsonl");
        std::fs::write(&bad, "{\"epoch\": 1}\n").expect("write");
        let err = load_runs(&[bad]).expect_err("bad line");
        assert!(err.to_string().contains("line 1"), "{err}");
        let empty = dir.join("empty.metrics.jsonl");
        std::fs::write(&empty, "").expect("write");
        let err = load_runs(&[empty]).expect_err("empty");
        assert!(err.to_string().contains("holds no epoch"), "{err}");
        // Found in the folder, the two are refused only while no log there reads.
        let err = load_runs(std::slice::from_ref(&dir)).expect_err("no good log");
        assert!(
            err.to_string().contains("none of the 2 logs found reads")
                && err.to_string().contains("bad.metrics.jsonl"),
            "{err}"
        );
        let line = serde_json::to_string(&epoch_log(1, 0.5)).expect("json");
        std::fs::write(dir.join("good.metrics.jsonl"), format!("{line}\n")).expect("write");
        let found = load_runs(std::slice::from_ref(&dir)).expect("the good log");
        assert_eq!(found.runs.len(), 1);
        assert_eq!(found.runs[0].name, "good");
        assert_eq!(found.skipped.len(), 2, "{:?}", found.skipped);
        assert!(
            found.skipped[0].contains("bad.metrics.jsonl")
                && found.skipped[0].contains("line 1")
                && found.skipped[0].ends_with("left out of the report"),
            "{:?}",
            found.skipped
        );
        assert!(
            found.skipped[1].contains("holds no epoch"),
            "{:?}",
            found.skipped
        );
        // The folder named twice: each log read, or left out, once.
        let twice = load_runs(&[dir.clone(), dir.clone()]).expect("twice");
        assert_eq!((twice.runs.len(), twice.skipped.len()), (1, 2));
        std::fs::remove_dir_all(&dir).expect("clean");
    }
}

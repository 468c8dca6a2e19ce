//! `modrt`: on-device multi-task image retrieval with a compiled `.modpack`.
//! See `modrt --help`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};
use modkit_models::output::{self, Output};
use modkit_runtime::index::{self, GalleryIndex};
use modkit_runtime::sheet::{MAX_RESULTS, Row, Tile, contact_sheet};
use modkit_runtime::{Model, Options, bench, input};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run a compiled modkit package: embed images for any set of tasks (the shared
/// trunk once per image, the short per-task tails batched), index a gallery and
/// answer attribute queries against it.
///
/// A model trained on the built-in synthetic faces ships in models/pretrained/:
///
///   modrt index faces/ --model models/pretrained/tiny-faces.modpack -o faces.modidx
///   modrt query faces/000042.png --task smiling --model models/pretrained/tiny-faces.modpack --index faces.modidx --sheet top5.png
#[derive(Debug, Parser)]
#[command(name = "modrt", version, about, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Index(IndexArgs),
    Query(QueryArgs),
    Embed(EmbedArgs),
    Eval(EvalArgs),
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// The compiled package (`modc compile CKPT -o model.modpack`).
    #[arg(long, short)]
    model: PathBuf,
    /// Threads for tract's matrix products, 1 to 256 or the core count (1 is tract's single-threaded
    /// default; the core count is the most that helps).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

impl ModelArgs {
    fn load(&self) -> Result<Model> {
        Ok(Model::load_with(
            &self.model,
            &Options {
                threads: self.threads,
            },
        )?)
    }
}

/// Embed every image of a folder (recursively: .jpg, .jpeg, .png) for every task
/// and write a gallery index. Each image's trunk runs once; all tasks' tails run
/// in one batched call. Unreadable images are reported and skipped. A CelebA-layout
/// folder (img_align_celeba/ + Anno/list_attr_celeba.txt, as `modtrain synth`
/// writes) is its img_align_celeba/ folder: those images are indexed (images
/// elsewhere in the folder are not), with each one's attribute values, shown by
/// `query` and scored by `eval`.
/// Images are embedded in parallel on all cores (RAYON_NUM_THREADS limits it).
///
/// Example: modrt index faces/ --model model.modpack -o faces.modidx
#[derive(Debug, Args)]
struct IndexArgs {
    /// Folder of gallery images.
    dir: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// The index to write: a new file, or an old index to replace (or extend,
    /// `--append`).
    #[arg(long, short)]
    out: PathBuf,
    /// Index only these tasks (comma list); default: all of the package's.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Keep OUT's images and embed only the ones it does not hold yet.
    #[arg(long)]
    append: bool,
}

/// Find the gallery images nearest to IMAGE, for one task or several
///
/// With several tasks (a comma list) the trunk runs once, each task searches
/// with its own embedding, and the contact sheet gets a row per task.
///
/// Examples:
///   modrt query q.png --task smiling --model model.modpack --index faces.modidx -k 5 --sheet top5.png
///   modrt query q.png --task smiling,young,bangs --model model.modpack --index faces.modidx --sheet sheet.png
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
struct QueryArgs {
    image: PathBuf,
    /// The task (attribute) to search by, e.g. smiling; a comma list searches by
    /// each (smiling,young).
    #[arg(long, short, required = true, value_delimiter = ',')]
    task: Vec<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// The gallery index (`modrt index`).
    #[arg(long, short)]
    index: PathBuf,
    /// How many results.
    #[arg(short, default_value_t = 5)]
    k: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Write a contact sheet PNG, a row per task: the query, then the results with
    /// rank, distance and attribute value: at most 50 per row, so a larger -k is
    /// refused where the gallery has more than 50 images. It must be a new
    /// file or an old sheet (a PNG modrt marked as its own), not the query, the
    /// package, the index, a gallery image or any other PNG.
    #[arg(long)]
    sheet: Option<PathBuf>,
    /// Keep the query image itself in the results when it is in the gallery.
    #[arg(long)]
    include_self: bool,
}

/// Print an image's embedding for one task or all.
///
/// Example: modrt embed q.png --model model.modpack --task smiling --json
#[derive(Debug, Args)]
struct EmbedArgs {
    image: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// One task; default: every task of the package.
    #[arg(long, short)]
    task: Option<String>,
    #[arg(long)]
    json: bool,
}

/// Retrieval quality of a labelled gallery, per task: every image with a known
/// value queries the others with known values (leave one out), and precision@k
/// is the mean fraction of its k nearest that share its value, beside what
/// random results would score. k is capped at the other labelled images. Needs
/// an index of a CelebA-layout folder (attribute values).
///
/// Example: modrt eval --index faces.modidx -k 5
#[derive(Debug, Args)]
struct EvalArgs {
    /// The gallery index (`modrt index`).
    #[arg(long, short)]
    index: PathBuf,
    /// Results per query.
    #[arg(short, default_value_t = 5)]
    k: usize,
    /// Tasks to evaluate (comma list); default: every task the index holds.
    #[arg(long, short, value_delimiter = ',')]
    tasks: Vec<String>,
    #[arg(long)]
    json: bool,
}

/// Median latency of the trunk, one tail, all tasks' tails batched, and the naive
/// alternative (a full pass per task), with their ratios, all from one run.
///
/// Example: modrt bench --model model.modpack --tasks 20 --threads 2
#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use the package's first N tasks; default: all.
    #[arg(long)]
    tasks: Option<usize>,
    /// Timed calls per measurement, 1 to 100000 (after one warm-up; the model's
    /// six measurements take turns, round by round).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Gallery size for the search timing (random embeddings).
    #[arg(long, default_value_t = 100_000)]
    gallery: usize,
    /// Image to run on; default: a fixed synthetic pattern.
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// Appends a line to a command's output. Commands return their stdout as a string
/// and `main` writes it, so a closed pipe (`modrt query ... | head -1`) is an
/// error `main` can ignore rather than a panic inside `println!`.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

fn bar(len: usize, prefix: &str) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {per_sec} ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

impl IndexArgs {
    fn run(self) -> Result<String> {
        let mut out = String::new();
        output::check(
            &self.out,
            Output::Container(&index::KIND),
            &[(&self.model.model, "the package")],
        )?;
        let model = self.model.load()?;
        let tasks = model.select_tasks(&self.tasks)?;
        let existing = if self.append && self.out.exists() {
            Some(GalleryIndex::load_for(&self.out, &model)?)
        } else {
            None
        };
        // Appending keeps the index's tasks: without --tasks, or with them in
        // another order (another set is refused when building).
        let tasks = match &existing {
            Some(old) => {
                let held: Vec<String> = old.tasks.iter().map(|t| t.task.clone()).collect();
                let held = model.select_tasks(&held)?;
                let same_set = {
                    let (mut a, mut b) = (tasks.clone(), held.clone());
                    a.sort_unstable();
                    b.sort_unstable();
                    a == b
                };
                if self.tasks.is_empty() || same_set {
                    held
                } else {
                    tasks
                }
            }
            None => tasks,
        };
        let pb = bar(0, "embedding");
        let progress = |done: usize, total: usize| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        };
        let (index, report) = index::build(&model, &self.dir, &tasks, existing, &progress)?;
        pb.finish_and_clear();
        for (id, why) in &report.skipped {
            eprintln!("modrt: skipped {id}: {why}");
        }
        if index.ids.is_empty() {
            bail!(
                "no image of {:?} could be read ({} skipped); nothing to index",
                self.dir,
                report.skipped.len()
            );
        }
        index.save(&self.out)?;
        let rate = report.added as f64 / report.seconds.max(1e-9);
        say!(
            out,
            "indexed {} images ({} new, {} kept, {} skipped) x {} tasks in {:.1} s ({:.1} images/s) -> {}",
            index.ids.len(),
            report.added,
            report.kept,
            report.skipped.len(),
            index.tasks.len(),
            report.seconds,
            rate,
            self.out.display()
        );
        Ok(out)
    }
}

fn label(v: i8) -> Option<bool> {
    match v {
        1 => Some(true),
        -1 => Some(false),
        _ => None,
    }
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

/// One task's answer to a query.
struct TaskAnswer {
    task: String,
    /// The query's own value for the task, when it is in the labelled gallery.
    query_label: Option<bool>,
    /// (row, distance, path, value), nearest first.
    results: Vec<(usize, f32, PathBuf, Option<bool>)>,
    /// The fraction of the results with a known value that share the query's,
    /// when the query's is known and any result's is.
    precision: Option<f64>,
    /// Results whose value is known: what `precision` is over.
    labelled: usize,
}

impl TaskAnswer {
    fn json(&self, index: &GalleryIndex) -> serde_json::Value {
        serde_json::json!({
            "task": self.task,
            "query_label": self.query_label,
            "results": self.results.iter().enumerate().map(|(i, (row, d, path, l))| serde_json::json!({
                "rank": i + 1,
                "id": index.ids[*row],
                "path": path,
                "distance": d,
                "label": l,
            })).collect::<Vec<_>>(),
            "precision": self.precision,
            "labelled": self.labelled,
        })
    }
}

impl QueryArgs {
    fn run(self) -> Result<String> {
        let mut out = String::new();
        if self.k == 0 {
            bail!("-k 0: ask for at least one result");
        }
        let model = self.model.load()?;
        let tasks = model.select_tasks(&self.task)?;
        let index = GalleryIndex::load_for(&self.index, &model)?;
        if let Some(sheet) = &self.sheet {
            if self.k.min(index.ids.len()) > MAX_RESULTS {
                bail!(
                    "-k {}: a --sheet draws at most {} results per task; lower -k, or drop --sheet and read the list",
                    self.k,
                    MAX_RESULTS
                );
            }
            let inputs = [
                (self.image.as_path(), "the query image"),
                (&self.model.model, "the package"),
                (&self.index, "the index"),
            ];
            output::check(sheet, Output::Png, &inputs)?;
            // An old sheet may be replaced, a PNG of the gallery not (should it
            // be a sheet modkit wrote).
            if index.find(sheet).is_some() {
                bail!(
                    "--sheet {sheet:?} is an image of the gallery; name a new file for the sheet"
                );
            }
        }
        // Every task must be indexed before any image work.
        let names: Vec<String> = tasks.iter().map(|&t| model.tasks()[t].clone()).collect();
        let task_rows = index.select(&names, &self.index)?;
        let img = input::open(&self.image)?;
        let features = model.trunk(&model.prepare(&img)?)?;
        let queries = model.embed_all(&features, &tasks)?;
        let own_row = index.find(&self.image);
        let exclude = own_row.filter(|_| !self.include_self);
        let mut answers = Vec::with_capacity(tasks.len());
        for (rows, query) in task_rows.into_iter().zip(&queries) {
            let task = rows.task.clone();
            let hits = index.search(rows, query, self.k, exclude);
            let query_label = own_row.and_then(|r| label(rows.labels[r]));
            let results: Vec<(usize, f32, PathBuf, Option<bool>)> = hits
                .iter()
                .map(|h| {
                    (
                        h.row,
                        h.distance,
                        index.path(h.row),
                        label(rows.labels[h.row]),
                    )
                })
                .collect();
            let known: Vec<bool> = results.iter().filter_map(|r| r.3).collect();
            let precision = query_label
                .filter(|_| !known.is_empty())
                .map(|q| known.iter().filter(|&&v| v == q).count() as f64 / known.len() as f64);
            answers.push(TaskAnswer {
                task,
                query_label,
                results,
                precision,
                labelled: known.len(),
            });
        }
        if let Some(sheet) = &self.sheet {
            // Rows of several tasks share many results: each image is decoded once.
            let mut decoded: HashMap<usize, Option<DynamicImage>> = HashMap::new();
            let mut thumb = |row: usize, path: &Path| {
                decoded
                    .entry(row)
                    .or_insert_with(|| input::open(path).ok())
                    .clone()
            };
            let rows: Vec<Row> = answers
                .iter()
                .map(|a| Row {
                    task: a.task.clone(),
                    query: Tile {
                        image: Some(img.clone()),
                        title: "query".to_string(),
                        label: a.query_label,
                    },
                    results: a
                        .results
                        .iter()
                        .enumerate()
                        .map(|(i, (row, d, path, l))| Tile {
                            image: thumb(*row, path),
                            title: format!("#{} d={d:.3}", i + 1),
                            label: *l,
                        })
                        .collect(),
                })
                .collect();
            write_png(sheet, &contact_sheet(model.preprocess().fit, &rows))?;
        }
        if self.json {
            // One task keeps the flat form; several list one such object per task.
            let json = match answers.as_slice() {
                [one] => {
                    let mut v = one.json(&index);
                    v["query"] = serde_json::json!(self.image);
                    v["gallery_images"] = serde_json::json!(index.ids.len());
                    v["sheet"] = serde_json::json!(self.sheet);
                    v
                }
                _ => serde_json::json!({
                    "query": self.image,
                    "gallery_images": index.ids.len(),
                    "tasks": answers.iter().map(|a| a.json(&index)).collect::<Vec<_>>(),
                    "sheet": self.sheet,
                }),
            };
            say!(out, "{}", serde_json::to_string_pretty(&json)?);
            return Ok(out);
        }
        for (i, a) in answers.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let task_name = &a.task;
            say!(
                out,
                "query {} ({task_name}: {}), {} nearest of {} images{}",
                self.image.display(),
                yes_no(a.query_label),
                a.results.len(),
                index.ids.len() - usize::from(exclude.is_some()),
                if exclude.is_some() {
                    " (itself left out)"
                } else {
                    ""
                }
            );
            say!(
                out,
                "{:>4}  {:>9}  {:>8}  image",
                "rank",
                "distance",
                "value"
            );
            for (i, (_, d, path, l)) in a.results.iter().enumerate() {
                say!(
                    out,
                    "{:>4}  {d:>9.5}  {:>8}  {}",
                    i + 1,
                    yes_no(*l),
                    path.display()
                );
            }
            match a.precision {
                Some(p) if a.labelled == a.results.len() => say!(
                    out,
                    "precision@{}: {p:.2} (results with the query's {task_name} value)",
                    a.results.len()
                ),
                Some(p) => say!(
                    out,
                    "precision: {p:.2} over the {} of {} results whose {task_name} value is known",
                    a.labelled,
                    a.results.len()
                ),
                None if a.query_label.is_none() => {
                    say!(
                        out,
                        "(no precision: the query's {task_name} value is unknown)"
                    )
                }
                None => say!(
                    out,
                    "(no precision: no result's {task_name} value is known)"
                ),
            }
        }
        if let Some(sheet) = &self.sheet {
            say!(out, "sheet: {}", sheet.display());
        }
        Ok(out)
    }
}

fn write_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    let bytes = output::encode_png(img).context("encoding the PNG")?;
    modkit_models::write_atomic(path, &bytes)?;
    Ok(())
}

impl EmbedArgs {
    fn run(self) -> Result<String> {
        let mut out = String::new();
        let model = self.model.load()?;
        let tasks = match &self.task {
            Some(t) => vec![model.task_index(t)?],
            None => (0..model.tasks().len()).collect(),
        };
        let features = model.trunk(&model.load_image(&self.image)?)?;
        let embeddings = model.embed_all(&features, &tasks)?;
        if self.json {
            let map: serde_json::Map<String, serde_json::Value> = tasks
                .iter()
                .zip(&embeddings)
                .map(|(&t, e)| (model.tasks()[t].clone(), serde_json::json!(e)))
                .collect();
            say!(out, "{}", serde_json::to_string_pretty(&map)?);
        } else {
            for (&t, e) in tasks.iter().zip(&embeddings) {
                let v: Vec<String> = e.iter().map(|x| format!("{x:.5}")).collect();
                say!(out, "{}: [{}]", model.tasks()[t], v.join(", "));
            }
        }
        Ok(out)
    }
}

/// A fixed, image-like pattern (the latency does not depend on content).
fn pattern(side: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x ^ y) % 256) as u8,
        ])
    }))
}

impl EvalArgs {
    fn run(self) -> Result<String> {
        let mut out = String::new();
        if self.k == 0 {
            bail!("-k 0: ask for at least one result per query");
        }
        let index = GalleryIndex::load(&self.index)?;
        let rows: Vec<&index::TaskRows> = if self.tasks.is_empty() {
            index.tasks.iter().collect()
        } else {
            index.select(&self.tasks, &self.index)?
        };
        let mut results = Vec::new();
        for r in rows {
            match index.retrieval(r, self.k) {
                Some(q) => results.push(q),
                None if self.tasks.is_empty() => {}
                None => bail!(
                    "{:?} holds no attribute values for {:?}: index a CelebA-layout folder (img_align_celeba/ + Anno/list_attr_celeba.txt)",
                    self.index,
                    r.task
                ),
            }
        }
        if results.is_empty() {
            bail!(
                "{:?} holds no attribute values: index a CelebA-layout folder (img_align_celeba/ + Anno/list_attr_celeba.txt)",
                self.index
            );
        }
        let mean = results.iter().map(|r| r.precision).sum::<f64>() / results.len() as f64;
        if self.json {
            let v = serde_json::json!({ "k": self.k, "tasks": results, "mean_precision": mean });
            say!(out, "{}", serde_json::to_string_pretty(&v)?);
            return Ok(out);
        }
        say!(
            out,
            "{:<22} {:>8} {:>4} {:>12} {:>8}",
            "task",
            "queries",
            "k",
            "precision@k",
            "chance"
        );
        for r in &results {
            say!(
                out,
                "{:<22} {:>8} {:>4} {:>12.3} {:>8.3}",
                r.task,
                r.queries,
                r.k,
                r.precision,
                r.chance
            );
        }
        say!(out, "{:<22} {:>8} {:>4} {:>12.3}", "mean", "", "", mean);
        if results.iter().any(|r| r.k < self.k) {
            say!(
                out,
                "(-k {} is more than some tasks' other labelled images; their k is capped)",
                self.k
            );
        }
        Ok(out)
    }
}

impl BenchArgs {
    fn run(self) -> Result<String> {
        let mut out = String::new();
        let model = self.model.load()?;
        let all = model.tasks().len();
        let n = self.tasks.unwrap_or(all);
        if n == 0 || n > all {
            bail!("--tasks {n}: the package has {all} tasks; use 1..={all}");
        }
        let tasks: Vec<usize> = (0..n).collect();
        let img = match &self.image {
            Some(p) => input::open(p)?,
            None => pattern(model.input_size() as u32),
        };
        let x = model.prepare(&img)?;
        let r = bench::run(
            &model,
            &x,
            &tasks,
            self.runs,
            self.model.threads,
            self.gallery,
        )?;
        if self.json {
            let mut v = serde_json::to_value(&r)?;
            v["all_over_one"] = r.all_over_one().into();
            v["naive_over_all"] = r.naive_over_all().into();
            v["spec"] = model.spec().name.clone().into();
            v["variant"] = model.variant().to_string().into();
            say!(out, "{}", serde_json::to_string_pretty(&v)?);
            return Ok(out);
        }
        let folded = tasks
            .iter()
            .filter(|&&t| model.route(t) == modkit_runtime::Route::Folded)
            .count();
        let (route, tails) = match folded {
            0 => ("switch tails".to_string(), "all tasks' tails, batched"),
            f if f == n => (
                "folded tails".to_string(),
                "all tasks' tails, one call each",
            ),
            f => (
                format!("{f} folded tails, {} switch", n - f),
                "all tasks' tails (switch batched)",
            ),
        };
        say!(
            out,
            "{} spec {}x{}, {} of {all} tasks ({route}), {} thread(s), median of {} interleaved runs",
            model.spec().name,
            model.input_size(),
            model.input_size(),
            n,
            r.threads,
            r.runs
        );
        let rows = [
            ("trunk (once per image)", r.trunk_ms),
            ("one task's tail", r.one_tail_ms),
            (tails, r.all_tails_ms),
            ("one task: trunk + tail", r.one_task_ms),
            ("all tasks: trunk + all tails", r.all_tasks_ms),
            ("naive: a full pass per task", r.naive_ms),
        ];
        for (what, ms) in rows {
            say!(out, "  {what:<34} {ms:>10.3} ms");
        }
        let search = format!("top-5 search of {} embeddings", r.search_rows);
        say!(out, "  {search:<34} {:>10.3} ms", r.search_ms);
        say!(out, "  all tasks / one task   {:>6.2}x", r.all_over_one());
        say!(out, "  naive / all tasks      {:>6.2}x", r.naive_over_all());
        Ok(out)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match modkit_models::threads::check_rayon_env() {
        Err(e) => Err(e.into()),
        Ok(()) => match cli.command {
            Command::Index(a) => a.run(),
            Command::Query(a) => a.run(),
            Command::Embed(a) => a.run(),
            Command::Eval(a) => a.run(),
            Command::Bench(a) => a.run(),
        },
    };
    let result = result.and_then(|out| {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(out.as_bytes())?;
        Ok(stdout.flush()?)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("modrt: {}", modkit_models::one_line(err.as_ref()));
            ExitCode::from(2)
        }
    }
}

//! `firmware-demo`: attribute retrieval on a small screen. See `--help`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{OriginDimensions, RgbColor};
use modkit_firmware_demo::app::{Demo, Folder, Query, QuerySource, Ranked};
use modkit_firmware_demo::fb::Framebuffer;
use modkit_firmware_demo::screen::{self, Frame};
use modkit_models::celeba::IMAGES;
use modkit_models::output::{self, Output};
use modkit_runtime::canvas::RgbCanvas;
use modkit_runtime::{GalleryIndex, Model, Options};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// On-device attribute retrieval: shows a query image, the task it searches by,
/// the best matches from a gallery index and how long each stage took (trunk once
/// per query, one short tail per task, search).
///
/// Keys (type then Enter): n or empty = next task, p = previous task,
/// j = next query, k = previous query, q = quit. `--gpio` adds a push button.
///
/// Examples:
///   firmware-demo -m model.modpack -i faces.modidx --queries queries/ --display fb:/dev/fb0
///   firmware-demo -m model.modpack -i faces.modidx --queries q.png --task smiling --once --display png:frame.png
#[derive(Debug, Parser)]
#[command(name = "firmware-demo", version, about, verbatim_doc_comment)]
struct Cli {
    /// The compiled package.
    #[arg(long, short)]
    model: PathBuf,
    /// The gallery index (`modrt index`), built with the same package.
    #[arg(long, short)]
    index: PathBuf,
    /// Where the gallery images are now, if not where they were indexed (the
    /// index stores paths relative to this folder): the folder given to
    /// `modrt index`, or a CelebA-layout folder holding img_align_celeba/.
    #[arg(long)]
    gallery: Option<PathBuf>,
    /// A query image, or a folder of them (.jpg/.png, in name order).
    #[arg(long, short)]
    queries: PathBuf,
    /// Tasks to cycle through (comma list); default: all the index holds.
    #[arg(long, short, value_delimiter = ',')]
    task: Vec<String>,
    /// Results per screen.
    #[arg(short, default_value_t = 5)]
    k: usize,
    /// `png:PATH` (a `{}` in PATH becomes query-task, one file per screen) or
    /// `fb:/dev/fb0` (the Linux framebuffer, RGB565 or XRGB8888).
    #[arg(long, default_value = "png:frame.png")]
    display: String,
    /// Screen size for PNG output, WIDTHxHEIGHT (160x120 to 4096x4096).
    #[arg(long, default_value = "480x320")]
    size: String,
    /// Draw every query × task once, print the results and exit.
    #[arg(long)]
    once: bool,
    /// With --once: print the results as JSON.
    #[arg(long, requires = "once")]
    json: bool,
    /// Draw "-- ms" instead of timings, so frames are reproducible (golden images).
    #[arg(long)]
    no_timings: bool,
    /// A GPIO value file polled for a push button to ground (next task), e.g.
    /// /sys/class/gpio/gpio17/value after exporting the pin as an input.
    #[arg(long)]
    gpio: Option<PathBuf>,
    /// Threads for tract's matrix products (1 to 64).
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64)
    )]
    threads: usize,
}

/// Where frames go.
enum Display {
    Png {
        path: String,
        canvas: RgbCanvas,
        /// Files a frame must not replace: `(path, "the package")`.
        inputs: Vec<(PathBuf, &'static str)>,
    },
    Fb(Framebuffer),
}

impl Display {
    fn open(spec: &str, size: &str, inputs: Vec<(PathBuf, &'static str)>) -> Result<Display> {
        if let Some(path) = spec.strip_prefix("png:") {
            let (w, h) = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .filter(|&(w, h): &(u32, u32)| {
                    (160..=4096).contains(&w) && (120..=4096).contains(&h)
                })
                .with_context(|| {
                    format!(
                        "--size {size:?}: use WIDTHxHEIGHT from 160x120 to 4096x4096, e.g. 480x320"
                    )
                })?;
            if path.is_empty() {
                bail!("--display {spec:?} names no file; give a path, e.g. png:frame.png");
            }
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                && !dir.is_dir()
            {
                bail!("--display png:{path}: the folder {dir:?} does not exist; create it first");
            }
            if !path.contains("{}") {
                // One file for every frame: checked before any work.
                let named: Vec<_> = inputs.iter().map(|(p, w)| (p.as_path(), *w)).collect();
                output::check(Path::new(path), Output::Png, &named)?;
            }
            return Ok(Display::Png {
                path: path.to_string(),
                canvas: RgbCanvas::new(w, h, Rgb888::BLACK),
                inputs,
            });
        }
        if let Some(dev) = spec.strip_prefix("fb:") {
            let fb = Framebuffer::open(Path::new(dev)).map_err(|e| {
                if Path::new(dev).exists() {
                    anyhow::anyhow!("--display {spec}: {e}")
                } else {
                    anyhow::anyhow!(
                        "--display {spec}: no such framebuffer; name one that `ls /dev/fb*` lists, or draw to a file with png:PATH"
                    )
                }
            })?;
            return Ok(Display::Fb(fb));
        }
        bail!("--display {spec:?}: use png:PATH or fb:/dev/fb0")
    }

    /// Draws and shows `frame`; returns where it went.
    /// `gallery`'s images are never replaced by a frame.
    fn show(&mut self, frame: &Frame, query: &str, gallery: &GalleryIndex) -> Result<String> {
        match self {
            Display::Png { canvas, .. } => {
                let _ = screen::draw(canvas, frame);
                let bytes = output::encode_png(&canvas.image).context("encoding the frame")?;
                let file = self.frame_file(query, &frame.task).unwrap_or_default();
                // Checked again: a file may have appeared since the start.
                self.check_frame(&file, gallery)?;
                modkit_models::write_atomic(Path::new(&file), &bytes)?;
                Ok(file)
            }
            Display::Fb(fb) => {
                let _ = screen::draw(fb, frame);
                fb.flush().context("writing the framebuffer")?;
                let size = fb.size();
                Ok(format!("framebuffer {}x{}", size.width, size.height))
            }
        }
    }

    /// The file `task`'s frame of `query` goes to (`None`: not a PNG display).
    fn frame_file(&self, query: &str, task: &str) -> Option<String> {
        let Display::Png { path, .. } = self else {
            return None;
        };
        let stem = Path::new(query)
            .file_stem()
            .map_or("query".into(), |s| s.to_string_lossy());
        Some(path.replace("{}", &format!("{stem}-{task}")))
    }

    /// Refuses a frame file that is an input, another kind of file or an image of
    /// `gallery`.
    fn check_frame(&self, file: &str, gallery: &GalleryIndex) -> Result<()> {
        let Display::Png { inputs, .. } = self else {
            return Ok(());
        };
        // The gallery first: its images are PNGs modkit did not write, which
        // `output::check` refuses too, but less plainly.
        if gallery.find(Path::new(file)).is_some() {
            bail!("--display {file:?} is an image of the gallery; name a new file for the frames");
        }
        let inputs: Vec<_> = inputs.iter().map(|(p, w)| (p.as_path(), *w)).collect();
        output::check(Path::new(file), Output::Png, &inputs)?;
        Ok(())
    }

    /// Checks, before any work, every file the frames of `queries` × `tasks` will
    /// go to, and that no two queries' frames go to one file (`a.png`, `a.jpg`).
    fn check_frames(
        &self,
        queries: &[PathBuf],
        tasks: &[String],
        gallery: &GalleryIndex,
    ) -> Result<()> {
        let mut taken = std::collections::HashMap::new();
        for query in queries {
            let name = query.file_name().unwrap_or_default().to_string_lossy();
            for task in tasks {
                if let Some(file) = self.frame_file(&name, task) {
                    self.check_frame(&file, gallery)?;
                    if self.writes_every_frame()
                        && let Some(other) = taken.insert(file.clone(), name.clone())
                    {
                        bail!(
                            "the frames of queries {other:?} and {name:?} would both be written to {file:?}; rename one of them, or give them one at a time"
                        );
                    }
                }
                if !self.writes_every_frame() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn writes_every_frame(&self) -> bool {
        !matches!(self, Display::Png { path, .. } if !path.contains("{}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    NextTask,
    PrevTask,
    NextQuery,
    PrevQuery,
    Quit,
}

/// Keys from stdin and presses of a GPIO button, on one channel. The end of stdin
/// quits, unless a button is polled: then the demo runs on without a keyboard
/// (under systemd, stdin is /dev/null).
fn events(gpio: Option<PathBuf>) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    let keys = tx.clone();
    let quit_at_eof = gpio.is_none();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let e = match line.trim() {
                "" | "n" => Event::NextTask,
                "p" => Event::PrevTask,
                "j" => Event::NextQuery,
                "k" => Event::PrevQuery,
                "q" => Event::Quit,
                _ => continue,
            };
            if keys.send(e).is_err() {
                return;
            }
        }
        if quit_at_eof {
            let _ = keys.send(Event::Quit);
        }
    });
    if let Some(path) = gpio {
        std::thread::spawn(move || {
            // A button to ground with a pull-up reads 1 until pressed.
            let (mut last, mut failing) = (true, false);
            loop {
                let high = match std::fs::read_to_string(&path) {
                    Ok(v) => {
                        failing = false;
                        v.trim() != "0"
                    }
                    Err(e) => {
                        // Said once, not every 30 ms, until it reads again.
                        if !failing {
                            eprintln!(
                                "firmware-demo: --gpio {path:?}: {e}; the button does nothing until the file reads again"
                            );
                        }
                        failing = true;
                        true
                    }
                };
                if last && !high && tx.send(Event::NextTask).is_err() {
                    return;
                }
                last = high;
                std::thread::sleep(Duration::from_millis(30));
            }
        });
    }
    rx
}

/// Reads the button's value file once, so that a wrong path is an error at start,
/// not a button that silently never fires.
fn check_gpio(path: &Path) -> Result<()> {
    let value = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!("--gpio {path:?}: {e}; export the pin as an input first (echo 17 > /sys/class/gpio/export; echo in > /sys/class/gpio/gpio17/direction)")
    })?;
    if !matches!(value.trim(), "0" | "1") {
        bail!(
            "--gpio {path:?} reads {:?}, not 0 or 1: give the pin's value file",
            value.trim()
        );
    }
    Ok(())
}

/// The gallery folder `--gallery` names: `dir`, or its `img_align_celeba/` where
/// it is a CelebA-layout folder (as `modrt index` takes it).
fn gallery_root(dir: &Path) -> Result<PathBuf> {
    if dir.is_file() {
        bail!("--gallery {dir:?} is a file; give the folder the index was built from");
    }
    if !dir.is_dir() {
        bail!("--gallery {dir:?}: no such folder; give the folder the index was built from");
    }
    let images = dir.join(IMAGES);
    Ok(if images.is_dir() {
        images
    } else {
        dir.to_path_buf()
    })
}

/// Says once, on stderr, that result images of a drawn frame are not where the
/// index says (drawn as "missing" boxes). `warned` remembers that it was said.
fn warn_missing(index: &GalleryIndex, ranked: &[Ranked], warned: &mut bool) {
    if *warned {
        return;
    }
    let missing = ranked
        .iter()
        .filter(|r| !index.path(r.row).exists())
        .count();
    if missing == 0 {
        return;
    }
    *warned = true;
    let what = format!(
        "{missing} of {} result images are not under {:?}",
        ranked.len(),
        index.root
    );
    if missing == ranked.len() {
        eprintln!("firmware-demo: {what}; pass --gallery with the folder the index was built from");
    } else {
        eprintln!(
            "firmware-demo: {what} (removed since indexing?); they are drawn as missing until the index is rebuilt"
        );
    }
}

fn print_results(query: &str, task: &str, ranked: &[Ranked]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{query} {task}:")?;
    for r in ranked {
        writeln!(out, "  {:>2}  {:.5}  {}", r.rank, r.distance, r.id)?;
    }
    Ok(())
}

/// Query `q` of `n` with its trunk run, or `None` (said on stderr) where its
/// image cannot be read: one bad file in a folder of queries (a `._IMG.jpg`
/// that a Mac left on a USB stick) skips that query, not the demo.
fn try_query(demo: &Demo, source: &mut Folder, q: usize, n: usize) -> Result<Option<Query>> {
    match source.get(q) {
        Ok((name, img, path)) => Ok(Some(demo.query(name, img, path.as_deref())?)),
        Err(e @ (modkit_runtime::Error::Image { .. } | modkit_runtime::Error::Io { .. })) => {
            eprintln!(
                "firmware-demo: skipping query {} of {n}: {}",
                q % n + 1,
                modkit_models::one_line(&e)
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.k == 0 {
        bail!("-k 0: ask for at least one result");
    }
    if let Some(path) = &cli.gpio {
        check_gpio(path)?;
    }
    let mut source = Folder::open(&cli.queries).map_err(anyhow::Error::msg)?;
    let mut inputs = vec![
        (cli.model.clone(), "the package"),
        (cli.index.clone(), "the index"),
    ];
    inputs.extend(source.paths().iter().map(|p| (p.clone(), "a query image")));
    let mut display = Display::open(&cli.display, &cli.size, inputs)?;
    let model = Model::load_with(
        &cli.model,
        &Options {
            threads: cli.threads,
        },
    )?;
    let mut index = GalleryIndex::load_for(&cli.index, &model)?;
    if let Some(dir) = &cli.gallery {
        index.root = gallery_root(dir)?;
    }
    let demo = Demo::new(model, index, &cli.index, &cli.task, cli.k).map_err(|e| match e {
        modkit_runtime::Error::Models(modkit_models::Error::UnknownTask { name, available }) => {
            anyhow::anyhow!(
                "--task {name:?}: the package {:?} has no such task; pick one of its tasks: {}",
                cli.model,
                available.join(", ")
            )
        }
        e => e.into(),
    })?;
    display.check_frames(source.paths(), &demo.tasks, &demo.index)?;
    let n = source.count().unwrap_or(1);
    let show_timings = !cli.no_timings;
    let mut warned = false;

    if cli.once {
        let mut all = Vec::new();
        let mut first = true;
        for q in 0..n {
            let Some(query) = try_query(&demo, &mut source, q, n)? else {
                continue;
            };
            for t in 0..demo.tasks.len() {
                let (frame, ranked) = demo.frame(&query, (q + 1, n), t, show_timings)?;
                if first || display.writes_every_frame() {
                    let to = display.show(&frame, &query.name, &demo.index)?;
                    eprintln!("frame: {to}");
                    warn_missing(&demo.index, &ranked, &mut warned);
                    first = false;
                }
                if !cli.json {
                    print_results(&query.name, &demo.tasks[t], &ranked)?;
                }
                all.push(serde_json::json!({"query": query.name, "task": demo.tasks[t], "results": ranked}));
            }
        }
        if all.is_empty() {
            bail!(
                "none of the {n} query images in {} could be read",
                cli.queries.display()
            );
        }
        if cli.json {
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string_pretty(&all)?
            )?;
        }
        return Ok(());
    }

    let rx = events(cli.gpio.clone());
    let (mut q, mut t) = (0usize, 0usize);
    // Unreadable queries are passed over in the direction the user last moved.
    let (mut forward, mut unreadable) = (true, 0);
    loop {
        let Some(query) = try_query(&demo, &mut source, q, n)? else {
            unreadable += 1;
            if unreadable >= n {
                bail!(
                    "none of the {n} query images in {} could be read",
                    cli.queries.display()
                );
            }
            q = if forward {
                (q + 1) % n
            } else {
                (q + n - 1) % n
            };
            continue;
        };
        unreadable = 0;
        loop {
            let (frame, ranked) = demo.frame(&query, (q % n + 1, n), t, show_timings)?;
            display.show(&frame, &query.name, &demo.index)?;
            warn_missing(&demo.index, &ranked, &mut warned);
            // The screen is the product: a closed stdout does not stop it.
            let _ = print_results(&query.name, &demo.tasks[t], &ranked);
            let tasks = demo.tasks.len();
            match rx.recv().unwrap_or(Event::Quit) {
                Event::NextTask => t = (t + 1) % tasks,
                Event::PrevTask => t = (t + tasks - 1) % tasks,
                Event::NextQuery => {
                    (q, forward) = ((q + 1) % n, true);
                    break;
                }
                Event::PrevQuery => {
                    (q, forward) = ((q + n - 1) % n, false);
                    break;
                }
                Event::Quit => return Ok(()),
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = modkit_models::threads::check_rayon_env()
        .map_err(anyhow::Error::from)
        .and_then(|()| run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `firmware-demo --once | head`: the reader left; not a failure.
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("firmware-demo: {}", modkit_models::one_line(err.as_ref()));
            ExitCode::from(2)
        }
    }
}

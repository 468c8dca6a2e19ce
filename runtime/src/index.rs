//! The gallery index `.modidx`: per-task embeddings of a folder of images, framed
//! by [`modkit_models::container`] with magic `MODIDX\0\0`.
//!
//! ```text
//! GalleryIndex (postcard)
//! ├─ fingerprint   the .modpack's checksum: another model's index is refused
//! ├─ root          the folder the ids are relative to
//! ├─ dim           embedding size
//! ├─ ids[n]        image paths relative to root ('/'-separated)
//! └─ tasks[t]      name, rows n × dim (row i = image i), labels[n] (+1 / −1 / 0
//!                  unknown) from a CelebA attribute file next to the images
//! ```
//!
//! Building runs each image's trunk once and every task's tail in one batched
//! call. Unreadable images are reported and skipped; they never abort the run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use modkit_models::celeba::{ATTR_FILE, AttrTable, IMAGES};
use modkit_models::container::{self, Kind};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::search::{Hit, nearest};
use crate::{Error, Model, Result};

/// The `.modidx` file kind.
pub const KIND: Kind = Kind {
    magic: *b"MODIDX\0\0",
    version: 1,
    what: "modkit gallery index",
    hint: "build one with `modrt index DIR --model MODEL -o gallery.modidx`",
};

/// Image file extensions a gallery folder is searched for.
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// One task's embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRows {
    pub task: String,
    /// `ids.len() × dim`, row-major.
    pub rows: Vec<f32>,
    /// Per image: +1 / −1 where an attribute file knows the value, 0 where not.
    pub labels: Vec<i8>,
}

/// One task's retrieval quality over a gallery, leave one out: every image with a
/// known value queries the others with known values, and precision@k is the mean
/// fraction of its `k` nearest that share its value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retrieval {
    pub task: String,
    /// Images with a known value: the queries, and what they search.
    pub queries: usize,
    pub k: usize,
    pub precision: f64,
    /// What `k` random images would score: Σ_c n_c (n_c − 1) / (n (n − 1)).
    pub chance: f64,
}

/// A gallery index in memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GalleryIndex {
    pub fingerprint: u64,
    pub root: PathBuf,
    pub dim: usize,
    pub ids: Vec<String>,
    pub tasks: Vec<TaskRows>,
}

/// What [`build`] did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Images embedded in this run.
    pub added: usize,
    /// Images already in the index (`--append`).
    pub kept: usize,
    /// Unreadable images and why.
    pub skipped: Vec<(String, String)>,
    pub seconds: f64,
}

/// A gallery folder: where its images are, their ids, and labels if any.
#[derive(Debug, Clone)]
pub struct Gallery {
    pub root: PathBuf,
    pub ids: Vec<String>,
    /// Images whose path is not UTF-8, which an id cannot name (lossily
    /// spelled): left out, and said so.
    pub not_utf8: Vec<String>,
    pub attributes: Option<AttrTable>,
}

impl Gallery {
    /// Lists `dir`. A CelebA-layout folder (`img_align_celeba/` beside
    /// `Anno/list_attr_celeba.txt`), given as the root or as its image folder,
    /// brings its attribute values along. The image folder is stored by its real
    /// path (no `..`, no symbolic links), so one folder named two ways is one
    /// gallery.
    pub fn open(dir: &Path) -> Result<Gallery> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{dir:?} is not a folder; give the folder of gallery images"
            )));
        }
        let named = std::path::absolute(dir).map_err(Error::io(dir))?;
        let (images, attr) = if named.join(IMAGES).is_dir() {
            (named.join(IMAGES), named.join(ATTR_FILE))
        } else {
            (
                named.clone(),
                named.parent().unwrap_or(&named).join(ATTR_FILE),
            )
        };
        let root = std::fs::canonicalize(&images).map_err(Error::io(&images))?;
        // `Anno/` beside the folder as named, else beside the real one (`.`, or
        // an image folder that is a link into the dataset).
        let attr = match root.parent().map(|p| p.join(ATTR_FILE)) {
            Some(real) if !attr.is_file() => real,
            _ => attr,
        };
        let (mut ids, mut not_utf8) = (Vec::new(), Vec::new());
        let mut seen = HashSet::from([root.clone()]);
        list(&root, &root, &mut seen, &mut ids, &mut not_utf8)?;
        ids.sort();
        if ids.is_empty() {
            if let Some(name) = not_utf8.first() {
                let more = if not_utf8.len() > 1 { ", …" } else { "" };
                return Err(Error::Invalid(format!(
                    "{root:?}: every image's file name is not UTF-8 ({name:?}{more}), which an index cannot record; rename the files"
                )));
            }
            return Err(Error::EmptyGallery { path: root });
        }
        let attributes = if attr.is_file() {
            Some(AttrTable::read(&attr)?)
        } else if attr.exists() {
            return Err(Error::Invalid(format!(
                "{attr:?} is not a file; CelebA's attribute list goes there (move the folder away to index without attributes)"
            )));
        } else {
            None
        };
        Ok(Gallery {
            root,
            ids,
            not_utf8,
            attributes,
        })
    }

    /// +1 / −1 / 0 for `task` per id in `ids`.
    fn labels(&self, task: &str, ids: &[String]) -> Vec<i8> {
        let Some(table) = &self.attributes else {
            return vec![0; ids.len()];
        };
        let Some(col) = table.column(task) else {
            return vec![0; ids.len()];
        };
        let by_file: std::collections::HashMap<&str, bool> = table
            .rows
            .iter()
            .map(|(f, l)| (f.as_str(), l[col]))
            .collect();
        ids.iter()
            .map(|id| match by_file.get(id.as_str()) {
                Some(true) => 1,
                Some(false) => -1,
                None => 0,
            })
            .collect()
    }
}

/// Appends the image ids under `dir` to `out`, in name order. A link whose real
/// path lies under `root` (a folder, or a file named as an image) is passed over:
/// its target is listed as itself, so the image keeps the id `find` gives it and
/// is not embedded twice. `seen` holds the real folders listed so far, so that other
/// linked folders are listed once and a link loop ends. Images whose path below
/// `root` is not UTF-8 go to `not_utf8` instead.
fn list(
    root: &Path,
    dir: &Path,
    seen: &mut HashSet<PathBuf>,
    out: &mut Vec<String>,
    not_utf8: &mut Vec<String>,
) -> Result<()> {
    let mut paths = std::fs::read_dir(dir)
        .map_err(Error::io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<PathBuf>>>()
        .map_err(Error::io(dir))?;
    paths.sort();
    for path in paths {
        let link = path.symlink_metadata().is_ok_and(|m| m.is_symlink());
        let inside = |path: &Path| {
            std::fs::canonicalize(path)
                .map_err(Error::io(path))
                .map(|real| (real.starts_with(root), real))
        };
        if path.is_dir() {
            let (inside, real) = inside(&path)?;
            if !(link && inside) && seen.insert(real) {
                list(root, &path, seen, out, not_utf8)?;
            }
        } else if is_image(&path) {
            // A link to an image the walk lists itself (under the root, named as
            // an image) is that image; a link to anything else is listed.
            let listed = |(inside, real): (bool, PathBuf)| inside && is_image(&real);
            if !(link && inside(&path).is_ok_and(listed)) {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                match rel.to_str() {
                    Some(_) => out.push(id_of(rel)),
                    None => not_utf8.push(id_of(rel)),
                }
            }
        }
    }
    Ok(())
}

/// Whether `path` is named as an image the index reads (`.jpg`, `.jpeg`, `.png`).
fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// An image's id: its path below the gallery's folder, `/`-separated.
fn id_of(rel: &Path) -> String {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.join("/")
}

/// Progress callback: `(done, total)`.
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Embeds the gallery at `dir` for `tasks` (package indices). With `existing`,
/// keeps its rows and embeds only images it does not hold (`--append`).
pub fn build(
    model: &Model,
    dir: &Path,
    tasks: &[usize],
    existing: Option<GalleryIndex>,
    progress: Progress,
) -> Result<(GalleryIndex, Report)> {
    let start = Instant::now();
    let gallery = Gallery::open(dir)?;
    let names: Vec<String> = tasks.iter().map(|&t| model.tasks()[t].clone()).collect();
    let dim = model.embedding_dim();
    let root = gallery.root.clone();
    let mut index = match existing {
        Some(mut old) => {
            // Indexes written before roots were canonical: compare like with like.
            if let Ok(real) = std::fs::canonicalize(&old.root) {
                old.root = real;
            }
            if old.fingerprint != model.fingerprint() {
                return Err(Error::WrongModel {
                    path: old.root.clone(),
                    found: old.fingerprint,
                    expected: model.fingerprint(),
                });
            }
            let old_names: Vec<&str> = old.tasks.iter().map(|t| t.task.as_str()).collect();
            if old_names != names.iter().map(String::as_str).collect::<Vec<_>>() {
                return Err(Error::Invalid(format!(
                    "the index holds tasks {} but this run asks for {}; append with the same tasks (or leave out --tasks), or build a new index",
                    old_names.join(","),
                    names.join(",")
                )));
            }
            old
        }
        None => GalleryIndex {
            fingerprint: model.fingerprint(),
            root: root.clone(),
            dim,
            ids: Vec::new(),
            tasks: names
                .iter()
                .map(|n| TaskRows {
                    task: n.clone(),
                    rows: Vec::new(),
                    labels: Vec::new(),
                })
                .collect(),
        },
    };
    let known: HashSet<PathBuf> = index.ids.iter().map(|id| index.root.join(id)).collect();
    let todo: Vec<&String> = gallery
        .ids
        .iter()
        .filter(|id| !known.contains(&root.join(id)))
        .collect();
    let done = AtomicUsize::new(0);
    let results: Vec<Result<Vec<Vec<f32>>>> = todo
        .par_iter()
        .map(|id| {
            let r = model
                .load_image(&gallery.root.join(id))
                .and_then(|x| model.embed_all(&model.trunk(&x)?, tasks));
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, todo.len());
            r
        })
        .collect();
    let mut report = Report {
        kept: index.ids.len(),
        ..Report::default()
    };
    for name in &gallery.not_utf8 {
        let why = "its file name is not UTF-8, which an index cannot record; rename the file";
        report.skipped.push((name.clone(), why.to_string()));
    }
    let mut added_ids = Vec::new();
    for (id, r) in todo.iter().zip(results) {
        match r {
            Ok(embeddings) => {
                added_ids.push((*id).clone());
                for (rows, e) in index.tasks.iter_mut().zip(embeddings) {
                    rows.rows.extend_from_slice(&e);
                }
            }
            Err(e @ (Error::Image { .. } | Error::Io { .. })) => {
                report.skipped.push(((*id).clone(), e.to_string()));
            }
            Err(Error::Invalid(msg)) => return Err(Error::Invalid(format!("{id}: {msg}"))),
            Err(e) => return Err(e),
        }
    }
    // Ids are stored relative to the index's root (an appended folder may differ).
    for id in &added_ids {
        let abs = root.join(id);
        let rel = abs
            .strip_prefix(&index.root)
            .map_or_else(|_| abs.to_string_lossy().into_owned(), id_of);
        index.ids.push(rel);
    }
    for rows in &mut index.tasks {
        rows.labels.extend(gallery.labels(&rows.task, &added_ids));
    }
    report.added = added_ids.len();
    report.seconds = start.elapsed().as_secs_f64();
    Ok((index, report))
}

impl GalleryIndex {
    /// Serializes and frames the index.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let payload = postcard::to_stdvec(self).map_err(|source| modkit_models::Error::Decode {
            path: "<memory>".into(),
            source,
        })?;
        Ok(container::frame(&KIND, &payload))
    }

    /// Writes the index atomically (temp file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        Ok(modkit_models::write_atomic(path, &self.to_bytes()?)?)
    }

    /// Reads an index and checks it.
    pub fn load(path: &Path) -> Result<GalleryIndex> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let (payload, _, _) = container::unframe(&KIND, &bytes, path)?;
        let index: GalleryIndex =
            postcard::from_bytes(payload).map_err(|source| modkit_models::Error::Decode {
                path: path.into(),
                source,
            })?;
        let n = index.ids.len();
        if index.tasks.is_empty() || index.dim == 0 {
            return Err(Error::Invalid(format!(
                "{path:?}: holds {} tasks of dimension {}, nothing to search; rebuild the index",
                index.tasks.len(),
                index.dim
            )));
        }
        for t in &index.tasks {
            if n.checked_mul(index.dim) != Some(t.rows.len()) || t.labels.len() != n {
                return Err(Error::Invalid(format!(
                    "{path:?}: task {:?} holds {} numbers and {} labels for {n} images of dimension {}; rebuild the index",
                    t.task,
                    t.rows.len(),
                    t.labels.len(),
                    index.dim
                )));
            }
        }
        Ok(index)
    }

    /// Loads `path` and checks it was built with `model`.
    pub fn load_for(path: &Path, model: &Model) -> Result<GalleryIndex> {
        let index = GalleryIndex::load(path)?;
        if index.fingerprint != model.fingerprint() {
            return Err(Error::WrongModel {
                path: path.into(),
                found: index.fingerprint,
                expected: model.fingerprint(),
            });
        }
        if index.dim != model.embedding_dim() {
            return Err(Error::Invalid(format!(
                "{path:?}: its embeddings have {} numbers, the package's {}; rebuild the index with this package",
                index.dim,
                model.embedding_dim()
            )));
        }
        Ok(index)
    }

    /// The rows of `task` (case-insensitive); `path` names the index in errors.
    pub fn task(&self, task: &str, path: &Path) -> Result<&TaskRows> {
        let task = modkit_models::tasks::asked(task)?;
        let want = task.to_lowercase();
        self.tasks
            .iter()
            .find(|t| t.task.to_lowercase() == want)
            .ok_or_else(|| Error::TaskNotIndexed {
                path: path.into(),
                task: task.to_string(),
                available: self.tasks.iter().map(|t| t.task.clone()).collect(),
            })
    }

    /// The rows of each of `names` (case-insensitive, in that order); a task
    /// asked for twice is an error, as in [`modkit_models::tasks::select`].
    pub fn select(&self, names: &[String], path: &Path) -> Result<Vec<&TaskRows>> {
        let mut picked: Vec<&TaskRows> = Vec::with_capacity(names.len());
        for name in names {
            let rows = self.task(name, path)?;
            if picked.iter().any(|p| std::ptr::eq(*p, rows)) {
                return Err(modkit_models::Error::DuplicateTask {
                    name: rows.task.clone(),
                }
                .into());
            }
            picked.push(rows);
        }
        Ok(picked)
    }

    /// The path of image `row`.
    pub fn path(&self, row: usize) -> PathBuf {
        self.root.join(&self.ids[row])
    }

    /// The row of an image file, if the index holds it: by its real path, or,
    /// for an image reached through a linked folder that the gallery lists under
    /// the link's name, by the path as given from the gallery's folder down.
    pub fn find(&self, image: &Path) -> Option<usize> {
        let root = std::fs::canonicalize(&self.root).ok()?;
        let row = |id: String| self.ids.iter().position(|i| *i == id);
        let real = std::fs::canonicalize(image).ok()?;
        let by_real = match real.strip_prefix(&root) {
            Ok(rel) => row(id_of(rel)),
            Err(_) => row(real.to_string_lossy().into_owned()),
        };
        by_real.or_else(|| {
            let named = std::path::absolute(image).ok()?;
            named
                .ancestors()
                .skip(1)
                .find(|a| std::fs::canonicalize(a).is_ok_and(|a| a == root))
                .and_then(|a| row(id_of(named.strip_prefix(a).ok()?)))
        })
    }

    /// [`Retrieval`] of `rows` at `k` (capped at the other labelled images), or
    /// `None` where fewer than two images have a known value.
    pub fn retrieval(&self, rows: &TaskRows, k: usize) -> Option<Retrieval> {
        let known: Vec<usize> = (0..rows.labels.len())
            .filter(|&r| rows.labels[r] != 0)
            .collect();
        let n = known.len();
        if n < 2 || k == 0 || self.dim == 0 {
            return None;
        }
        let k = k.min(n - 1);
        let embedding: Vec<f32> = known
            .iter()
            .flat_map(|&r| &rows.rows[r * self.dim..(r + 1) * self.dim])
            .copied()
            .collect();
        let hits: Vec<usize> = (0..n)
            .into_par_iter()
            .map(|q| {
                let query = &embedding[q * self.dim..(q + 1) * self.dim];
                let value = rows.labels[known[q]];
                nearest(&embedding, self.dim, query, k, |r| r == q)
                    .iter()
                    .filter(|h| rows.labels[known[h.row]] == value)
                    .count()
            })
            .collect();
        let positive = known.iter().filter(|&&r| rows.labels[r] > 0).count() as f64;
        let pairs = |c: f64| c * (c - 1.0);
        let n_f = n as f64;
        Some(Retrieval {
            task: rows.task.clone(),
            queries: n,
            k,
            precision: hits.iter().sum::<usize>() as f64 / (n * k) as f64,
            chance: (pairs(positive) + pairs(n_f - positive)) / pairs(n_f),
        })
    }

    /// The `k` images nearest to `query` for `rows`, skipping `exclude`.
    pub fn search(
        &self,
        rows: &TaskRows,
        query: &[f32],
        k: usize,
        exclude: Option<usize>,
    ) -> Vec<Hit> {
        nearest(&rows.rows, self.dim, query, k, |r| Some(r) == exclude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Indexes that would index out of their rows are refused when loaded: a
    /// dimension whose product with the image count wraps, and no task at all.
    #[test]
    fn inconsistent_indexes_are_refused_on_load() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("x.modidx");
        let index = |dim: usize, tasks: Vec<TaskRows>| GalleryIndex {
            fingerprint: 0,
            root: PathBuf::new(),
            dim,
            ids: vec!["a.png".into(), "b.png".into()],
            tasks,
        };
        let rows = |rows: Vec<f32>| TaskRows {
            task: "smiling".into(),
            rows,
            labels: vec![1, -1],
        };
        let cases = [
            (index(1 << 63, vec![rows(Vec::new())]), "holds 0 numbers"),
            (index(2, Vec::new()), "holds 0 tasks"),
            (index(0, vec![rows(Vec::new())]), "of dimension 0"),
        ];
        for (bad, want) in cases {
            bad.save(&path).expect("save");
            let err = GalleryIndex::load(&path).expect_err("refused").to_string();
            assert!(err.contains(want) && err.contains("rebuild"), "{err}");
        }
        index(1, vec![rows(vec![0.0, 1.0])])
            .save(&path)
            .expect("save");
        GalleryIndex::load(&path).expect("a good one loads");
    }

    #[test]
    fn retrieval_is_leave_one_out_precision_among_known_values() {
        // 1-d embeddings: two clusters, one image of each value in the wrong one,
        // and an unknown value in between that must neither query nor be found.
        let rows = TaskRows {
            task: "smiling".into(),
            rows: vec![0.0, 0.1, 0.2, 0.15, 5.0, 5.1, 5.2, 0.05],
            labels: vec![1, 1, 1, -1, -1, -1, 1, 0],
        };
        let index = GalleryIndex {
            fingerprint: 0,
            root: PathBuf::new(),
            dim: 1,
            ids: (0..8).map(|i| format!("{i}.png")).collect(),
            tasks: vec![rows.clone()],
        };
        let r = index.retrieval(&rows, 1).expect("known values");
        assert_eq!((r.queries, r.k), (7, 1));
        // Nearest known neighbour (ties to the lower row): 0→1 ✓, 1→3 ✗, 2→3 ✗,
        // 3→1 ✗, 4→5 ✓, 5→4 ✓, 6→5 ✗; row 7 (unknown, at 0.05) is never found.
        assert!((r.precision - 3.0 / 7.0).abs() < 1e-12, "{r:?}");
        // 4 with, 3 without: (4·3 + 3·2) / (7·6).
        assert!((r.chance - 18.0 / 42.0).abs() < 1e-12);
        // k past the other labelled images is capped; no values, no result.
        assert_eq!(index.retrieval(&rows, 100).expect("capped").k, 6);
        let unknown = TaskRows {
            labels: vec![0; 8],
            ..rows
        };
        assert!(index.retrieval(&unknown, 5).is_none());
    }
}

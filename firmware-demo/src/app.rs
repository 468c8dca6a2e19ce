//! The demo's logic, apart from any screen: queries come from a [`QuerySource`],
//! each query's trunk runs once, and switching task only runs that task's tail and
//! a search (the point of the modulated network on a small device).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::DynamicImage;
use modkit_runtime::{Features, GalleryIndex, Model};
use serde::Serialize;

use crate::screen::{Frame, Tile, Timings};

/// Where query images come from. A folder today; a camera (V4L2 frames) would
/// implement the same trait and return `path: None`.
pub trait QuerySource {
    /// How many queries there are (`None`: an endless stream such as a camera).
    fn count(&self) -> Option<usize>;
    /// Query `i`: a display name, the image and, if it is a file, its path.
    fn get(&mut self, i: usize) -> modkit_runtime::Result<(String, DynamicImage, Option<PathBuf>)>;
}

/// The image files of a folder (sorted), or one file.
#[derive(Debug, Clone)]
pub struct Folder {
    paths: Vec<PathBuf>,
}

impl Folder {
    /// The query images, in the order shown.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn open(path: &Path) -> Result<Folder, String> {
        if path.is_file() {
            return Ok(Folder {
                paths: vec![path.to_path_buf()],
            });
        }
        let entries = std::fs::read_dir(path).map_err(|e| {
            format!(
                "--queries {}: {e}; give a query image or a folder of them",
                path.display()
            )
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    modkit_runtime::index::EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                })
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(format!(
                "{} holds no .jpg or .png query images",
                path.display()
            ));
        }
        Ok(Folder { paths })
    }
}

impl QuerySource for Folder {
    fn count(&self) -> Option<usize> {
        Some(self.paths.len())
    }

    fn get(&mut self, i: usize) -> modkit_runtime::Result<(String, DynamicImage, Option<PathBuf>)> {
        let path = &self.paths[i % self.paths.len()];
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok((name, modkit_runtime::input::open(path)?, Some(path.clone())))
    }
}

/// A query with its trunk features computed once.
#[derive(Debug)]
pub struct Query {
    pub name: String,
    pub image: DynamicImage,
    /// Its row in the gallery index, if the gallery holds this very file.
    pub row: Option<usize>,
    features: Features,
    pub trunk: Duration,
}

/// One ranked result, for scripted runs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ranked {
    pub rank: usize,
    pub id: String,
    pub distance: f32,
    /// The gallery row.
    #[serde(skip)]
    pub row: usize,
}

/// The model, the gallery, and the tasks the demo cycles through.
#[derive(Debug)]
pub struct Demo {
    pub model: Model,
    pub index: GalleryIndex,
    index_path: PathBuf,
    /// Task names (as the index spells them).
    pub tasks: Vec<String>,
    model_tasks: Vec<usize>,
    pub k: usize,
}

impl Demo {
    /// Checks that `tasks` (default: all the index holds) exist in both, the
    /// package first: a task it lacks is [`modkit_models::Error::UnknownTask`],
    /// not an index to rebuild with a task it cannot embed.
    pub fn new(
        model: Model,
        index: GalleryIndex,
        index_path: &Path,
        tasks: &[String],
        k: usize,
    ) -> modkit_runtime::Result<Demo> {
        let names: Vec<String> = if tasks.is_empty() {
            index.tasks.iter().map(|t| t.task.clone()).collect()
        } else {
            model.select_tasks(tasks)?;
            index
                .select(tasks, index_path)?
                .iter()
                .map(|r| r.task.clone())
                .collect()
        };
        let model_tasks = names
            .iter()
            .map(|t| model.task_index(t))
            .collect::<modkit_runtime::Result<_>>()?;
        Ok(Demo {
            model,
            index,
            index_path: index_path.into(),
            tasks: names,
            model_tasks,
            k,
        })
    }

    /// Runs the trunk on a decoded query, once, and times it.
    pub fn query(
        &self,
        name: String,
        image: DynamicImage,
        path: Option<&Path>,
    ) -> modkit_runtime::Result<Query> {
        let start = Instant::now();
        let features = self.model.trunk(&self.model.prepare(&image)?)?;
        let trunk = start.elapsed();
        Ok(Query {
            name,
            row: path.and_then(|p| self.index.find(p)),
            image,
            features,
            trunk,
        })
    }

    /// The results of `query` for task number `task` (position in `self.tasks`):
    /// the task's tail, then the search (the query itself left out).
    pub fn results(
        &self,
        query: &Query,
        task: usize,
    ) -> modkit_runtime::Result<(Vec<Ranked>, Timings)> {
        let start = Instant::now();
        let e = self.model.embed(&query.features, self.model_tasks[task])?;
        let tail = start.elapsed();
        let start = Instant::now();
        let rows = self.index.task(&self.tasks[task], &self.index_path)?;
        let hits = self.index.search(rows, &e, self.k, query.row);
        let search = start.elapsed();
        let ranked = hits
            .iter()
            .enumerate()
            .map(|(i, h)| Ranked {
                rank: i + 1,
                id: self.index.ids[h.row].clone(),
                distance: h.distance,
                row: h.row,
            })
            .collect();
        let timings = Timings {
            trunk: query.trunk,
            tail,
            search,
        };
        Ok((ranked, timings))
    }

    /// The screen for `query` and task number `task`.
    pub fn frame(
        &self,
        query: &Query,
        query_pos: (usize, usize),
        task: usize,
        show_timings: bool,
    ) -> modkit_runtime::Result<(Frame, Vec<Ranked>)> {
        let (ranked, timings) = self.results(query, task)?;
        let rows = self.index.task(&self.tasks[task], &self.index_path)?;
        let label = |row: usize| match rows.labels[row] {
            1 => Some(true),
            -1 => Some(false),
            _ => None,
        };
        let results = ranked
            .iter()
            .map(|r| Tile {
                image: modkit_runtime::input::open(&self.index.path(r.row))
                    .ok()
                    .map(|i| i.to_rgb8()),
                distance: r.distance,
                label: label(r.row),
            })
            .collect();
        let frame = Frame {
            task: self.tasks[task].clone(),
            task_pos: (task + 1, self.tasks.len()),
            query_pos,
            query: Some(query.image.to_rgb8()),
            query_label: query.row.and_then(label),
            results,
            k: self.k,
            gallery: self.index.ids.len(),
            timings: show_timings.then_some(timings),
            fit: self.model.preprocess().fit,
        };
        Ok((frame, ranked))
    }
}

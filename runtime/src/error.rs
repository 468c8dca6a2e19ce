//! Errors of the runtime: every message names the value at fault and what to do.

use std::path::PathBuf;

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong loading a package, embedding images or searching an index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or validating a package or index (bad magic, version, checksum, ...).
    #[error(transparent)]
    Models(#[from] modkit_models::Error),

    #[error(
        "{graph}: tract cannot run the graph: {source:#}; compile the package again with this version of modc"
    )]
    Tract {
        graph: String,
        #[source]
        source: anyhow::Error,
    },

    #[error(
        "{path:?}: not a readable image ({source}); use a JPEG or PNG file of up to 256 MiB decoded"
    )]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    #[error("{path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path:?} was built with another model (package fingerprint {found:016x}, this model {expected:016x}); rebuild it with `modrt index DIR --model MODEL -o {}`",
        path.display()
    )]
    WrongModel {
        path: PathBuf,
        found: u64,
        expected: u64,
    },

    #[error("index {path:?} has no embeddings for task {task:?}; it holds {}; pick one of those, or (if the package has it) rebuild the index with `--tasks {},{task}`, or without --tasks for every task", available.join(", "), available.join(","))]
    TaskNotIndexed {
        path: PathBuf,
        task: String,
        available: Vec<String>,
    },

    #[error("{path:?} holds no images (looked for .jpg, .jpeg and .png files, recursively)")]
    EmptyGallery { path: PathBuf },

    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

//! Errors of the trainer library.

use std::path::PathBuf;

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong loading data, building networks and training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path:?} line {line}: {msg}")]
    Malformed {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    #[error("{path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path:?}: cannot decode image: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    #[error(
        "unknown data source {value:?}: use `synth`, `celeba:DIR`, `zappos:DIR` or `folder:DIR`"
    )]
    BadDataSource { value: String },

    #[error("unknown optimizer {value:?}: use adagrad or adam")]
    UnknownOptimizer { value: String },

    #[error("unknown triplet mining {value:?}: use sampled, batch-all or pooled")]
    UnknownMining { value: String },

    #[error(
        "task {task:?} cannot form triplets in the {split} split: {positives} images in its largest class, {negatives} in the others (need 2 of one class and 1 of another); use more images or another split"
    )]
    EmptySplit {
        task: String,
        split: String,
        positives: usize,
        negatives: usize,
    },

    #[error(
        "loss became {loss} at epoch {epoch}, step {step}; stopped, the last good checkpoint is kept. Lower --lr or check the data"
    )]
    NonFinite {
        epoch: usize,
        step: usize,
        loss: f32,
    },

    #[error(
        "image size {found} does not match the spec's input {expected}; load the data at {expected}"
    )]
    ImageSize { found: usize, expected: usize },

    #[error("{0}")]
    Config(String),

    #[error(transparent)]
    Models(#[from] modkit_models::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

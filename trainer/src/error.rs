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

    /// The image file is missing or cannot be read.
    #[error("{path:?}: cannot read image: {source}")]
    ImageRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The image file was read but is not an image the `image` crate decodes.
    #[error(
        "{path:?}: cannot decode image ({source}); modtrain reads PNG and JPEG files of up to 256 MiB decoded"
    )]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    /// Writing an image failed in the encoder.
    #[error("{path:?}: cannot encode image: {source}")]
    ImageEncode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    /// CelebA's partition file lacks an image of the attribute file.
    #[error(
        "{path:?} has no line for image {file:?}, which list_attr_celeba.txt lists: add one (`{file} 0` for train, 1 val, 2 test) or remove the image's line from list_attr_celeba.txt"
    )]
    NoPartition { path: PathBuf, file: String },

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
        "loss became {loss} at epoch {epoch}, step {step}; stopped, {}. Lower --lr or check the data",
        what_is_kept(.kept)
    )]
    NonFinite {
        epoch: usize,
        step: usize,
        loss: f32,
        /// The run's newest checkpoint on disk: (epoch, path).
        kept: Option<(usize, PathBuf)>,
    },

    #[error(
        "{tensor} holds non-finite values after epoch {epoch} (training diverged); stopped, {}. Lower --lr or check the data",
        what_is_kept(.kept)
    )]
    Diverged {
        epoch: usize,
        tensor: String,
        /// The run's newest checkpoint on disk: (epoch, path).
        kept: Option<(usize, PathBuf)>,
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

/// What a stopped run leaves behind: its newest checkpoint, if any. A resumed
/// run's may be the one it resumed from, not its `-o`.
fn what_is_kept(saved: &Option<(usize, PathBuf)>) -> String {
    match saved {
        None => "no checkpoint was written".into(),
        Some((epoch, path)) => format!(
            "the checkpoint of epoch {epoch} is kept at {}",
            path.display()
        ),
    }
}

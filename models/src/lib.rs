//! The shared vocabulary of modkit: what every other crate agrees on.
//!
//! * [`NetSpec`]: the network of the paper's Table 2 with configurable input size,
//!   widths, embedding size and modulation placement ([`NetSpec::paper`],
//!   [`NetSpec::tiny`]).
//! * [`Variant`]: the training variants of the paper's section 4.2 (`modulated`,
//!   `shared`, `independent`, `branch:K`, `csn`, `only-mask`).
//! * [`ParamCount`]: exact shared / per-task parameter counts of a spec and variant.
//! * [`names`]: the tensor names of the checkpoint, the one place the schema lives.
//! * [`Checkpoint`]: the safetensors checkpoint with its JSON header.
//! * [`tasks`]: the 20 CelebA attributes of the paper's Table 3.
//!
//! This crate knows no tensors library and no graphs: it is the format layer.
//!
//! ```
//! use modkit_models::{NetSpec, ParamCount, Variant};
//!
//! let spec = NetSpec::paper();
//! let count = ParamCount::of(&spec, &Variant::Modulated, 20);
//! assert_eq!(count.per_task, 512); // 128 + 128 + 256: block4, block5, fc
//! assert_eq!(count.task_specific(), 10_240); // the paper's "10k"
//! ```

mod atomic;
pub mod celeba;
pub mod checkpoint;
pub mod container;
mod error;
pub mod guard;
pub mod names;
pub mod output;
pub mod package;
mod params;
pub mod pixels;
mod preprocess;
mod spec;
pub mod tasks;
pub mod threads;
mod variant;

pub use atomic::{is_system_path, write_atomic};
pub use checkpoint::{Checkpoint, CheckpointHeader, TensorData};
pub use error::{Error, Result, one_line};
pub use package::{Package, Precision, Tails};
pub use params::ParamCount;
pub use preprocess::{Fit, Preprocess};
pub use spec::{BATCH_NORM_EPS, Modulation, NetSpec, StageShape};
pub use variant::Variant;

/// Reads a text file a user wrote (a label list): not UTF-8 is an error naming
/// the line where it stops being UTF-8, and the fix.
pub fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Malformed {
            path: path.into(),
            line,
            msg: "is not UTF-8 text; save the file as UTF-8".into(),
        }
    })
}

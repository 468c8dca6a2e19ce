//! modkit's runtime: runs a compiled `.modpack` with tract (never candle), so it
//! is the part that ships to a device.
//!
//! * [`Model`]: loads and checks a package and plans its graphs with fixed shapes;
//!   [`Model::trunk`] runs the shared trunk once per image, [`Model::embed_all`]
//!   every task's tail in one batched call (runtime switch) or the folded tails.
//! * [`input`]: JPEG/PNG of any size, grey/RGB/RGBA → the trainer's preprocessing.
//! * [`index`]: the `.modidx` gallery index (built, appended, checked against the
//!   package's fingerprint) and exact k-NN [`search`].
//! * [`sheet`]: the contact sheet PNG of a query; [`canvas`]: an `image` buffer
//!   behind embedded-graphics' `DrawTarget`.
//! * [`bench`]: trunk / tail / all-tasks / naive latencies.
//!
//! ```no_run
//! use modkit_runtime::{GalleryIndex, Model};
//! # fn main() -> modkit_runtime::Result<()> {
//! let model = Model::load("model.modpack".as_ref())?;
//! let smiling = model.task_index("smiling")?;
//! let features = model.trunk(&model.load_image("query.png".as_ref())?)?;
//! let query = model.embed(&features, smiling)?;
//! let index = GalleryIndex::load_for("gallery.modidx".as_ref(), &model)?;
//! let rows = index.task("smiling", "gallery.modidx".as_ref())?;
//! for hit in index.search(rows, &query, 5, None) {
//!     println!("{} {:.4}", index.ids[hit.row], hit.distance);
//! }
//! # Ok(()) }
//! ```

pub mod bench;
pub mod canvas;
mod error;
pub mod index;
pub mod input;
mod model;
pub mod search;
pub mod sheet;

pub use error::{Error, Result};
pub use index::GalleryIndex;
pub use input::Input;
pub use model::{Features, Model, Options, Route};

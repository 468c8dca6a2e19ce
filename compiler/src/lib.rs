//! modc: compiles a modkit checkpoint into a `.modpack` for the runtime.
//!
//! The compile-time / run-time split of tract: everything heavy happens here, once
//! (BatchNorm folding, task folding, graph emission), and the runtime only loads
//! ONNX graphs and runs them.
//!
//! * [`fold_batch_norm`]: BN → conv/fc weights, once per network.
//! * [`fold_task_scales`]: a task's modulation → the next linear layer, once per task.
//! * [`emit`]: ONNX graphs (trunk, switch tail, folded tails, export model) written
//!   with [`graph`] over tract-onnx's protobuf types.
//! * [`reference`]: the checkpoint evaluated directly, what `verify` compares with.
//! * [`compile`](compile::compile), [`inspect`](inspect::inspect),
//!   [`verify`](verify::verify): the `modc` subcommands.
//!
//! ```no_run
//! use modkit_compiler::compile::{CompileOptions, compile};
//! # fn main() -> modkit_compiler::Result<()> {
//! let ckpt = modkit_models::Checkpoint::load("model.safetensors".as_ref())?;
//! let pkg = compile(&ckpt, &CompileOptions::default())?;
//! pkg.save("model.modpack".as_ref())?;
//! # Ok(()) }
//! ```

pub mod compile;
pub mod emit;
mod error;
pub mod fold_batch_norm;
pub mod fold_task_scales;
pub mod graph;
pub mod inspect;
pub mod reference;
pub mod tract_run;
pub mod verify;

pub use error::{Error, Result};

//! modtrain: trains modulated multi-task retrieval networks (Zhao et al., ECCV 2018)
//! and the baselines the paper compares against, with candle.
//!
//! * [`data`]: the built-in synthetic faces and CelebA's layout.
//! * [`triplets`]: per-task triplet sampling (paper section 4.1).
//! * [`net`]: the network of the paper's Table 2 with modulation (section 3.2) and
//!   the variants of section 4.2.
//! * [`adagrad`]: the optimizer the paper uses; [`adam`]: a faster alternative;
//!   [`optim`]: the choice between them and their checkpoint state.
//! * [`mining`]: which triplets of a minibatch the loss sees.
//! * [`train`]: the training loop, checkpoints, resume; [`eval`]: triplet accuracy;
//!   [`ucr`]: the Update Compliance Ratio between tasks (paper section 3.1);
//!   [`relations`]: the task-relation regulariser (eq. 8); [`report`]: tables and
//!   plots of training runs.
//! * [`ops`]: fast CPU kernels for convolution, BatchNorm and max-pool.
//! * [`bench`]: a training step's time per phase against the GEMM peak.
//! * [`workers`]: rayon's threads kept spinning through a training step.
//!
//! ```no_run
//! use modkit_trainer::{data::Dataset, train::{TrainConfig, Trainer}};
//! # fn main() -> modkit_trainer::Result<()> {
//! let cfg = TrainConfig::default();
//! let data = Dataset::synthetic(2000, cfg.spec.input_size, cfg.seed);
//! let mut trainer = Trainer::new(cfg, &data, candle_core::Device::Cpu)?;
//! let report = trainer.run(&data, std::path::Path::new("model.safetensors"))?;
//! println!("mean accuracy {:.3}", report.mean_accuracy);
//! # Ok(()) }
//! ```

pub mod adagrad;
pub mod adam;
pub mod bench;
pub mod data;
mod error;
pub mod eval;
mod inplace;
pub mod mining;
pub mod net;
pub mod ops;
pub mod optim;
pub mod relations;
pub mod report;
pub mod train;
pub mod triplets;
pub mod ucr;
pub mod workers;

pub use error::{Error, Result};

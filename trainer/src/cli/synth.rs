use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use modkit_models::NetSpec;
use modkit_trainer::data::celeba;

/// The most images `synth` writes: 50 × CelebA's 202,599.
const MAX_FILES: usize = 10_000_000;

/// Write the built-in synthetic face dataset in CelebA's file layout
/// (img_align_celeba/, Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt).
///
/// Example: modtrain synth --out data/synth --n 20000 --size 48
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory: new, empty, or an earlier `modtrain synth` set, which
    /// is replaced whole; a folder holding anything else is refused.
    #[arg(long, short)]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 20_000)]
    n: usize,
    /// Image side in pixels (48 for the tiny spec, 150 for the paper spec).
    #[arg(long, default_value_t = 48)]
    size: usize,
    /// Seed: the same seed gives the same images and attributes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SynthArgs {
    pub fn run(self) -> Result<()> {
        if self.n == 0 || self.size < 16 {
            bail!(
                "--n {} --size {}: need at least one image of at least 16 pixels",
                self.n,
                self.size
            );
        }
        if self.size > NetSpec::MAX_INPUT || self.n > MAX_FILES {
            bail!(
                "--n {} --size {}: at most {MAX_FILES} images of at most {} pixels",
                self.n,
                self.size,
                NetSpec::MAX_INPUT
            );
        }
        let start = std::time::Instant::now();
        let pb = super::bar(self.n as u64, "synth".into());
        celeba::write_synthetic(&self.out, self.n, self.size, self.seed, &|done| {
            pb.set_position(done as u64)
        })?;
        pb.finish_and_clear();
        eprintln!(
            "wrote {} faces of {}×{} to {} in {:.1} s",
            self.n,
            self.size,
            self.size,
            self.out.display(),
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

//! Datasets: images in memory with binary attributes and train/val/test splits.
//!
//! * [`synth`]: the built-in procedural faces (no download needed).
//! * [`celeba`]: CelebA's file layout, read and written (the synthetic set is
//!   written in it, so one loader serves both).

mod canvas;
pub mod celeba;
pub mod synth;

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::{Error, Result};

/// CelebA's `list_eval_partition.txt` codes: 0 train, 1 validation, 2 test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    /// The code in `list_eval_partition.txt`.
    pub fn code(self) -> u8 {
        match self {
            Split::Train => 0,
            Split::Val => 1,
            Split::Test => 2,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        })
    }
}

/// Square RGB images (`size × size × 3` bytes each, row-major) with binary attributes.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Attribute names, lower case, in the file's order.
    pub attributes: Vec<String>,
    /// Image file names (ids).
    pub files: Vec<String>,
    /// `files.len() × attributes.len()` labels, row-major.
    pub labels: Vec<bool>,
    pub splits: Vec<Split>,
    pub image_size: usize,
    pub pixels: Vec<u8>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The value of attribute `attr` for image `i`.
    pub fn label(&self, i: usize, attr: usize) -> bool {
        self.labels[i * self.attributes.len() + attr]
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_size * self.image_size * 3;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Indices of the images in `split`.
    pub fn indices(&self, split: Split) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.splits[i] == split)
            .collect()
    }

    /// Indices into [`Dataset::attributes`] of the named tasks (case-insensitive).
    pub fn task_indices(&self, tasks: &[String]) -> Result<Vec<usize>> {
        Ok(modkit_models::tasks::select(tasks, &self.attributes)?)
    }

    /// The built-in synthetic set: `n` faces of `size` pixels from `seed`, split
    /// 80/10/10 into train/val/test (by index, like CelebA's contiguous splits).
    pub fn synthetic(n: usize, size: usize, seed: u64) -> Self {
        let faces: Vec<_> = (0..n as u64)
            .into_par_iter()
            .map(|i| synth::face(seed, i, size))
            .collect();
        let mut ds = Dataset {
            attributes: synth::ATTRIBUTES.iter().map(|s| s.to_string()).collect(),
            files: (1..=n).map(|i| format!("{i:06}.png")).collect(),
            labels: Vec::with_capacity(n * 20),
            splits: (0..n).map(|i| split_of(i, n)).collect(),
            image_size: size,
            pixels: Vec::with_capacity(n * size * size * 3),
        };
        for f in faces {
            ds.labels.extend(f.attributes);
            ds.pixels.extend(f.pixels);
        }
        ds
    }

    /// Frequency of `attr` being true in `split`.
    pub fn frequency(&self, attr: usize, split: Option<Split>) -> f64 {
        let idx: Vec<usize> = match split {
            Some(s) => self.indices(s),
            None => (0..self.len()).collect(),
        };
        idx.iter().filter(|&&i| self.label(i, attr)).count() as f64 / idx.len().max(1) as f64
    }
}

/// Contiguous 80/10/10 split by position.
fn split_of(i: usize, n: usize) -> Split {
    if i * 10 < n * 8 {
        Split::Train
    } else if i * 10 < n * 9 {
        Split::Val
    } else {
        Split::Test
    }
}

/// Where training data comes from (`--data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// Generate the built-in set in memory.
    Synth,
    /// A directory in CelebA's layout (real CelebA or `modtrain synth` output).
    Celeba(std::path::PathBuf),
}

impl FromStr for DataSource {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "synth" {
            return Ok(DataSource::Synth);
        }
        match s.split_once(':') {
            Some(("celeba", dir)) if !dir.is_empty() => Ok(DataSource::Celeba(dir.into())),
            _ => Err(Error::BadDataSource { value: s.into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::synth::ATTRIBUTES;
    use super::synth::attr::*;
    use super::*;

    #[test]
    fn synthetic_set_has_the_designed_correlations() {
        let ds = Dataset::synthetic(4000, 48, 11);
        let n = ds.len();
        let p = |a: usize| ds.frequency(a, None);
        let joint = |a: usize, b: usize| {
            (0..n).filter(|&i| ds.label(i, a) && ds.label(i, b)).count() as f64 / n as f64
        };
        let lift = |a: usize, b: usize| joint(a, b) / (p(a) * p(b));
        // Positive correlations.
        assert!(
            lift(SMILING, MOUTH_OPEN) > 1.3,
            "smile/mouth {}",
            lift(SMILING, MOUTH_OPEN)
        );
        assert!(lift(SMILING, HIGH_CHEEKBONES) > 1.3);
        assert!(lift(CHUBBY, DOUBLE_CHIN) > 1.8);
        // Negative: young ↔ bags.
        assert!(lift(YOUNG, BAGS_UNDER_EYES) < 0.7);
        // Exact rules.
        for i in 0..n {
            let beard = [SHADOW, GOATEE, MUSTACHE, SIDEBURNS]
                .iter()
                .any(|&a| ds.label(i, a));
            assert_eq!(ds.label(i, NO_BEARD), !beard);
            if ds.label(i, BALD) {
                assert!(!ds.label(i, BANGS) && !ds.label(i, RECEDING_HAIRLINE));
                assert!(!ds.label(i, STRAIGHT_HAIR) && !ds.label(i, WAVY_HAIR));
            }
            assert!(!(ds.label(i, STRAIGHT_HAIR) && ds.label(i, WAVY_HAIR)));
        }
        // Independent pairs stay near lift 1.
        for (a, b) in [
            (SMILING, YOUNG),
            (ARCHED_EYEBROWS, SMILING),
            (OVAL_FACE, BUSHY_EYEBROWS),
        ] {
            let l = lift(a, b);
            assert!(
                (0.85..1.15).contains(&l),
                "{} / {}: lift {l}",
                ATTRIBUTES[a],
                ATTRIBUTES[b]
            );
        }
        // Every attribute occurs, none is near-universal.
        for (a, name) in ATTRIBUTES.iter().enumerate() {
            assert!((0.04..0.9).contains(&p(a)), "{name}: {}", p(a));
        }
    }

    #[test]
    fn splits_are_80_10_10() {
        let ds = Dataset::synthetic(100, 48, 1);
        assert_eq!(ds.indices(Split::Train).len(), 80);
        assert_eq!(ds.indices(Split::Val).len(), 10);
        assert_eq!(ds.indices(Split::Test).len(), 10);
    }

    #[test]
    fn data_source_parsing() {
        assert_eq!(
            "synth".parse::<DataSource>().expect("synth"),
            DataSource::Synth
        );
        assert_eq!(
            "celeba:/x".parse::<DataSource>().expect("celeba"),
            DataSource::Celeba("/x".into())
        );
        let err = "imagenet:/x".parse::<DataSource>().unwrap_err().to_string();
        assert!(
            err.contains("imagenet:/x") && err.contains("celeba:DIR"),
            "{err}"
        );
    }
}

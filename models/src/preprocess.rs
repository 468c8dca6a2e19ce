//! [`Preprocess`]: how pixels become network input, fixed at training time and
//! carried by checkpoints and packages so every consumer feeds the same numbers.

use serde::{Deserialize, Serialize};

/// How a non-square image becomes square before it is resized to the spec's
/// input side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Centre-crop to the shorter side (faces: CelebA, the built-in set, folders).
    #[default]
    Crop,
    /// Centre on a white square of the longer side (product photos on white:
    /// UT-Zappos50K), so that no part of the object is cut off.
    Pad,
}

/// `input[c] = (pixel[c] / 255 − mean[c]) / std[c]` on an RGB image that was
/// squared by `fit` and resized to the spec's input size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// How the training data squared its images. Checkpoints written before it
    /// existed read as [`Fit::Crop`], or [`Fit::Pad`] where they trained on
    /// `zappos:` data; version-1 packages, which cannot tell, as cropping.
    #[serde(default)]
    pub fit: Fit,
}

impl Preprocess {
    /// Checks that the normalisation is a number for every pixel: finite means,
    /// finite positive standard deviations.
    pub fn check(&self) -> crate::Result<()> {
        if self.mean.iter().all(|m| m.is_finite())
            && self.std.iter().all(|s| s.is_finite() && *s > 0.0)
        {
            return Ok(());
        }
        Err(crate::Error::InvalidSpec(format!(
            "preprocessing mean {:?}, std {:?}: means must be finite and standard deviations positive",
            self.mean, self.std
        )))
    }
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            mean: [0.5; 3],
            std: [0.25; 3],
            fit: Fit::Crop,
        }
    }
}

impl Preprocess {
    /// Normalises one byte of channel `c`.
    #[inline]
    pub fn apply(&self, c: usize, byte: u8) -> f32 {
        (byte as f32 / 255.0 - self.mean[c]) / self.std[c]
    }
}

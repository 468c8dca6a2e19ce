//! [`Preprocess`]: how pixels become network input, fixed at training time and
//! carried by checkpoints and packages so every consumer feeds the same numbers.

use serde::{Deserialize, Serialize};

/// `input[c] = (pixel[c] / 255 − mean[c]) / std[c]` on an RGB image that was
/// centre-cropped to a square and resized to the spec's input size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            mean: [0.5; 3],
            std: [0.25; 3],
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

//! Images → network input, exactly as the trainer feeds them: decode (JPEG or PNG,
//! grey, RGB or RGBA, any size), square by the package's [`Fit`](modkit_models::Fit) (centre-crop, or
//! centre on white), resize to the spec's input side (triangle filter), then
//! normalise per channel with the package's [`Preprocess`] into a planar
//! `[1, 3, S, S]` tensor.

use std::path::Path;

use image::DynamicImage;
use modkit_models::{Preprocess, pixels};
use tract_onnx::prelude::Tensor;

use crate::{Error, Result};

/// A preprocessed image, `[1, 3, S, S]`, ready for the trunk.
#[derive(Debug, Clone)]
pub struct Input(pub(crate) Tensor);

impl Input {
    /// The planar, normalised pixels.
    pub fn as_slice(&self) -> &[f32] {
        self.0
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>())
            .unwrap_or(&[])
    }
}

/// Decodes `path` ([`modkit_models::pixels::decode`]); a zero-byte, non-image or
/// too large file is an [`Error::Image`].
pub fn open(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    pixels::decode(&bytes).map_err(|source| Error::Image {
        path: path.into(),
        source,
    })
}

/// Squares an image and resizes it, as the trainer does: one implementation.
pub use modkit_models::pixels::square;

/// `img` as network input of `side` pixels.
pub fn prepare(img: &DynamicImage, side: usize, pre: &Preprocess) -> Result<Input> {
    let rgb = square(img, side as u32, pre.fit);
    let plane = side * side;
    let mut data = vec![0f32; 3 * plane];
    for (p, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + p] = pre.apply(c, px.0[c]);
        }
    }
    Tensor::from_shape(&[1, 3, side, side], &data)
        .map(Input)
        .map_err(|source| Error::Tract {
            graph: "input".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use image::RgbImage;
    use modkit_models::Fit;

    use super::*;
    use image::{GrayImage, Luma, Rgba, RgbaImage};

    #[test]
    fn grey_and_rgba_become_three_equal_or_opaque_channels() {
        let pre = Preprocess::default();
        let grey = DynamicImage::ImageLuma8(GrayImage::from_pixel(70, 50, Luma([128])));
        let x = prepare(&grey, 48, &pre).expect("grey");
        assert_eq!(x.0.shape(), &[1, 3, 48, 48]);
        let v = pre.apply(0, 128);
        assert!(x.as_slice().iter().all(|&a| (a - v).abs() < 1e-6));

        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(31, 97, Rgba([255, 0, 10, 7])));
        let x = prepare(&rgba, 48, &pre).expect("rgba");
        let s = x.as_slice();
        let plane = 48 * 48;
        assert!((s[0] - pre.apply(0, 255)).abs() < 1e-6);
        assert!((s[plane] - pre.apply(1, 0)).abs() < 1e-6);
        assert!((s[2 * plane] - pre.apply(2, 10)).abs() < 1e-6);
    }

    #[test]
    fn prepares_by_the_packages_fit() {
        // A black 4×2 image: padded, it sits in the middle rows of a white 4×4.
        let img = DynamicImage::ImageRgb8(RgbImage::new(4, 2));
        let pre = Preprocess {
            fit: Fit::Pad,
            ..Preprocess::default()
        };
        let x = prepare(&img, 4, &pre).expect("pad");
        assert_eq!(x.as_slice()[0], pre.apply(0, 255));
        assert_eq!(x.as_slice()[4], pre.apply(0, 0));
        // Cropped, the same image is all black.
        let x = prepare(&img, 4, &Preprocess::default()).expect("crop");
        assert_eq!(x.as_slice()[0], pre.apply(0, 0));
    }

    #[test]
    fn zero_byte_and_text_files_are_image_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        for (name, bytes) in [("empty.png", &b""[..]), ("notes.jpg", b"not an image")] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            let err = open(&path).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("JPEG or PNG"), "{err}");
        }
        let err = open(&dir.path().join("missing.png"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.png"), "{err}");
    }
}

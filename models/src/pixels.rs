//! Image files → the RGB squares a network sees, one implementation for the
//! trainer's loaders and the runtime (so that both feed the same pixels).

use std::io::Cursor;

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageError, ImageReader, Limits, Rgb, RgbImage};

use crate::Fit;

/// The most memory one decoded image may take: 256 MiB, a 64-megapixel RGBA
/// photo. A small file that would decode to more (a "decompression bomb") is
/// refused as a decode error instead of taking memory on every thread.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// Decodes an image file's bytes; the format comes from the bytes, not the file
/// name (a PNG saved as `.jpg` decodes). PNG and JPEG are built in.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage, ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    reader.decode()
}

/// Squares `img` by `fit` and resizes it to `side` pixels (triangle filter), as
/// RGB. [`Fit::Crop`] keeps the centred square of the shorter side;
/// [`Fit::Pad`] resizes the whole image to fit `side` (its longer side becomes
/// `side`) and centres it on white, so that memory stays `side²` whatever the
/// image's shape. Resampling reads `img` in place, in its own pixel type: no
/// copy of a large photo is made (the crop is a view), so a decoded image costs
/// its own memory and little more.
pub fn square(img: &DynamicImage, side: u32, fit: Fit) -> RgbImage {
    let (w, h) = (img.width().max(1), img.height().max(1));
    match fit {
        Fit::Pad if w != h => {
            let long = u64::from(w.max(h));
            // Rounded, at least one pixel: a 1 × 40000 line stays one pixel wide.
            let fit = |v: u32| ((u64::from(v) * u64::from(side) + long / 2) / long).max(1) as u32;
            let (fw, fh) = (fit(w), fit(h));
            let small = resized(img, fw, fh);
            let mut sq = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
            image::imageops::overlay(
                &mut sq,
                &small,
                ((side - fw) / 2).into(),
                ((side - fh) / 2).into(),
            );
            sq
        }
        Fit::Pad => resized(img, side, side),
        Fit::Crop => {
            let s = w.min(h);
            cropped(img, ((w - s) / 2, (h - s) / 2, s), side)
        }
    }
}

/// Runs `$body` with `$p` bound to `$img`'s pixel buffer, whatever its pixel
/// type, and converts the buffer it returns to RGB.
macro_rules! per_pixel_type {
    ($img:expr, $p:ident => $body:expr) => {
        match $img {
            DynamicImage::ImageLuma8($p) => DynamicImage::from($body).to_rgb8(),
            DynamicImage::ImageLumaA8($p) => DynamicImage::from($body).to_rgb8(),
            DynamicImage::ImageRgb8($p) => $body,
            DynamicImage::ImageRgba8($p) => DynamicImage::from($body).to_rgb8(),
            DynamicImage::ImageLuma16($p) => DynamicImage::from($body).to_rgb8(),
            DynamicImage::ImageLumaA16($p) => DynamicImage::from($body).to_rgb8(),
            DynamicImage::ImageRgb16($p) => DynamicImage::from($body).to_rgb8(),
            DynamicImage::ImageRgba16($p) => DynamicImage::from($body).to_rgb8(),
            DynamicImage::ImageRgb32F($p) => DynamicImage::from($body).to_rgb8(),
            DynamicImage::ImageRgba32F($p) => DynamicImage::from($body).to_rgb8(),
            // A pixel type added to `image` later: through a copy in RGB.
            other => {
                let $p = &other.to_rgb8();
                $body
            }
        }
    };
}

/// `img` resized to `w × h` (a copy where it already is that size), as RGB.
fn resized(img: &DynamicImage, w: u32, h: u32) -> RgbImage {
    per_pixel_type!(img, p => imageops::resize(p, w, h, FilterType::Triangle))
}

/// The `s × s` square of `img` at `(x, y)`, resized to `side`, as RGB.
fn cropped(img: &DynamicImage, (x, y, s): (u32, u32, u32), side: u32) -> RgbImage {
    per_pixel_type!(img, p => imageops::resize(&*imageops::crop_imm(p, x, y, s, s), side, side, FilterType::Triangle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_the_centre_square() {
        // A 3-wide image whose middle column is white: the crop keeps only it.
        let mut img = RgbImage::new(3, 1);
        img.put_pixel(1, 0, Rgb([255, 255, 255]));
        let sq = square(&DynamicImage::ImageRgb8(img), 1, Fit::Crop);
        assert_eq!(sq.get_pixel(0, 0).0, [255, 255, 255]);
    }

    #[test]
    fn pads_onto_a_white_square() {
        // A black 4×2 image: padded, it sits in the middle rows of a white 4×4.
        let img = DynamicImage::ImageRgb8(RgbImage::new(4, 2));
        let sq = square(&img, 4, Fit::Pad);
        let rows: Vec<[u8; 3]> = (0..4).map(|y| sq.get_pixel(0, y).0).collect();
        assert_eq!(rows, [[255; 3], [0; 3], [0; 3], [255; 3]]);
        // Shrunk first: 8×4 to 4 is the same picture.
        let img = DynamicImage::ImageRgb8(RgbImage::new(8, 4));
        assert_eq!(square(&img, 4, Fit::Pad), sq);
    }

    /// The squaring of the `image` crate's whole-image methods, which copy the
    /// photo for the crop (and for the padding) before resizing it.
    fn square_by_copies(img: &DynamicImage, side: u32, fit: Fit) -> RgbImage {
        let (w, h) = (img.width().max(1), img.height().max(1));
        let squared = match fit {
            Fit::Pad if w != h => {
                let long = u64::from(w.max(h));
                let fit =
                    |v: u32| ((u64::from(v) * u64::from(side) + long / 2) / long).max(1) as u32;
                let (fw, fh) = (fit(w), fit(h));
                let small = img.resize_exact(fw, fh, FilterType::Triangle).to_rgb8();
                let mut sq = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
                imageops::overlay(
                    &mut sq,
                    &small,
                    ((side - fw) / 2).into(),
                    ((side - fh) / 2).into(),
                );
                return sq;
            }
            Fit::Pad => img.clone(),
            Fit::Crop => {
                let s = w.min(h);
                img.crop_imm((w - s) / 2, (h - s) / 2, s, s)
            }
        };
        if (squared.width(), squared.height()) == (side, side) {
            squared.to_rgb8()
        } else {
            squared
                .resize_exact(side, side, FilterType::Triangle)
                .to_rgb8()
        }
    }

    /// Every pixel type, shapes wide, tall, square and already `side`, both fits:
    /// the same pixels as resizing a copy.
    #[test]
    fn squares_in_place_as_through_copies() {
        let rgb = |w: u32, h: u32| {
            RgbImage::from_fn(w, h, |x, y| {
                Rgb([
                    (x * 37 + y * 11) as u8,
                    (x * y + 3 * y) as u8,
                    (x ^ (y * 5)) as u8,
                ])
            })
        };
        for (w, h) in [(37, 23), (23, 37), (30, 30), (16, 16), (16, 40), (1, 9)] {
            let base = DynamicImage::ImageRgb8(rgb(w, h));
            let kinds = [
                DynamicImage::ImageLuma8(base.to_luma8()),
                DynamicImage::ImageLumaA8(base.to_luma_alpha8()),
                base.clone(),
                DynamicImage::ImageRgba8(base.to_rgba8()),
                DynamicImage::ImageLuma16(base.to_luma16()),
                DynamicImage::ImageLumaA16(base.to_luma_alpha16()),
                DynamicImage::ImageRgb16(base.to_rgb16()),
                DynamicImage::ImageRgba16(base.to_rgba16()),
                DynamicImage::ImageRgb32F(base.to_rgb32f()),
                DynamicImage::ImageRgba32F(base.to_rgba32f()),
            ];
            for img in &kinds {
                for fit in [Fit::Crop, Fit::Pad] {
                    assert_eq!(
                        square(img, 16, fit),
                        square_by_copies(img, 16, fit),
                        "{w}x{h} {:?} {fit:?}",
                        img.color()
                    );
                }
            }
        }
    }

    /// A one-pixel line 300,000 long: padded without a 300,000² canvas (which
    /// was 270 GB), a one-pixel black line down the middle of white.
    #[test]
    fn a_thin_image_pads_in_the_memory_of_its_output() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::new(1, 300_000));
        let sq = square(&img, 48, Fit::Pad);
        assert_eq!(sq.dimensions(), (48, 48));
        // Column (48 − 1) / 2 = 23.
        assert_eq!(sq.get_pixel(23, 10).0, [0; 3]);
        assert_eq!(sq.get_pixel(22, 10).0, [255; 3]);
        assert_eq!(sq.get_pixel(24, 10).0, [255; 3]);
    }

    /// A small PNG that declares 9000 × 9000 RGBA pixels (324 MB decoded: over
    /// this limit, under the `image` crate's own 512 MiB) is a decode error, not
    /// an allocation.
    #[test]
    fn a_decompression_bomb_is_a_decode_error() {
        let mut png = Vec::new();
        let encoder = image::codecs::png::PngEncoder::new(&mut png);
        image::ImageEncoder::write_image(
            encoder,
            &[0u8; 16],
            2,
            2,
            image::ExtendedColorType::Rgba8,
        )
        .expect("png");
        // Patch the header's width and height to 9000 (and its CRC).
        png[16..20].copy_from_slice(&9_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&9_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode(&png).expect_err("too large");
        assert!(matches!(err, ImageError::Limits(_)), "{err}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}

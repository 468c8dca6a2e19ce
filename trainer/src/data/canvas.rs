//! An RGB pixel buffer that embedded-graphics draws into, plus the affine resampling
//! and box downsampling the synthetic generator uses for pose and anti-aliasing.

use std::convert::Infallible;

use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Size};

/// A `side × side` RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone)]
pub struct Canvas {
    side: usize,
    px: Vec<u8>,
}

impl Canvas {
    /// A canvas filled with `color`.
    pub fn new(side: usize, color: Rgb888) -> Self {
        let px = [color.r(), color.g(), color.b()].repeat(side * side);
        Canvas { side, px }
    }

    /// The side length in pixels.
    pub fn side(&self) -> usize {
        self.side
    }

    /// The raw RGB bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.px
    }

    /// Bilinear sample at real coordinates (pixel centres at integers), clamped.
    fn sample(&self, x: f32, y: f32) -> [f32; 3] {
        let max = (self.side - 1) as f32;
        let (x, y) = (x.clamp(0.0, max), y.clamp(0.0, max));
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.side - 1), (y0 + 1).min(self.side - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let at = |xx: usize, yy: usize, c: usize| self.px[(yy * self.side + xx) * 3 + c] as f32;
        std::array::from_fn(|c| {
            let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
            let bottom = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
            top * (1.0 - fy) + bottom * fy
        })
    }

    /// Rotates by `angle` radians, scales by `scale` about the centre and shifts by
    /// `(dx, dy)` pixels; the border colour extends outwards.
    pub fn warp(&self, angle: f32, scale: f32, dx: f32, dy: f32) -> Canvas {
        let c = (self.side as f32 - 1.0) / 2.0;
        let (sin, cos) = angle.sin_cos();
        let mut out = Vec::with_capacity(self.px.len());
        for y in 0..self.side {
            for x in 0..self.side {
                let (qx, qy) = ((x as f32 - c - dx) / scale, (y as f32 - c - dy) / scale);
                let (sx, sy) = (cos * qx + sin * qy + c, -sin * qx + cos * qy + c);
                out.extend(self.sample(sx, sy).map(|v| v.round() as u8));
            }
        }
        Canvas {
            side: self.side,
            px: out,
        }
    }

    /// Averages `factor × factor` blocks: anti-aliasing for a supersampled drawing.
    pub fn downsample(&self, factor: usize) -> Canvas {
        let side = self.side / factor;
        let mut px = Vec::with_capacity(side * side * 3);
        let n = (factor * factor) as u32;
        for y in 0..side {
            for x in 0..side {
                let mut acc = [0u32; 3];
                for yy in y * factor..(y + 1) * factor {
                    for xx in x * factor..(x + 1) * factor {
                        let i = (yy * self.side + xx) * 3;
                        for (c, a) in acc.iter_mut().enumerate() {
                            *a += self.px[i + c] as u32;
                        }
                    }
                }
                px.extend(acc.map(|a| ((a + n / 2) / n) as u8));
            }
        }
        Canvas { side, px }
    }

    /// Applies `f(x, y, channel, value) -> value` to every byte (lighting, noise).
    pub fn map(&mut self, mut f: impl FnMut(usize, usize, usize, f32) -> f32) {
        for (i, v) in self.px.iter_mut().enumerate() {
            let (p, c) = (i / 3, i % 3);
            *v = f(p % self.side, p / self.side, c, *v as f32)
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.side as u32, self.side as u32)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        for Pixel(p, color) in pixels {
            if p.x >= 0 && p.y >= 0 && (p.x as usize) < self.side && (p.y as usize) < self.side {
                let i = (p.y as usize * self.side + p.x as usize) * 3;
                self.px[i..i + 3].copy_from_slice(&[color.r(), color.g(), color.b()]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use embedded_graphics::prelude::*;
    use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};

    use super::*;

    #[test]
    fn draws_warps_and_downsamples() {
        let mut c = Canvas::new(8, Rgb888::BLACK);
        Rectangle::new(Point::new(0, 0), Size::new(4, 8))
            .into_styled(PrimitiveStyle::with_fill(Rgb888::WHITE))
            .draw(&mut c)
            .expect("infallible");
        let small = c.downsample(2).into_bytes();
        assert_eq!(small.len(), 4 * 4 * 3);
        assert_eq!(small[0], 255); // left half white
        assert_eq!(small[3 * 3], 0); // right half black
        let same = c.warp(0.0, 1.0, 0.0, 0.0);
        assert_eq!(same.into_bytes(), c.clone().into_bytes());
        // Half a turn puts the white half on the right.
        let turned = c.warp(std::f32::consts::PI, 1.0, 0.0, 0.0).into_bytes();
        assert_eq!(turned[0], 0);
        assert_eq!(turned[7 * 3], 255);
    }
}

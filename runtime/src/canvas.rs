//! [`RgbCanvas`]: an `image::RgbImage` behind embedded-graphics' `DrawTarget`, so
//! the same drawing code renders a contact sheet, a PNG frame on a host, or (in
//! the firmware demo) a framebuffer.

use std::convert::Infallible;

use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Size};
use image::RgbImage;

/// An RGB image that embedded-graphics can draw on; pixels outside are dropped.
#[derive(Debug, Clone)]
pub struct RgbCanvas {
    pub image: RgbImage,
}

impl RgbCanvas {
    /// A `width × height` canvas filled with `background`.
    pub fn new(width: u32, height: u32, background: Rgb888) -> Self {
        RgbCanvas {
            image: RgbImage::from_pixel(
                width,
                height,
                image::Rgb([background.r(), background.g(), background.b()]),
            ),
        }
    }

    /// Copies `img` with its top-left corner at `(x, y)`, clipped to the canvas.
    pub fn blit(&mut self, img: &RgbImage, x: i64, y: i64) {
        image::imageops::replace(&mut self.image, img, x, y);
    }
}

impl OriginDimensions for RgbCanvas {
    fn size(&self) -> Size {
        Size::new(self.image.width(), self.image.height())
    }
}

impl DrawTarget for RgbCanvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let (w, h) = self.image.dimensions();
        for Pixel(p, c) in pixels {
            if let (Ok(x), Ok(y)) = (u32::try_from(p.x), u32::try_from(p.y))
                && x < w
                && y < h
            {
                self.image
                    .put_pixel(x, y, image::Rgb([c.r(), c.g(), c.b()]));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::Drawable;
    use embedded_graphics::prelude::{Point, Primitive};
    use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};

    #[test]
    fn draws_inside_and_clips_outside() {
        let mut c = RgbCanvas::new(4, 3, Rgb888::BLACK);
        let _ = Rectangle::new(Point::new(-2, 1), Size::new(10, 1))
            .into_styled(PrimitiveStyle::with_fill(Rgb888::RED))
            .draw(&mut c);
        for x in 0..4 {
            assert_eq!(c.image.get_pixel(x, 1).0, [255, 0, 0]);
            assert_eq!(c.image.get_pixel(x, 0).0, [0, 0, 0]);
        }
        c.blit(&RgbImage::from_pixel(2, 2, image::Rgb([1, 2, 3])), 3, 2);
        assert_eq!(c.image.get_pixel(3, 2).0, [1, 2, 3]);
    }
}

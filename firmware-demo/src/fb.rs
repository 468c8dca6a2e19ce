//! The Linux framebuffer as an embedded-graphics `DrawTarget`, without `unsafe`:
//! the geometry comes from sysfs (`/sys/class/graphics/fbN/{virtual_size,
//! bits_per_pixel,stride}`, and `mode` and `pan` where the virtual screen is
//! larger than the visible one, as with double buffering), frames are drawn into
//! memory in the device's pixel
//! format (RGB565 or XRGB8888, little endian) and written to `/dev/fbN` in one go
//! by [`Framebuffer::flush`], so the screen never shows half a frame being drawn.

use std::convert::Infallible;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Size};

/// Pixel layouts of the framebuffers a Pi reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// 16 bits: 5 red, 6 green, 5 blue.
    Rgb565,
    /// 32 bits: blue, green, red, unused (in memory order).
    Xrgb8888,
}

impl PixelFormat {
    pub fn bytes(self) -> usize {
        match self {
            PixelFormat::Rgb565 => 2,
            PixelFormat::Xrgb8888 => 4,
        }
    }

    /// The format for a `bits_per_pixel` value, if supported.
    pub fn from_bits(bits: u32) -> Option<PixelFormat> {
        match bits {
            16 => Some(PixelFormat::Rgb565),
            32 => Some(PixelFormat::Xrgb8888),
            _ => None,
        }
    }

    fn encode(self, c: Rgb888, out: &mut [u8]) {
        match self {
            PixelFormat::Rgb565 => {
                let v =
                    ((c.r() as u16 >> 3) << 11) | ((c.g() as u16 >> 2) << 5) | (c.b() as u16 >> 3);
                out.copy_from_slice(&v.to_le_bytes());
            }
            PixelFormat::Xrgb8888 => out.copy_from_slice(&[c.b(), c.g(), c.r(), 0xff]),
        }
    }
}

/// A framebuffer device and an in-memory frame in its format.
#[derive(Debug, Clone)]
pub struct Framebuffer {
    device: PathBuf,
    width: u32,
    height: u32,
    /// Bytes per line (may exceed `width × bytes per pixel`).
    stride: usize,
    /// Where the visible screen starts in the device (the pan offset), in bytes.
    offset: u64,
    format: PixelFormat,
    frame: Vec<u8>,
}

/// `WxH` of a sysfs mode line (`U:800x480p-0`, `S:640x480i-60`; the first line).
fn visible_mode(modes: &str) -> Option<(u32, u32)> {
    let mode = modes.lines().next()?.split_once(':')?.1;
    let (w, rest) = mode.split_once('x')?;
    let h: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((w.parse().ok()?, h.parse().ok()?))
}

fn sysfs_value(dir: &Path, name: &str) -> Result<String, String> {
    let path = dir.join(name);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}

impl Framebuffer {
    /// Opens `/dev/fbN`, reading its geometry from `/sys/class/graphics/fbN`.
    pub fn open(device: &Path) -> Result<Framebuffer, String> {
        let name = device
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{device:?} does not name a framebuffer device"))?;
        Framebuffer::open_with_sysfs(device, &Path::new("/sys/class/graphics").join(name))
    }

    /// Opens `device` with the geometry files in `sysfs` (tests point both at
    /// temporary files).
    pub fn open_with_sysfs(device: &Path, sysfs: &Path) -> Result<Framebuffer, String> {
        let size = sysfs_value(sysfs, "virtual_size")?;
        let (w, h) = size
            .split_once(',')
            .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
            .ok_or_else(|| format!("{}: cannot read the size {size:?}", sysfs.display()))?;
        let bits: u32 = sysfs_value(sysfs, "bits_per_pixel")?
            .parse()
            .map_err(|_| format!("{}: bits_per_pixel is not a number", sysfs.display()))?;
        let format = PixelFormat::from_bits(bits).ok_or_else(|| {
            format!(
                "{device:?} has {bits} bits per pixel; this demo drives 16 (RGB565) and 32 (XRGB8888): set one with `fbset -depth 16`"
            )
        })?;
        let stride = sysfs_value(sysfs, "stride")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(w as usize * format.bytes());
        // The mode in use (`U:800x480p-0`) where the virtual screen is larger, and
        // the panned-to corner of it.
        let (vw, vh) = sysfs_value(sysfs, "mode")
            .ok()
            .and_then(|m| visible_mode(&m))
            .filter(|&(vw, vh)| vw <= w && vh <= h)
            .unwrap_or((w, h));
        let (px, py) = sysfs_value(sysfs, "pan")
            .ok()
            .and_then(|p| {
                let (x, y) = p.split_once(',')?;
                Some((x.parse::<u32>().ok()?, y.parse::<u32>().ok()?))
            })
            .filter(|&(x, y)| {
                x.checked_add(vw).is_some_and(|r| r <= w)
                    && y.checked_add(vh).is_some_and(|b| b <= h)
            })
            .unwrap_or((0, 0));
        let mut fb = Framebuffer::with_geometry(device, vw, vh, stride, format);
        fb.offset = py as u64 * fb.stride as u64 + px as u64 * format.bytes() as u64;
        Ok(fb)
    }

    /// A framebuffer of known geometry.
    pub fn with_geometry(
        device: &Path,
        width: u32,
        height: u32,
        stride: usize,
        format: PixelFormat,
    ) -> Framebuffer {
        let stride = stride.max(width as usize * format.bytes());
        Framebuffer {
            device: device.into(),
            width,
            height,
            stride,
            offset: 0,
            format,
            frame: vec![0; stride * height as usize],
        }
    }

    pub fn format(&self) -> PixelFormat {
        self.format
    }

    /// The frame's bytes, in the device's layout.
    pub fn bytes(&self) -> &[u8] {
        &self.frame
    }

    /// Writes the frame to the device: in one write, or line by line where the
    /// screen is panned sideways (each line then covers only its visible part).
    pub fn flush(&self) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).open(&self.device)?;
        let line = self.width as usize * self.format.bytes();
        if self.offset.is_multiple_of(self.stride as u64) {
            f.seek(SeekFrom::Start(self.offset))?;
            f.write_all(&self.frame)?;
        } else {
            for (y, row) in self.frame.chunks_exact(self.stride).enumerate() {
                f.seek(SeekFrom::Start(self.offset + (y * self.stride) as u64))?;
                f.write_all(&row[..line])?;
            }
        }
        f.flush()
    }
}

impl OriginDimensions for Framebuffer {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Framebuffer {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let n = self.format.bytes();
        for Pixel(p, c) in pixels {
            if let (Ok(x), Ok(y)) = (u32::try_from(p.x), u32::try_from(p.y))
                && x < self.width
                && y < self.height
            {
                let at = y as usize * self.stride + x as usize * n;
                self.format.encode(c, &mut self.frame[at..at + n]);
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

    fn sysfs(dir: &Path, size: &str, bits: &str, stride: &str) -> PathBuf {
        let s = dir.join("fb0");
        std::fs::create_dir_all(&s).expect("mkdir");
        std::fs::write(s.join("virtual_size"), size).expect("w");
        std::fs::write(s.join("bits_per_pixel"), bits).expect("w");
        std::fs::write(s.join("stride"), stride).expect("w");
        s
    }

    #[test]
    fn writes_rgb565_and_xrgb8888_frames_with_padded_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let dev = dir.path().join("fb-device");
        for (bits, stride, red) in [
            ("16", "12\n", vec![0x00, 0xf8]),
            ("32", "16\n", vec![0, 0, 255, 255]),
        ] {
            std::fs::write(&dev, b"").expect("dev");
            let mut fb =
                Framebuffer::open_with_sysfs(&dev, &sysfs(dir.path(), "3,2\n", bits, stride))
                    .expect("open");
            assert_eq!(fb.size(), Size::new(3, 2));
            let _ = Rectangle::new(Point::new(1, 1), Size::new(5, 5))
                .into_styled(PrimitiveStyle::with_fill(Rgb888::RED))
                .draw(&mut fb);
            fb.flush().expect("flush");
            let bytes = std::fs::read(&dev).expect("read");
            let n = fb.format().bytes();
            let stride: usize = stride.trim().parse().expect("stride");
            assert_eq!(bytes.len(), 2 * stride);
            assert!(bytes[..stride].iter().all(|&b| b == 0), "row 0 untouched");
            assert!(
                bytes[stride..stride + n].iter().all(|&b| b == 0),
                "pixel (0,1) untouched"
            );
            assert_eq!(&bytes[stride + n..stride + 2 * n], red.as_slice());
            assert_eq!(&bytes[stride + 2 * n..stride + 3 * n], red.as_slice());
        }
    }

    #[test]
    fn a_double_buffered_screen_draws_its_visible_part_where_it_is_panned() {
        let dir = tempfile::tempdir().expect("tmp");
        let dev = dir.path().join("fb-device");
        std::fs::write(&dev, vec![7u8; 4 * 2 * 4]).expect("dev");
        // 2×4 virtual, 2×2 visible, showing the lower half.
        let s = sysfs(dir.path(), "2,4\n", "16", "4\n");
        std::fs::write(s.join("mode"), "U:2x2p-0\n").expect("w");
        std::fs::write(s.join("pan"), "0,2\n").expect("w");
        let mut fb = Framebuffer::open_with_sysfs(&dev, &s).expect("open");
        assert_eq!(fb.size(), Size::new(2, 2));
        let _ = Rectangle::new(Point::new(0, 0), Size::new(2, 2))
            .into_styled(PrimitiveStyle::with_fill(Rgb888::RED))
            .draw(&mut fb);
        fb.flush().expect("flush");
        let bytes = std::fs::read(&dev).expect("read");
        assert!(
            bytes[..8].iter().all(|&b| b == 7),
            "the hidden half is untouched"
        );
        assert_eq!(&bytes[8..10], &[0x00, 0xf8]);
        assert_eq!(&bytes[14..16], &[0x00, 0xf8]);
        assert_eq!(
            visible_mode("S:640x480i-60\nU:800x600p-0"),
            Some((640, 480))
        );
        assert_eq!(visible_mode("garbage"), None);

        // Panned sideways on a 4×2 virtual screen: each line's two visible pixels
        // land at x = 1..3, the rest of every line untouched.
        std::fs::write(&dev, vec![7u8; 8 * 2]).expect("dev");
        let s = sysfs(dir.path(), "4,2\n", "16", "8\n");
        std::fs::write(s.join("mode"), "U:2x2p-0\n").expect("w");
        std::fs::write(s.join("pan"), "1,0\n").expect("w");
        let mut fb = Framebuffer::open_with_sysfs(&dev, &s).expect("open");
        let _ = Rectangle::new(Point::new(0, 0), Size::new(2, 2))
            .into_styled(PrimitiveStyle::with_fill(Rgb888::RED))
            .draw(&mut fb);
        fb.flush().expect("flush");
        let bytes = std::fs::read(&dev).expect("read");
        assert_eq!(bytes.len(), 16, "nothing written past the virtual screen");
        for row in bytes.chunks(8) {
            assert_eq!(row, &[7, 7, 0x00, 0xf8, 0x00, 0xf8, 7, 7]);
        }
        // A pan that would overflow is ignored.
        std::fs::write(s.join("pan"), "4294967295,0\n").expect("w");
        assert_eq!(
            Framebuffer::open_with_sysfs(&dev, &s).expect("open").offset,
            0
        );
    }

    #[test]
    fn unsupported_depths_and_missing_sysfs_are_explained() {
        let dir = tempfile::tempdir().expect("tmp");
        let dev = dir.path().join("fb0");
        let err =
            Framebuffer::open_with_sysfs(&dev, &sysfs(dir.path(), "3,2", "24", "9")).unwrap_err();
        assert!(err.contains("24 bits") && err.contains("fbset"), "{err}");
        let err = Framebuffer::open_with_sysfs(&dev, &dir.path().join("nope")).unwrap_err();
        assert!(err.contains("virtual_size"), "{err}");
    }
}

//! Where a command may write its output, checked before any work: a slip in `-o`
//! costs an error, not a file.
//!
//! A command may replace a file of the kind it writes (an old package, index or
//! sheet: that is how a rerun updates one) or an empty file. PNGs and ONNX
//! models are common files, so only those modkit wrote count: a PNG carrying
//! [`encode_png`]'s text chunk, an ONNX model whose producer is `modc`. It refuses a folder,
//! a folder that does not exist, one of its own inputs under any spelling of the
//! path (`./x`, `../d/x`, absolute, a link), and an existing file of another kind
//! (a checkpoint, a gallery image, a label list).
//!
//! ```
//! use modkit_models::output::{self, Output};
//! use modkit_models::package;
//!
//! let dir = tempfile::tempdir()?;
//! let ckpt = dir.path().join("run.safetensors");
//! std::fs::write(&ckpt, b"\x10\0\0\0\0\0\0\0{}")?;
//! let pkg = Output::Container(&package::KIND);
//! // A new file is fine; the checkpoint itself is refused.
//! output::check(&dir.path().join("model.modpack"), pkg, &[(&ckpt, "the checkpoint")])?;
//! let err = output::check(&ckpt, pkg, &[(&ckpt, "the checkpoint")]).unwrap_err();
//! assert!(err.to_string().contains("is the checkpoint"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Read;
use std::path::Path;

use crate::container::Kind;
use crate::{Error, Result};

/// The kind of file a command writes.
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    /// A framed modkit file (`.modpack`, `.modidx`), known by its magic bytes.
    Container(&'a Kind),
    /// A PNG image modkit wrote (a sheet, a frame, a plot): one that
    /// [`encode_png`] marked.
    Png,
    /// An ONNX model `modc` wrote: a protobuf `ModelProto`, whose first fields
    /// (`ir_version`, field 1, a small varint; `producer_name`, field 2) it
    /// writes first: the bytes `0x08`, `1..=0x7f`, `0x12`, 4, `modc`.
    Onnx,
    /// A modkit checkpoint: safetensors, whose header (after its 8-byte length)
    /// opens with the metadata modkit writes first.
    Checkpoint,
    /// A text file modkit writes, known by how it starts (a training log's
    /// `{"epoch":`).
    Text {
        what: &'static str,
        starts: &'static str,
    },
}

impl Output<'_> {
    /// `"modkit package"`, `"PNG image"`, …
    pub fn what(&self) -> &'static str {
        match self {
            Output::Container(kind) => kind.what,
            Output::Png => "PNG image",
            Output::Onnx => "ONNX model",
            Output::Checkpoint => "modkit checkpoint",
            Output::Text { what, .. } => what,
        }
    }

    /// Whether a file starting with `head` is of this kind.
    fn recognises(&self, head: &[u8]) -> bool {
        match self {
            Output::Container(kind) => head.starts_with(&kind.magic),
            Output::Png => {
                head.starts_with(PNG_SIGNATURE)
                    && head
                        .get(MARK_AT..)
                        .is_some_and(|h| h.starts_with(&png_mark()))
            }
            Output::Onnx => matches!(head, [0x08, 1..=0x7f, 0x12, 4, b'm', b'o', b'd', b'c', ..]),
            Output::Checkpoint => head
                .get(8..)
                .is_some_and(|h| h.starts_with(b"{\"__metadata__\"")),
            Output::Text { starts, .. } => head.starts_with(starts.as_bytes()),
        }
    }
}

/// The bytes of an existing file its kind is recognised by.
const HEAD: usize = 64;

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Where a PNG's second chunk starts: after the signature and the IHDR chunk
/// (length, type, 13 bytes of data, CRC), which every PNG opens with.
const MARK_AT: usize = 8 + 4 + 4 + 13 + 4;

/// The `tEXt` chunk's keyword and text (Latin-1, NUL between them).
const MARK_TEXT: &[u8] = b"Software\0modkit";

/// The `tEXt` chunk [`encode_png`] puts right after IHDR: length, type, text, CRC.
fn png_mark() -> Vec<u8> {
    let mut chunk = (MARK_TEXT.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"tEXt");
    chunk.extend_from_slice(MARK_TEXT);
    let crc = crc32fast::hash(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    chunk
}

/// `img` as a PNG that [`check`] knows as modkit's, so that a rerun may replace
/// it and nothing else: `image`'s encoding with a `Software: modkit` text chunk
/// after IHDR (the `image` crate writes no text chunks itself).
pub fn encode_png(img: &image::RgbImage) -> image::ImageResult<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
    debug_assert_eq!(&bytes[8 + 4..8 + 8], b"IHDR");
    bytes.splice(MARK_AT..MARK_AT, png_mark());
    Ok(bytes)
}

/// "a" or "an" before `word`, by its first letter.
fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some(c) if "aeiouAEIOU".contains(c) => "an",
        _ => "a",
    }
}

/// Fails if writing `kind` to `path` would replace a folder, one of `inputs`
/// (`(path, "the checkpoint")`), or an existing non-empty file of another kind, or
/// if `path`'s folder does not exist.
pub fn check(path: &Path, kind: Output, inputs: &[(&Path, &str)]) -> Result<()> {
    let refuse = |reason: String| Error::Output {
        path: path.to_path_buf(),
        reason,
    };
    let text = path.as_os_str().to_string_lossy();
    if path.is_dir() || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
        return Err(refuse(format!(
            "is a folder; name a file in it for the {}",
            kind.what()
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(refuse(match dir.exists() {
            true => format!("is under {dir:?}, which is a file, not a folder"),
            false => format!("its folder {dir:?} does not exist; create it first"),
        }));
    }
    let Ok(real) = std::fs::canonicalize(path) else {
        // A new file (or a dangling link, which writing replaces).
        return Ok(());
    };
    for (input, what) in inputs {
        if std::fs::canonicalize(input).is_ok_and(|p| p == real) {
            return Err(refuse(format!(
                "is {what}, an input of this command; name another file for the {}",
                kind.what()
            )));
        }
    }
    if !real.is_file() {
        // A device or a pipe (`/dev/null`, `/dev/stdout`): written to, not replaced.
        return Ok(());
    }
    let mut head = Vec::with_capacity(HEAD);
    let read = std::fs::File::open(&real).and_then(|f| f.take(HEAD as u64).read_to_end(&mut head));
    match read {
        Ok(0) => Ok(()),
        Ok(_) if kind.recognises(&head) => Ok(()),
        Ok(_) => Err(refuse(format!(
            "exists and is not {} {}{}; name a new file, or delete this one first to replace it",
            article(kind.what()),
            kind.what(),
            match kind {
                Output::Png => " modkit wrote",
                Output::Onnx => " modc exported",
                _ => "",
            }
        ))),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package;

    /// The marked PNG decodes as the image it was given (the chunk is valid:
    /// `image` checks CRCs), and carries the mark where [`check`] looks.
    #[test]
    fn marked_pngs_decode_to_their_image() {
        let img =
            image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        let bytes = encode_png(&img).expect("encode");
        assert!(Output::Png.recognises(&bytes[..HEAD]));
        let back = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .expect("decode")
            .to_rgb8();
        assert_eq!(back, img);
        let mut plain = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut plain),
            image::ImageFormat::Png,
        )
        .expect("encode");
        assert!(!Output::Png.recognises(&plain[..HEAD.min(plain.len())]));
    }

    #[test]
    fn refuses_folders_inputs_and_other_kinds() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let pkg = Output::Container(&package::KIND);
        let ckpt = d.join("run.safetensors");
        std::fs::write(&ckpt, b"\x10\0\0\0\0\0\0\0{\"a\":1}").expect("ckpt");
        let inputs = [(ckpt.as_path(), "the checkpoint")];
        let err =
            |p: &Path, kind: Output| check(p, kind, &inputs).expect_err("refused").to_string();
        // Fine: a new file, an old package, an empty file.
        check(&d.join("new.modpack"), pkg, &inputs).expect("new");
        let old = d.join("old.modpack");
        std::fs::write(&old, crate::container::frame(&package::KIND, b"x")).expect("old");
        check(&old, pkg, &inputs).expect("old package");
        let empty = d.join("empty");
        std::fs::write(&empty, b"").expect("empty");
        check(&empty, pkg, &inputs).expect("empty file");
        // The input under other spellings.
        let sub = d.join("sub");
        std::fs::create_dir(&sub).expect("sub");
        for spelling in [
            ckpt.clone(),
            sub.join("../run.safetensors"),
            d.join("./run.safetensors"),
        ] {
            let e = err(&spelling, pkg);
            assert!(
                e.contains("is the checkpoint") && e.contains("another file"),
                "{e}"
            );
        }
        // A folder, however named.
        for folder in [sub.clone(), d.join("sub/"), d.to_path_buf()] {
            let e = err(&folder, pkg);
            assert!(e.contains("is a folder"), "{e}");
        }
        // A folder that is not there.
        let e = err(&d.join("nowhere/model.modpack"), pkg);
        assert!(e.contains("does not exist"), "{e}");
        let e = err(&ckpt.join("model.modpack"), pkg);
        assert!(e.contains("which is a file, not a folder"), "{e}");
        // A checkpoint whose header is 264 bytes starts `08 01 00 …`: no ONNX model.
        let long = d.join("long.safetensors");
        let mut bytes = 264u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{\"__metadata__\":{}}");
        std::fs::write(&long, bytes).expect("long");
        assert!(err(&long, Output::Onnx).contains("not an ONNX model"));
        // Other kinds: a PNG is not a package, a package not a PNG or ONNX model.
        let png = d.join("face.png");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\nrest").expect("png");
        let e = err(&png, pkg);
        assert!(
            e.contains("not a modkit package") && e.contains("delete"),
            "{e}"
        );
        // A PNG modkit did not write (a photo) is not replaced; a sheet is.
        let e = err(&png, Output::Png);
        assert!(e.contains("not a PNG image modkit wrote"), "{e}");
        let sheet = d.join("sheet.png");
        let img = image::RgbImage::from_pixel(3, 2, image::Rgb([9, 8, 7]));
        std::fs::write(&sheet, encode_png(&img).expect("encode")).expect("sheet");
        check(&sheet, Output::Png, &inputs).expect("an old sheet");
        assert!(err(&old, Output::Png).contains("not a PNG image"));
        assert!(err(&old, Output::Onnx).contains("not an ONNX model"));
        let onnx = d.join("m.onnx");
        std::fs::write(&onnx, b"\x08\x09\x12\x04modc\x1a\x050.1.0").expect("onnx");
        check(&onnx, Output::Onnx, &inputs).expect("an old export");
        std::fs::write(&onnx, b"\x08\x09\x12\x07pytorch\x1a\x032.1").expect("onnx");
        let e = err(&onnx, Output::Onnx);
        assert!(e.contains("not an ONNX model modc exported"), "{e}");
        // A checkpoint replaces a checkpoint only; a log a log only.
        check(&long, Output::Checkpoint, &inputs).expect("an old checkpoint");
        let notes = d.join("list_attr_celeba.txt");
        std::fs::write(&notes, b"202599\n5_o_Clock_Shadow Arched_Eyebrows\n").expect("txt");
        assert!(err(&notes, Output::Checkpoint).contains("not a modkit checkpoint"));
        assert!(err(&png, Output::Checkpoint).contains("not a modkit checkpoint"));
        let log = Output::Text {
            what: "training log",
            starts: "{\"epoch\":",
        };
        let metrics = d.join("run.metrics.jsonl");
        std::fs::write(&metrics, b"{\"epoch\":1,\"loss\":0.5}\n").expect("log");
        check(&metrics, log, &inputs).expect("an old log");
        assert!(err(&notes, log).contains("not a training log"));
        assert!(err(&metrics, Output::Checkpoint).contains("not a modkit checkpoint"));
    }
}

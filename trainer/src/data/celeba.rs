//! CelebA's file layout, read and written.
//!
//! ```text
//! DIR/
//! ├─ img_align_celeba/000001.jpg …   (PNG or JPEG)
//! ├─ Anno/list_attr_celeba.txt       line 1: image count
//! │                                  line 2: attribute names
//! │                                  then:   "000001.jpg -1  1 …" (±1 per attribute)
//! └─ Eval/list_eval_partition.txt    "000001.jpg 0"  (0 train, 1 val, 2 test)
//! ```
//!
//! The reader takes any attribute header (not only CelebA's 40 names), lower-cases
//! the names, and rejects malformed lines with their line number. Images are
//! centre-cropped to a square and resized to the requested side.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{Dataset, Progress, Split, read_text, synth};
use crate::{Error, Result};

pub use modkit_models::celeba::{ATTR_FILE, AttrTable, IMAGES, PARTITION_FILE, parse_attributes};

fn malformed(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Malformed {
        path: path.into(),
        line,
        msg: msg.into(),
    }
}

/// Parses `list_eval_partition.txt` text.
pub fn parse_partition(text: &str, path: &Path) -> Result<HashMap<String, Split>> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(file) = fields.next() else { continue };
        let split = match fields.next() {
            Some("0") => Split::Train,
            Some("1") => Split::Val,
            Some("2") => Split::Test,
            other => {
                return Err(malformed(
                    path,
                    i + 1,
                    match other {
                        Some(code) => format!(
                            "partition {code:?} of {file:?} is not 0 (train), 1 (val) or 2 (test)"
                        ),
                        None => format!(
                            "{file:?} has no partition: write `{file} 0` (train), 1 (val) or 2 (test)"
                        ),
                    },
                ));
            }
        };
        if let Some(extra) = fields.next() {
            return Err(malformed(
                path,
                i + 1,
                format!(
                    "{extra:?} after {file:?}'s partition: write one file and one code per line"
                ),
            ));
        }
        if out
            .insert(file.to_string(), split)
            .is_some_and(|s| s != split)
        {
            return Err(malformed(
                path,
                i + 1,
                format!("{file:?} is listed again, in another partition; keep one line per image"),
            ));
        }
    }
    Ok(out)
}

/// Loads a CelebA-layout directory, resizing images to `size`; `limit` keeps the
/// first N images of the attribute file.
pub fn load(dir: &Path, size: usize, limit: Option<usize>) -> Result<Dataset> {
    load_with_progress(dir, size, limit, &|_, _| {})
}

/// [`load`], calling `progress` as the images are decoded.
pub fn load_with_progress(
    dir: &Path,
    size: usize,
    limit: Option<usize>,
    progress: Progress,
) -> Result<Dataset> {
    let attr_path = dir.join(ATTR_FILE);
    let part_path = dir.join(PARTITION_FILE);
    let mut table = parse_attributes(&read_text(&attr_path)?, &attr_path)?;
    let partition = parse_partition(&read_text(&part_path)?, &part_path)?;
    if let Some(n) = limit {
        table.rows.truncate(n);
    }
    Dataset::check_fits(
        table.rows.len(),
        size,
        &attr_path.display().to_string(),
        "--limit",
    )?;
    let splits = table
        .rows
        .iter()
        .map(|(f, _)| {
            partition.get(f).copied().ok_or_else(|| Error::NoPartition {
                path: part_path.clone(),
                file: f.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let paths: Vec<PathBuf> = table
        .rows
        .iter()
        .map(|(f, _)| dir.join(IMAGES).join(f))
        .collect();
    let pixels = super::load_images(&paths, size, super::Fit::Crop, progress)?;
    Ok(Dataset {
        attributes: table.attributes.clone(),
        files: table.rows.iter().map(|(f, _)| f.clone()).collect(),
        labels: table
            .rows
            .iter()
            .flat_map(|(_, l)| l.iter().map(|&b| u16::from(b)))
            .collect(),
        classes: vec![Vec::new(); table.attributes.len()],
        splits,
        image_size: size,
        fit: super::Fit::Crop,
        pixels,
        notes: Vec::new(),
        csn_splits: None,
    })
}

/// Decodes an image, centre-crops it to a square and resizes it to `size`.
pub fn load_image(path: &Path, size: usize) -> Result<Vec<u8>> {
    super::load_image_fit(path, size, super::Fit::Crop)
}

/// A file name `write_synthetic` gives an image: `000001.png` → `Some(1)`.
fn synthetic_number(name: &str) -> Option<usize> {
    let digits = name.strip_suffix(".png")?;
    let number: usize = digits.parse().ok()?;
    (digits.bytes().all(|b| b.is_ascii_digit()) && format!("{number:06}") == digits)
        .then_some(number)
}

/// A temporary file an interrupted [`modkit_models::write_atomic`] left:
/// `.000001.png.tmp1234`.
fn leftover(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// The file [`write_synthetic`] writes first, which marks its folder as a
/// synthetic set even before the lists are written.
pub const SYNTH_MARKER: &str = ".modtrain-synth";

/// The files of an earlier synthetic set in `dir` that a new one of `n` images
/// would not replace (its images past `n`, leftovers of an interrupted write),
/// or `None` where `dir` is missing or empty; an error where `dir` holds
/// anything else, which writing a set there would mix with or replace. A set
/// interrupted before its lists were written (images only) counts as one when
/// [`SYNTH_MARKER`] says so: images named like CelebA's alone are not enough
/// (a CelebA copy converted to PNG before its lists arrive).
fn earlier_synthetic(dir: &Path, n: usize) -> Result<Option<Vec<PathBuf>>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let names = |d: &Path| -> Result<Vec<String>> {
        match std::fs::read_dir(d) {
            Ok(entries) => entries
                .map(|e| Ok(e.map_err(io(d))?.file_name().to_string_lossy().into_owned()))
                .collect(),
            Err(_) => Ok(Vec::new()),
        }
    };
    let refuse = |what: String| {
        Error::Config(format!(
            "--out {}: {what}, not an earlier `modtrain synth` set, which the new one would mix with or replace; name a new or empty folder",
            dir.display()
        ))
    };
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Config(format!(
            "--out {}: is a file, not a folder; name a new or empty folder for the synthetic set",
            dir.display()
        )));
    }
    let top = names(dir)?;
    if top.is_empty() {
        return Ok(None);
    }
    if let Some(other) = top
        .iter()
        .find(|n| !["Anno", "Eval", IMAGES, SYNTH_MARKER].contains(&n.as_str()) && !leftover(n))
    {
        return Err(refuse(format!("holds {other:?}")));
    }
    // The lists, if written yet, are the synthetic set's.
    for (sub, file) in [("Anno", ATTR_FILE), ("Eval", PARTITION_FILE)] {
        let written = file.rsplit('/').next().unwrap_or(file);
        if let Some(other) = names(&dir.join(sub))?
            .iter()
            .find(|n| n.as_str() != written && !leftover(n))
        {
            return Err(refuse(format!("holds {sub}/{other}")));
        }
    }
    if let Ok(text) = std::fs::read_to_string(dir.join(ATTR_FILE))
        && text.lines().nth(1) != Some(synth::CELEBA_HEADER_NAMES.join(" ").as_str())
    {
        return Err(refuse(format!("holds {ATTR_FILE} of other attributes")));
    }
    let images = dir.join(IMAGES);
    let listed = dir.join(ATTR_FILE).is_file();
    let marked = dir.join(SYNTH_MARKER).is_file();
    let found = names(&images)?;
    if let Some(image) = found.iter().find(|n| !leftover(n))
        && !listed
        && !marked
    {
        return Err(refuse(format!(
            "holds the image {IMAGES}/{image} and neither {ATTR_FILE} nor {SYNTH_MARKER}"
        )));
    }
    let mut stale = Vec::new();
    for name in found {
        match synthetic_number(&name) {
            Some(i) if i <= n => {}
            Some(_) => stale.push(images.join(&name)),
            None if leftover(&name) => stale.push(images.join(&name)),
            None => return Err(refuse(format!("holds the image {IMAGES}/{name}"))),
        }
    }
    for sub in ["Anno", "Eval"] {
        for name in names(&dir.join(sub))?.into_iter().filter(|n| leftover(n)) {
            stale.push(dir.join(sub).join(name));
        }
    }
    // The marker's, cut off as it was written.
    for name in top.iter().filter(|n| leftover(n)) {
        stale.push(dir.join(name));
    }
    Ok(Some(stale))
}

/// Writes the synthetic set (`n` faces of `size` pixels from `seed`) in CelebA's
/// layout, as PNG; calls `progress(done)` as images are written. `dir` must be
/// missing, empty, or hold an earlier synthetic set, which is replaced whole
/// (its images past the new `n` are removed); anything else is refused before
/// a file is written.
pub fn write_synthetic(
    dir: &Path,
    n: usize,
    size: usize,
    seed: u64,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<()> {
    let stale = earlier_synthetic(dir, n)?.unwrap_or_default();
    let io = |path: PathBuf| move |source| Error::Io { path, source };
    for sub in [IMAGES, "Anno", "Eval"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io(dir.join(sub)))?;
    }
    modkit_models::write_atomic(&dir.join(SYNTH_MARKER), b"written by modtrain synth\n")?;
    let files: Vec<String> = (1..=n).map(|i| format!("{i:06}.png")).collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let labels: Vec<[bool; 20]> = (0..n)
        .into_par_iter()
        .map(|i| {
            let face = synth::face(seed, i as u64, size);
            let path = dir.join(IMAGES).join(&files[i]);
            let bytes = encode_png(&face.pixels, size).map_err(|source| Error::ImageEncode {
                path: path.clone(),
                source,
            })?;
            modkit_models::write_atomic(&path, &bytes)?;
            progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
            Ok(face.attributes)
        })
        .collect::<Result<_>>()?;
    let mut attr = format!("{n}\n{}\n", synth::CELEBA_HEADER_NAMES.join(" "));
    let mut part = String::new();
    for (i, (f, l)) in files.iter().zip(&labels).enumerate() {
        let values: Vec<&str> = l.iter().map(|&b| if b { " 1" } else { "-1" }).collect();
        attr.push_str(&format!("{f} {}\n", values.join(" ")));
        part.push_str(&format!("{f} {}\n", super::split_of(i, n).code()));
    }
    modkit_models::write_atomic(&dir.join(ATTR_FILE), attr.as_bytes())?;
    modkit_models::write_atomic(&dir.join(PARTITION_FILE), part.as_bytes())?;
    // The earlier set's images the new lists no longer name, and leftovers.
    for path in stale {
        std::fs::remove_file(&path).map_err(io(path))?;
    }
    Ok(())
}

fn encode_png(rgb: &[u8], size: usize) -> image::ImageResult<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(
        &mut out,
        rgb,
        size as u32,
        size as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An earlier synthetic set is replaced whole (no image of it left over);
    /// a folder holding anything else is refused before a file is written.
    #[test]
    fn synthetic_sets_replace_only_earlier_synthetic_sets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("set");
        write_synthetic(&d, 30, 16, 1, &|_| {}).expect("first");
        write_synthetic(&d, 10, 16, 2, &|_| {}).expect("smaller");
        assert_eq!(std::fs::read_dir(d.join(IMAGES)).expect("ls").count(), 10);
        assert_eq!(load(&d, 16, None).expect("load").len(), 10);
        // Another set's files: refused, untouched.
        let refused = |d: &Path, want: &str| {
            let err = write_synthetic(d, 5, 16, 3, &|_| {}).expect_err("refused");
            let err = err.to_string();
            assert!(
                err.contains(want) && err.contains("new or empty folder"),
                "{err}"
            );
        };
        std::fs::write(d.join(IMAGES).join("000001.jpg"), b"mine").expect("jpg");
        refused(&d, "holds the image img_align_celeba/000001.jpg");
        let other = dir.path().join("other");
        std::fs::create_dir_all(other.join("Anno")).expect("mkdir");
        std::fs::write(other.join(ATTR_FILE), "1\nMy_Attribute\nx.png 1\n").expect("attr");
        refused(&other, "of other attributes");
        assert_eq!(
            std::fs::read_to_string(other.join(ATTR_FILE)).expect("attr"),
            "1\nMy_Attribute\nx.png 1\n"
        );
        assert!(!other.join(IMAGES).exists() && !other.join("Eval").exists());
        let notes = dir.path().join("notes");
        std::fs::create_dir_all(&notes).expect("mkdir");
        std::fs::write(notes.join("todo.txt"), "x").expect("todo");
        refused(&notes, "holds \"todo.txt\"");
        assert_eq!(std::fs::read_dir(&notes).expect("ls").count(), 1);
        // Interrupted: images and a leftover temporary file, no lists yet.
        let cut = dir.path().join("cut");
        write_synthetic(&cut, 12, 16, 1, &|_| {}).expect("first");
        std::fs::remove_file(cut.join(ATTR_FILE)).expect("rm");
        std::fs::remove_file(cut.join(PARTITION_FILE)).expect("rm");
        std::fs::write(cut.join(IMAGES).join(".000013.png.tmp4567"), b"half").expect("tmp");
        write_synthetic(&cut, 8, 16, 1, &|_| {}).expect("over an interrupted set");
        assert_eq!(std::fs::read_dir(cut.join(IMAGES)).expect("ls").count(), 8);
        // Images named like CelebA's without the marker or lists (a CelebA copy
        // converted to PNG, lists still to come): refused, untouched.
        let png = dir.path().join("png");
        std::fs::create_dir_all(png.join(IMAGES)).expect("mkdir");
        for i in 1..=3 {
            let path = png.join(IMAGES).join(format!("{i:06}.png"));
            std::fs::write(path, b"photo").expect("png");
        }
        refused(&png, "img_align_celeba/00000");
        refused(
            &png,
            "neither Anno/list_attr_celeba.txt nor .modtrain-synth",
        );
        let kept = std::fs::read_dir(png.join(IMAGES)).expect("ls").count();
        assert_eq!(kept, 3);
        assert_eq!(
            std::fs::read(png.join(IMAGES).join("000003.png")).expect("png"),
            b"photo"
        );
        assert!(!png.join("Anno").exists() && !png.join(SYNTH_MARKER).exists());
        // Another file beside the lists is not the set's.
        std::fs::write(cut.join("Anno/notes.txt"), b"mine").expect("notes");
        refused(&cut, "holds Anno/notes.txt");
        // A file is not a folder.
        let file = dir.path().join("face.png");
        std::fs::write(&file, b"photo").expect("file");
        refused(&file, "is a file, not a folder");
        assert_eq!(std::fs::read(&file).expect("file"), b"photo");
        // An empty folder is fine.
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).expect("mkdir");
        write_synthetic(&empty, 3, 16, 0, &|_| {}).expect("empty folder");
    }

    #[test]
    fn synthetic_layout_round_trips_through_the_loader() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_synthetic(dir.path(), 30, 48, 5, &|_| {}).expect("write");
        let ds = load(dir.path(), 48, None).expect("load");
        let direct = Dataset::synthetic(30, 48, 5);
        assert_eq!(ds.attributes, direct.attributes);
        assert_eq!(ds.labels, direct.labels);
        assert_eq!(ds.splits, direct.splits);
        assert_eq!(ds.files, direct.files);
        assert_eq!(ds.pixels, direct.pixels, "PNG is lossless");
        // Resizing on load works too.
        let small = load(dir.path(), 24, Some(10)).expect("resize");
        assert_eq!((small.len(), small.pixels.len()), (10, 10 * 24 * 24 * 3));
    }

    #[test]
    fn rejects_a_malformed_partition_with_its_line_number() {
        let err = parse_partition("a.jpg 0\nb.jpg 7\n", Path::new("p.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("\"7\""), "{err}");
        assert!(!err.contains("Some("), "{err}");
        let err = parse_partition("a.jpg 0\nb.jpg\n", Path::new("p.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("`b.jpg 0`"), "{err}");
        // A file in two partitions, or a third field: refused; listed twice alike: one.
        for (text, want) in [
            (
                "a.jpg 0\nb.jpg 1\na.jpg 2\n",
                "line 3: \"a.jpg\" is listed again, in another partition",
            ),
            ("a.jpg 0 x\n", "line 1: \"x\" after \"a.jpg\"'s partition"),
        ] {
            let err = parse_partition(text, Path::new("p.txt"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
        let p = parse_partition("a.jpg 0\na.jpg 0\n", Path::new("p.txt")).expect("alike");
        assert_eq!(p.len(), 1);
    }

    /// 6,000 images at 1024² would take 17.6 GiB: refused from the attribute
    /// file, before an image is read (none exists here).
    #[test]
    fn a_set_too_large_to_decode_is_refused_before_decoding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = 6000;
        let (mut attr, mut part) = (format!("{n}\nSmiling\n"), String::new());
        for i in 1..=n {
            attr.push_str(&format!("{i:06}.png 1\n"));
            part.push_str(&format!("{i:06}.png 0\n"));
        }
        for (file, text) in [(ATTR_FILE, attr), (PARTITION_FILE, part)] {
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        let err = load(dir.path(), 1024, None).unwrap_err().to_string();
        assert!(
            err.contains("list_attr_celeba.txt: 6000 images of 1024×1024"),
            "{err}"
        );
        assert!(err.contains("over the 16 GiB"), "{err}");
    }

    #[test]
    fn missing_image_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_synthetic(dir.path(), 3, 48, 5, &|_| {}).expect("write");
        std::fs::remove_file(dir.path().join(IMAGES).join("000002.png")).expect("rm");
        let err = load(dir.path(), 48, None).unwrap_err().to_string();
        assert!(
            err.contains("000002.png") && err.contains("cannot read image"),
            "{err}"
        );
    }

    #[test]
    fn image_without_a_partition_names_the_file_not_a_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_synthetic(dir.path(), 3, 48, 5, &|_| {}).expect("write");
        let part = dir.path().join(PARTITION_FILE);
        std::fs::write(&part, "000001.png 0\n000003.png 2\n").expect("partition");
        let err = load(dir.path(), 48, None).unwrap_err().to_string();
        assert!(
            err.contains("list_eval_partition.txt\" has no line for image \"000002.png\"")
                && !err.contains("line 0"),
            "{err}"
        );
    }

    #[test]
    fn loading_reports_each_decoded_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_synthetic(dir.path(), 6, 48, 5, &|_| {}).expect("write");
        let calls = std::sync::Mutex::new(Vec::new());
        let ds = load_with_progress(dir.path(), 48, Some(4), &|done, total| {
            calls.lock().expect("lock").push((done, total));
        })
        .expect("load");
        let mut calls = calls.into_inner().expect("lock");
        calls.sort();
        assert_eq!(calls, [(1, 4), (2, 4), (3, 4), (4, 4)]);
        assert_eq!(
            ds.pixels,
            load(dir.path(), 48, Some(4)).expect("plain").pixels
        );
    }
}

//! Datasets: images in memory with attributes (binary, like CelebA's, or with any
//! number of classes, like UT-Zappos50K's) and train/val/test splits.
//!
//! * [`synth`]: the built-in procedural faces (no download needed).
//! * [`celeba`]: CelebA's file layout, read and written (the synthetic set is
//!   written in it, so one loader serves both).
//! * [`zappos`]: UT-Zappos50K's layout (the paper's product retrieval, Table 6).
//! * [`folder`]: any image folder with a CSV of labels.

mod canvas;
pub mod celeba;
pub mod folder;
pub mod synth;
pub mod zappos;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// The class of an image whose value of an attribute is unknown: it takes no part
/// in that attribute's triplets.
pub const MISSING: u16 = u16::MAX;

/// Square RGB images (`size × size × 3` bytes each, row-major) with attributes.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Attribute names, lower case, in the file's order.
    pub attributes: Vec<String>,
    /// Image file names (ids).
    pub files: Vec<String>,
    /// `files.len() × attributes.len()` class indices, row-major: for a binary
    /// attribute 0 (without) or 1 (with); else an index into `classes`; or
    /// [`MISSING`].
    pub labels: Vec<u16>,
    /// Per attribute, the names of its classes where they are more than "without"
    /// and "with" (empty for binary attributes).
    pub classes: Vec<Vec<String>>,
    pub splits: Vec<Split>,
    pub image_size: usize,
    /// How the images were squared; training records it in the checkpoint's
    /// [`modkit_models::Preprocess`], so that the runtime squares queries alike.
    pub fit: Fit,
    pub pixels: Vec<u8>,
    /// What loading left out that the user should hear of (`modtrain` prints
    /// each as a warning), e.g. UT-Zappos50K shoes without an image.
    pub notes: Vec<String>,
    /// For UT-Zappos50K, whether the splits are CSN's (from its triplet lists)
    /// rather than drawn by hash; `None` for other data. Training records it, so
    /// that a run is not evaluated or resumed on other splits.
    pub csn_splits: Option<bool>,
}

/// The most memory the images of one dataset may take (3 bytes a pixel).
pub const MAX_PIXEL_BYTES: u64 = 16 << 30;

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The class of image `i` for attribute `attr` ([`MISSING`] when unknown).
    pub fn class(&self, i: usize, attr: usize) -> u16 {
        self.labels[i * self.attributes.len() + attr]
    }

    /// Whether image `i` has binary attribute `attr` (class 1).
    pub fn label(&self, i: usize, attr: usize) -> bool {
        self.class(i, attr) == 1
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

    /// Checks that `n` images of `size`×`size` fit in [`MAX_PIXEL_BYTES`] before
    /// they are generated or decoded; `what` names what asked for them (an option,
    /// or a label file) in the error, `fewer` the option that asks for fewer.
    pub fn check_fits(n: usize, size: usize, what: &str, fewer: &str) -> Result<()> {
        let bytes = n as u128 * (size as u128).pow(2) * 3;
        if bytes > u128::from(MAX_PIXEL_BYTES) {
            return Err(Error::Config(format!(
                "{what}: {n} images of {size}×{size} would take {:.1} GiB of memory, over the {} GiB a dataset may; use fewer or smaller images ({fewer}, --input-size)",
                bytes as f64 / f64::from(1u32 << 30),
                MAX_PIXEL_BYTES >> 30
            )));
        }
        Ok(())
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
            classes: vec![Vec::new(); synth::ATTRIBUTES.len()],
            splits: (0..n).map(|i| split_of(i, n)).collect(),
            image_size: size,
            fit: Fit::Crop,
            pixels: Vec::with_capacity(n * size * size * 3),
            notes: Vec::new(),
            csn_splits: None,
        };
        for f in faces {
            ds.labels.extend(f.attributes.map(u16::from));
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

/// The split of an image by a hash of its id (FNV-1a): `train`% train, `val`%
/// validation, the rest test. Stable however the files are ordered or limited.
pub(crate) fn split_by_hash(id: &str, train: u64, val: u64) -> Split {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    match h % 100 {
        p if p < train => Split::Train,
        p if p < train + val => Split::Val,
        _ => Split::Test,
    }
}

/// The class indices of one attribute's column of text values (`None`:
/// unknown, [`MISSING`]) and its class names. Two values that spell a binary
/// attribute (`0`/`1`, `-1`/`1`, `false`/`true`, `no`/`yes`, any case) give
/// classes 0 and 1 and no names; otherwise the distinct values, sorted, are the
/// classes. Errors (with the number found) beyond `MISSING − 1` classes.
pub(crate) fn encode_column(
    values: &[Option<&str>],
) -> std::result::Result<(Vec<u16>, Vec<String>), usize> {
    let mut names: Vec<String> = values.iter().flatten().map(|v| v.to_string()).collect();
    names.sort();
    names.dedup();
    if names.len() >= MISSING as usize {
        return Err(names.len());
    }
    let lower: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    let binary = [["0", "1"], ["-1", "1"], ["false", "true"], ["no", "yes"]]
        .iter()
        .find(|pair| !lower.is_empty() && lower.iter().all(|v| pair.contains(&v.as_str())));
    let labels = values
        .iter()
        .map(|v| match (v, binary) {
            (None, _) => MISSING,
            (Some(v), Some(pair)) => u16::from(v.eq_ignore_ascii_case(pair[1])),
            (Some(v), None) => names
                .binary_search_by(|n| n.as_str().cmp(v))
                .map_or(MISSING, |i| i as u16),
        })
        .collect();
    Ok((labels, if binary.is_some() { Vec::new() } else { names }))
}

pub use modkit_models::Fit;

/// A label or annotation file's text; bytes that are not UTF-8 are an error
/// naming their line, not "stream did not contain valid UTF-8".
pub(crate) fn read_text(path: &std::path::Path) -> Result<String> {
    Ok(modkit_models::read_text(path)?)
}

/// Decodes an image, squares it by `fit` and resizes it to `size`: RGB bytes,
/// the runtime's pixels ([`modkit_models::pixels`]).
pub fn load_image_fit(path: &std::path::Path, size: usize, fit: Fit) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| Error::ImageRead {
        path: path.into(),
        source,
    })?;
    let img = modkit_models::pixels::decode(&bytes).map_err(|source| Error::Image {
        path: path.into(),
        source,
    })?;
    Ok(modkit_models::pixels::square(&img, size as u32, fit).into_raw())
}

/// Called as a loader decodes images, from rayon's threads, with the number
/// decoded so far and the number to decode.
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Decodes `paths` in parallel with [`load_image_fit`] into one buffer of
/// `paths.len()` images, calling `progress` after each.
fn load_images(paths: &[PathBuf], size: usize, fit: Fit, progress: Progress) -> Result<Vec<u8>> {
    let bytes = size * size * 3;
    let mut pixels = vec![0u8; paths.len() * bytes];
    let done = AtomicUsize::new(0);
    pixels
        .par_chunks_mut(bytes.max(1))
        .zip(paths)
        .try_for_each(|(out, path)| -> Result<()> {
            // `load_image_fit` returns exactly `size × size × 3` bytes.
            out.copy_from_slice(&load_image_fit(path, size, fit)?);
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, paths.len());
            Ok(())
        })?;
    Ok(pixels)
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
    /// A directory in UT-Zappos50K's layout.
    Zappos(std::path::PathBuf),
    /// A directory of images with a `labels.csv`.
    Folder(std::path::PathBuf),
}

impl DataSource {
    /// Whether its attributes are the face attributes of CelebA (and of the
    /// built-in set), whose 20 of the paper are the default tasks.
    pub fn is_faces(&self) -> bool {
        matches!(self, DataSource::Synth | DataSource::Celeba(_))
    }

    /// For UT-Zappos50K, whether it is split by CSN's triplet lists, as the
    /// loaded [`Dataset::csn_splits`] will say; `None` for other data, and for
    /// a folder without UT-Zappos50K's meta-data (missing or mistyped: the
    /// loader's error says which file is missing, and its dataset is checked).
    pub fn csn_splits(&self) -> Option<bool> {
        match self {
            DataSource::Zappos(dir) if dir.join(zappos::META).is_file() => {
                Some(zappos::has_csn_lists(dir))
            }
            _ => None,
        }
    }
}

impl FromStr for DataSource {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "synth" {
            return Ok(DataSource::Synth);
        }
        match s.split_once(':') {
            Some(("celeba", dir)) if !dir.is_empty() => Ok(DataSource::Celeba(dir.into())),
            Some(("zappos", dir)) if !dir.is_empty() => Ok(DataSource::Zappos(dir.into())),
            Some(("folder", dir)) if !dir.is_empty() => Ok(DataSource::Folder(dir.into())),
            _ => Err(Error::BadDataSource { value: s.into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::synth::ATTRIBUTES;
    use super::synth::attr::*;
    use super::*;

    /// A file saved in Latin-1 names the line of its first non-UTF-8 byte.
    #[test]
    fn text_that_is_not_utf8_names_its_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("list_attr_celeba.txt");
        std::fs::write(&path, b"2\nSmiling\ncaf\xe9.png 1\n").expect("write");
        let err = read_text(&path).expect_err("latin-1").to_string();
        assert!(err.contains("line 3: is not UTF-8 text"), "{err}");
        std::fs::write(&path, "2\nSmiling\ncafé.png 1\n").expect("write");
        assert!(read_text(&path).expect("utf-8").contains("café"));
    }

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
        assert_eq!(
            "zappos:/z".parse::<DataSource>().expect("zappos"),
            DataSource::Zappos("/z".into())
        );
        assert_eq!(
            "folder:/f".parse::<DataSource>().expect("folder"),
            DataSource::Folder("/f".into())
        );
        assert!("folder:".parse::<DataSource>().is_err());
        let err = "imagenet:/x".parse::<DataSource>().unwrap_err().to_string();
        assert!(
            err.contains("imagenet:/x") && err.contains("celeba:DIR"),
            "{err}"
        );
    }

    #[test]
    fn columns_encode_binary_and_multi_class_values() {
        let (l, names) = encode_column(&[Some("1"), Some("-1"), None, Some("1")]).expect("binary");
        assert_eq!(l, [1, 0, MISSING, 1]);
        assert!(names.is_empty());
        let (l, names) = encode_column(&[Some("Yes"), Some("no")]).expect("yes/no");
        assert_eq!((l, names.len()), (vec![1, 0], 0));
        let (l, names) =
            encode_column(&[Some("Boots"), Some("Shoes"), Some("Sandals"), Some("Boots")])
                .expect("classes");
        assert_eq!(names, ["Boots", "Sandals", "Shoes"]);
        assert_eq!(l, [0, 2, 1, 0]);
    }

    #[test]
    fn unreadable_and_undecodable_images_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = |name: &str| {
            load_image_fit(&dir.path().join(name), 8, Fit::Crop)
                .expect_err(name)
                .to_string()
        };
        std::fs::create_dir(dir.path().join("dir.png")).expect("dir");
        std::fs::write(dir.path().join("junk.png"), b"not a png").expect("junk");
        // A PNG named `.jpg` decodes, by its bytes.
        image::RgbImage::from_pixel(4, 4, image::Rgb([9, 99, 199]))
            .save_with_format(dir.path().join("png.jpg"), image::ImageFormat::Png)
            .expect("png");
        let px = load_image_fit(&dir.path().join("png.jpg"), 2, Fit::Crop).expect("png as jpg");
        assert_eq!(px[..3], [9, 99, 199]);
        let missing = err("missing.png");
        assert!(
            missing.contains("missing.png\": cannot read image"),
            "{missing}"
        );
        assert!(err("dir.png").contains("cannot read image"), "dir.png");
        let junk = err("junk.png");
        assert!(junk.contains("junk.png\": cannot decode image"), "{junk}");
    }

    #[test]
    fn hash_splits_are_stable_and_near_their_shares() {
        let ids: Vec<String> = (0..5000).map(|i| format!("{i}.jpg")).collect();
        let count = |s: Split| {
            ids.iter()
                .filter(|id| split_by_hash(id, 70, 10) == s)
                .count()
        };
        assert!(
            (3300..3700).contains(&count(Split::Train)),
            "{}",
            count(Split::Train)
        );
        assert!(
            (400..600).contains(&count(Split::Val)),
            "{}",
            count(Split::Val)
        );
        assert!(
            (800..1200).contains(&count(Split::Test)),
            "{}",
            count(Split::Test)
        );
        assert_eq!(
            split_by_hash("a.jpg", 70, 10),
            split_by_hash("a.jpg", 70, 10)
        );
    }
}

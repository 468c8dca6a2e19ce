//! UT-Zappos50K's layout (`--data zappos:DIR`), the paper's product retrieval
//! (section 4.3, Table 6): 50,025 catalogue shoes, four tasks.
//!
//! ```text
//! DIR/
//! ├─ ut-zap50k-images-square/Boots/Ankle/Brand/8015407.255.jpg …   (or ut-zap50k-images/)
//! └─ ut-zap50k-data/meta-data.csv   CID,Category,SubCategory,HeelHeight,Insole,Closure,Gender,Material,ToeStyle
//! ```
//!
//! * An image's file name is its `CID` with `-` written `.` (`8015407-255` →
//!   `8015407.255.jpg`), anywhere under the images directory.
//! * Every metadata column but `CID` is an attribute, named in snake case:
//!   `category`, `sub_category`, `heel_height`, `insole`, `closure`, `gender`,
//!   `material`, `toe_style`. The paper's four tasks, the default, are the shoe's
//!   type, suggested gender, heel height and closure: [`PAPER_TASKS`].
//! * A value listing several (`Buckle;Zipper`) or none is unknown: that shoe takes
//!   no part in that task's triplets.
//! * The paper follows the splits of Veit et al. (CSN), 70/10/20, which are not
//!   part of the dataset; here each shoe's split is drawn from a hash of its CID in
//!   the same proportions.
//! * The square images are used as they are; the original 136×102 ones are padded
//!   with white to a square, not cropped, so no toe or heel is cut off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::folder::{Table, assemble, duplicate};
use super::{Dataset, Fit, Progress};
use crate::{Error, Result};

/// The metadata file, relative to DIR.
pub const META: &str = "ut-zap50k-data/meta-data.csv";
/// The image directories, relative to DIR, in order of preference.
pub const IMAGE_DIRS: [&str; 2] = ["ut-zap50k-images-square", "ut-zap50k-images"];
/// The paper's four tasks.
pub const PAPER_TASKS: [&str; 4] = ["category", "gender", "heel_height", "closure"];

/// `HeelHeight` → `heel_height`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.trim().chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 && !out.ends_with('_') {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Every file under `dir`, by file name. Where two folders hold the same name,
/// the first path in sorted order wins, whatever order the file system lists them
/// in, so that the data (and its hash split) do not depend on the disk.
fn files_under(dir: &Path, out: &mut HashMap<String, PathBuf>) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.into(),
        source,
    };
    let mut paths = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|entry| Ok(entry.map_err(io)?.path()))
        .collect::<Result<Vec<_>>>()?;
    paths.sort();
    for path in paths {
        if path.is_dir() {
            files_under(&path, out)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            out.entry(name.to_string()).or_insert(path);
        }
    }
    Ok(())
}

/// Loads UT-Zappos50K from `dir` at `size`; `limit` keeps the first N shoes that
/// have an image.
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
    let meta = dir.join(META);
    let text = super::read_text(&meta)?;
    let Some(images) = IMAGE_DIRS.iter().map(|d| dir.join(d)).find(|d| d.is_dir()) else {
        return Err(Error::Config(format!(
            "{dir:?} has neither {} nor {}: unpack ut-zap50k-images-square.zip there",
            IMAGE_DIRS[0], IMAGE_DIRS[1]
        )));
    };
    let mut by_name = HashMap::new();
    files_under(&images, &mut by_name)?;

    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let malformed = |line: usize, msg: String| Error::Malformed {
        path: meta.clone(),
        line,
        msg,
    };
    let header = reader
        .headers()
        .map_err(|e| malformed(1, format!("cannot read the header: {e}")))?
        .clone();
    if header.get(0) != Some("CID") {
        return Err(malformed(
            1,
            format!(
                "the first column is {:?}, not CID: is this UT-Zappos50K's meta-data.csv?",
                header.get(0).unwrap_or_default()
            ),
        ));
    }
    let attributes: Vec<String> = header.iter().skip(1).map(snake).collect();
    modkit_models::tasks::check_header(&attributes).map_err(|msg| malformed(1, msg))?;
    let mut rows = Vec::new();
    let mut seen = HashMap::new();
    let (mut read, mut without_image) = (0usize, 0usize);
    for (i, record) in reader.records().enumerate() {
        if limit.is_some_and(|n| rows.len() >= n) {
            break;
        }
        let record = record.map_err(|e| malformed(i + 2, e.to_string()))?;
        read += 1;
        let cid = record.get(0).unwrap_or_default();
        let Some(path) = by_name.get(&format!("{}.jpg", cid.replace('-', "."))) else {
            without_image += 1;
            continue;
        };
        let file = path
            .strip_prefix(&images)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let values = (1..header.len())
            .map(|c| {
                record
                    .get(c)
                    .filter(|v| !v.is_empty() && !v.contains(';'))
                    .map(str::to_string)
            })
            .collect();
        if let Some(dup) = duplicate(&mut seen, &mut rows, (file, values, None), i + 2) {
            return Err(malformed(
                i + 2,
                dup.replace(" row per image", " row per shoe"),
            ));
        }
    }
    if rows.is_empty() {
        return Err(Error::Config(format!(
            "none of the {without_image} shoes of {meta:?} has an image under {images:?}; check the unpacked images"
        )));
    }
    // The hash is of the relative path, which holds the CID.
    let mut ds = assemble(
        Table { attributes, rows },
        &images,
        size,
        Fit::Pad,
        (70, 10),
        &meta,
        progress,
    )?;
    if without_image > 0 {
        ds.notes.push(format!(
            "{without_image} of the {read} shoes read from {meta:?} have no image under {images:?} and are left out; check the unpacked images"
        ));
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::MISSING;

    /// Header names become task names: each must be one, and none twice.
    #[test]
    fn a_header_that_names_no_valid_task_is_refused() {
        for (header, want) in [
            ("CID,Mat.erial,Gender", "invalid task name \"mat.erial\""),
            ("CID,HeelHeight,heel_height", "names \"heel_height\" twice"),
        ] {
            let dir = tempfile::tempdir().expect("tmp");
            let shoes = dir.path().join("ut-zap50k-images/Boots");
            std::fs::create_dir_all(&shoes).expect("dirs");
            std::fs::create_dir_all(dir.path().join("ut-zap50k-data")).expect("dirs");
            image::RgbImage::new(4, 4)
                .save(shoes.join("100.1.jpg"))
                .expect("jpg");
            std::fs::write(dir.path().join(META), format!("{header}\n100-1,a,b\n")).expect("meta");
            let err = load(dir.path(), 12, None).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("line 1"),
                "{header}: {err}"
            );
        }
    }

    #[test]
    fn names_are_snake_case() {
        assert_eq!(snake("HeelHeight"), "heel_height");
        assert_eq!(snake("ToeStyle"), "toe_style");
        assert_eq!(snake("SubCategory"), "sub_category");
        assert_eq!(snake("Gender"), "gender");
    }

    /// One image name in two folders: the first path in sorted order, whatever
    /// order the directory lists them in.
    #[test]
    fn a_name_in_two_folders_resolves_to_the_first_sorted_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let images = dir.path().join("ut-zap50k-images");
        for sub in ["Shoes/Oxford", "Boots/Ankle", "Sandals/Flat"] {
            std::fs::create_dir_all(images.join(sub)).expect("dirs");
            std::fs::write(images.join(sub).join("100.1.jpg"), sub).expect("file");
        }
        let mut found = HashMap::new();
        files_under(&images, &mut found).expect("walk");
        assert_eq!(found["100.1.jpg"], images.join("Boots/Ankle/100.1.jpg"));
    }

    #[test]
    fn loads_the_layout_with_padding_and_unknowns() {
        let dir = tempfile::tempdir().expect("tmp");
        let shoes = dir.path().join("ut-zap50k-images/Boots/Ankle/Brand");
        std::fs::create_dir_all(&shoes).expect("dirs");
        std::fs::create_dir_all(dir.path().join("ut-zap50k-data")).expect("dirs");
        // 12 wide, 6 tall, black: padded with white above and below.
        for cid in ["100-1", "100-2", "200-7"] {
            image::RgbImage::from_pixel(12, 6, image::Rgb([0, 0, 0]))
                .save(shoes.join(format!("{}.jpg", cid.replace('-', "."))))
                .expect("jpg");
        }
        std::fs::write(
            dir.path().join(META),
            "CID,Category,HeelHeight,Closure,Gender\n\
             100-1,Boots,High heel,Zipper,Women\n\
             100-2,Shoes,,Buckle;Zipper,Men\n\
             200-7,Boots,Flat,Lace up,\"Women\"\n\
             300-1,Shoes,Flat,Lace up,Men\n",
        )
        .expect("meta");
        let ds = load(dir.path(), 12, None).expect("load");
        assert_eq!(
            ds.attributes,
            ["category", "heel_height", "closure", "gender"]
        );
        assert_eq!(ds.len(), 3, "300-1 has no image");
        assert_eq!(ds.notes.len(), 1, "{:?}", ds.notes);
        assert!(
            ds.notes[0].starts_with("1 of the 4 shoes read from"),
            "{}",
            ds.notes[0]
        );
        assert_eq!(ds.files[0], "Boots/Ankle/Brand/100.1.jpg");
        assert_eq!(ds.classes[0], ["Boots", "Shoes"]);
        assert_eq!(ds.class(1, 1), MISSING, "no heel height");
        assert_eq!(ds.class(1, 2), MISSING, "two closures");
        assert_eq!(ds.classes[2], ["Lace up", "Zipper"]);
        // Row 0 is white (padding), row 6 black (the shoe); JPEG rounds a little.
        let img = ds.image(0);
        assert!(
            img[0] > 240 && img[6 * 12 * 3] < 20,
            "{} {}",
            img[0],
            img[6 * 12 * 3]
        );
        assert_eq!(load(dir.path(), 12, Some(1)).expect("limit").len(), 1);
        // A shoe listed again with another gender: refused, naming the line.
        let meta = std::fs::read_to_string(dir.path().join(META)).expect("meta");
        std::fs::write(
            dir.path().join(META),
            format!("{meta}100-1,Boots,High heel,Zipper,Men\n"),
        )
        .expect("meta");
        let err = load(dir.path(), 12, None).unwrap_err().to_string();
        assert!(
            err.contains("line 6") && err.contains("one row per shoe"),
            "{err}"
        );

        std::fs::write(dir.path().join(META), "id,Category\n1-1,Boots\n").expect("meta");
        let err = load(dir.path(), 12, None)
            .expect_err("not zappos")
            .to_string();
        assert!(err.contains("not CID"), "{err}");
        std::fs::write(dir.path().join(META), "CID,Category\n9-9,Boots\n").expect("meta");
        let err = load(dir.path(), 12, None)
            .expect_err("no images")
            .to_string();
        assert!(err.contains("none of the 1 shoes"), "{err}");
    }
}

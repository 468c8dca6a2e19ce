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
//!   part of the dataset: CSN publishes them as triplet lists beside its code
//!   (its `get_data.py` unpacks `tripletlists/` beside the images). Where
//!   `DIR/tripletlists/` exists, each shoe takes the split of the lists it
//!   appears in and shoes in none are left out ([`csn_splits`]); the triplets
//!   themselves are still sampled from the labels, as the paper does ("we follow
//!   the same … splits as Veit et al. to sample triplets"). Without the lists each
//!   shoe's split is drawn from a hash of its CID in the same proportions.
//! * The square images are used as they are; the original 136×102 ones are padded
//!   with white to a square, not cropped, so no toe or heel is cut off.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::folder::{Table, assemble, duplicate};
use super::{Dataset, Fit, Progress, Split};
use crate::{Error, Result};

/// The metadata file, relative to DIR.
pub const META: &str = "ut-zap50k-data/meta-data.csv";
/// The image directories, relative to DIR, in order of preference.
pub const IMAGE_DIRS: [&str; 2] = ["ut-zap50k-images-square", "ut-zap50k-images"];
/// The paper's four tasks.
pub const PAPER_TASKS: [&str; 4] = ["category", "gender", "heel_height", "closure"];
/// CSN's triplet lists, relative to DIR: `{condition}_tripletlist_{split}.txt`.
pub const CSN_LISTS: &str = "tripletlists";
/// CSN's image list, in DIR or in [`CSN_LISTS`]: one path per line (relative to
/// the images directory; despite its name, CSN's loader reads it as lines), and a
/// triplet line `a b c` holds three line numbers into it, counted from 0.
pub const CSN_FILENAMES: &str = "filenames.json";
/// CSN's four conditions, as its list files name them.
pub const CSN_CONDITIONS: [&str; 4] = ["class", "closure", "gender", "heel"];

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

/// The split CSN's triplet lists put each image in, by file name (the last part
/// of its path).
#[derive(Debug, Clone)]
pub struct CsnSplits {
    pub by_name: HashMap<String, Split>,
    /// Images that the lists of more than one split name; each is kept in the
    /// latest of train, val and test, so that no test image is trained on.
    pub conflicted: HashSet<String>,
}

/// The last part of a path as CSN's list or the loader writes it (`/` or `\\`).
fn file_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or_default()
}

/// The image names of CSN's image list: its lines, or (should a copy have been
/// rewritten as real JSON) the strings of a JSON array.
fn csn_names(path: &Path) -> Result<Vec<String>> {
    let text = super::read_text(path)?;
    let names: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| Error::Malformed {
            path: path.into(),
            line: e.line(),
            msg: format!("starts as a JSON array but is not one of strings ({e})"),
        })?
    } else {
        text.lines().map(|l| l.trim().to_string()).collect()
    };
    Ok(names
        .into_iter()
        .map(|n| file_name(&n).to_string())
        .collect())
}

/// Whether `dir` has CSN's [`CSN_LISTS`], and so is split by them: known
/// before any image loads.
pub fn has_csn_lists(dir: &Path) -> bool {
    dir.join(CSN_LISTS).is_dir()
}

/// Reads CSN's splits from `dir`'s [`CSN_LISTS`], or `None` where `dir` has none.
/// All twelve lists (four conditions × train, val, test) must be there.
pub fn csn_splits(dir: &Path) -> Result<Option<CsnSplits>> {
    if !has_csn_lists(dir) {
        return Ok(None);
    }
    let lists = dir.join(CSN_LISTS);
    let candidates = [dir.join(CSN_FILENAMES), lists.join(CSN_FILENAMES)];
    let Some(names_path) = candidates.iter().find(|p| p.is_file()) else {
        return Err(Error::Config(format!(
            "{lists:?} is there, for CSN's triplet lists, but neither {:?} nor {:?} exists: put CSN's {CSN_FILENAMES} (the image list its triplets number) in one of them, or move {CSN_LISTS} away to split by hash",
            candidates[0], candidates[1]
        )));
    };
    let names = csn_names(names_path)?;
    const SPLITS: [Split; 3] = [Split::Train, Split::Val, Split::Test];
    // Per image number, the splits whose lists name it, one bit each.
    let mut seen = vec![0u8; names.len()];
    for (bit, split) in SPLITS.into_iter().enumerate() {
        for condition in CSN_CONDITIONS {
            let path = lists.join(format!("{condition}_tripletlist_{split}.txt"));
            if !path.is_file() {
                return Err(Error::Config(format!(
                    "{path:?} is missing: CSN's lists are 12 files, {{class,closure,gender,heel}}_tripletlist_{{train,val,test}}.txt; unpack all of them, or move {CSN_LISTS} away to split by hash"
                )));
            }
            let text = super::read_text(&path)?;
            for (l, line) in text.lines().enumerate() {
                let malformed = |msg: String| Error::Malformed {
                    path: path.clone(),
                    line: l + 1,
                    msg,
                };
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.is_empty() {
                    continue;
                }
                if fields.len() != 3 {
                    return Err(malformed(format!(
                        "has {} fields, not the 3 image numbers of a triplet (`a b c`)",
                        fields.len()
                    )));
                }
                for field in fields {
                    let i: usize = field.parse().map_err(|_| {
                        malformed(format!("{field:?} is not an image number (0, 1, 2, …)"))
                    })?;
                    let Some(bits) = seen.get_mut(i) else {
                        return Err(malformed(format!(
                            "image number {i} is past the {} images of {names_path:?}: is that CSN's list for these triplets?",
                            names.len()
                        )));
                    };
                    *bits |= 1 << bit;
                }
            }
        }
    }
    let mut by_bits: HashMap<String, u8> = HashMap::new();
    for (name, bits) in names.into_iter().zip(seen) {
        if bits != 0 {
            *by_bits.entry(name).or_default() |= bits;
        }
    }
    let conflicted = by_bits
        .iter()
        .filter(|(_, bits)| bits.count_ones() > 1)
        .map(|(name, _)| name.clone())
        .collect();
    // The latest split wins (the highest bit): a test image is never trained on.
    let by_name = by_bits
        .into_iter()
        .map(|(name, bits)| (name, SPLITS[bits.ilog2() as usize]))
        .collect();
    Ok(Some(CsnSplits {
        by_name,
        conflicted,
    }))
}

/// How many of `files` (paths) have a file name in `conflicted`.
fn rows_conflicted(files: &[String], conflicted: &HashSet<String>) -> usize {
    files
        .iter()
        .filter(|f| conflicted.contains(file_name(f)))
        .count()
}

/// Loads UT-Zappos50K from `dir` at `size`; `limit` keeps the first N shoes that
/// have an image (and, with CSN's lists, are in one).
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
    let csn = csn_splits(dir)?;

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
    let (mut read, mut without_image, mut unlisted) = (0usize, 0usize, 0usize);
    for (i, record) in reader.records().enumerate() {
        if limit.is_some_and(|n| rows.len() >= n) {
            break;
        }
        let record = record.map_err(|e| malformed(i + 2, e.to_string()))?;
        read += 1;
        let cid = record.get(0).unwrap_or_default();
        let name = format!("{}.jpg", cid.replace('-', "."));
        let Some(path) = by_name.get(&name) else {
            without_image += 1;
            continue;
        };
        let split = match &csn {
            None => None,
            Some(csn) => match csn.by_name.get(&name) {
                Some(&split) => Some(split),
                None => {
                    unlisted += 1;
                    continue;
                }
            },
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
        if let Some(dup) = duplicate(&mut seen, &mut rows, (file, values, split), i + 2) {
            return Err(malformed(
                i + 2,
                dup.replace(" row per image", " row per shoe"),
            ));
        }
    }
    if rows.is_empty() {
        let why = if unlisted > 0 {
            format!(
                "none of the {} shoes of {meta:?} that have an image is in CSN's lists in {:?}; check that they are this dataset's, or move them away to split by hash",
                read - without_image,
                dir.join(CSN_LISTS)
            )
        } else {
            format!(
                "none of the {without_image} shoes of {meta:?} has an image under {images:?}; check the unpacked images"
            )
        };
        return Err(Error::Config(why));
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
    ds.csn_splits = Some(csn.is_some());
    if let Some(csn) = &csn {
        // Over the shoes kept (a shoe listed twice alike is one row).
        let conflicts = rows_conflicted(&ds.files, &csn.conflicted);
        if unlisted > 0 {
            ds.notes.push(format!(
                "{unlisted} of the {read} shoes read from {meta:?} are in none of CSN's lists in {:?} and are left out",
                dir.join(CSN_LISTS)
            ));
        }
        if conflicts > 0 {
            ds.notes.push(format!(
                "{conflicts} of the shoes loaded are in the lists of more than one split in {:?}; each is kept in the latest of train, val, test",
                dir.join(CSN_LISTS)
            ));
        }
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

    /// Writes CSN's twelve lists into `dir`: `train`, `val` and `test` hold
    /// triplets of image numbers; every condition gets the same lines.
    fn csn_lists(dir: &Path, names: &[&str], triplets: [&[[usize; 3]]; 3]) {
        let lists = dir.join(CSN_LISTS);
        std::fs::create_dir_all(&lists).expect("dirs");
        std::fs::write(dir.join(CSN_FILENAMES), names.join("\n") + "\n").expect("names");
        for (split, lines) in ["train", "val", "test"].into_iter().zip(triplets) {
            let text: String = lines
                .iter()
                .map(|[a, b, c]| format!("{a} {b} {c}\n"))
                .collect();
            for condition in CSN_CONDITIONS {
                let path = lists.join(format!("{condition}_tripletlist_{split}.txt"));
                std::fs::write(path, &text).expect("list");
            }
        }
    }

    #[test]
    fn csn_lists_decide_the_splits() {
        let dir = tempfile::tempdir().expect("tmp");
        let shoes = dir.path().join("ut-zap50k-images/Boots/Ankle/Brand");
        std::fs::create_dir_all(&shoes).expect("dirs");
        std::fs::create_dir_all(dir.path().join("ut-zap50k-data")).expect("dirs");
        let mut meta = String::from("CID,Category,Gender\n");
        for i in 0..8 {
            image::RgbImage::new(6, 6)
                .save(shoes.join(format!("10{i}.1.jpg")))
                .expect("jpg");
            meta.push_str(&format!("10{i}-1,{},Men\n", ["Boots", "Shoes"][i % 2]));
        }
        std::fs::write(dir.path().join(META), meta).expect("meta");
        // CSN's paths (other folders than ours: only the file name counts), one
        // image without a shoe (number 8), and shoe 101 in no list.
        let names: Vec<String> = (0..9)
            .map(|i| format!("Boots/Mid-Calf/A. Testoni/10{i}.1.jpg"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        // 104 is in train's and test's lists: test wins.
        let train: &[[usize; 3]] = &[[0, 7, 2], [2, 3, 4]];
        csn_lists(dir.path(), &names, [train, &[[5, 8, 5]], &[[6, 4, 6]]]);
        let ds = load(dir.path(), 6, None).expect("load");
        let split_of = |cid: &str| {
            let i = ds.files.iter().position(|f| f.ends_with(cid)).expect(cid);
            ds.splits[i]
        };
        assert_eq!(ds.len(), 7, "101 is in no list: {:?}", ds.files);
        for (cid, split) in [
            ("100.1.jpg", Split::Train),
            ("103.1.jpg", Split::Train),
            ("107.1.jpg", Split::Train),
            ("104.1.jpg", Split::Test),
            ("105.1.jpg", Split::Val),
            ("106.1.jpg", Split::Test),
        ] {
            assert_eq!(split_of(cid), split, "{cid}");
        }
        assert_eq!(ds.notes.len(), 2, "{:?}", ds.notes);
        assert!(
            ds.notes[0].starts_with("1 of the 8 shoes"),
            "{}",
            ds.notes[0]
        );
        assert!(
            ds.notes[0].contains("none of CSN's lists"),
            "{}",
            ds.notes[0]
        );
        assert!(
            ds.notes[1]
                .starts_with("1 of the shoes loaded are in the lists of more than one split"),
            "{}",
            ds.notes[1]
        );
        assert_eq!(ds.csn_splits, Some(true));
        // --limit counts listed shoes only (101, the second, is not).
        assert_eq!(load(dir.path(), 6, Some(7)).expect("limit").len(), 7);

        // The same names as a JSON array read alike.
        let json = serde_json::to_string(&names).expect("json");
        std::fs::write(dir.path().join(CSN_FILENAMES), &json).expect("json");
        assert_eq!(
            load(dir.path(), 6, None).expect("json list").splits,
            ds.splits
        );

        // Bad lists name the file, the line and what to do.
        let list = |split: &str| {
            dir.path()
                .join(CSN_LISTS)
                .join(format!("heel_tripletlist_{split}.txt"))
        };
        for (text, want) in [
            ("0 1 2\n0 1\n", "line 2: has 2 fields, not the 3"),
            ("0 1 x\n", "line 1: \"x\" is not an image number"),
            ("0 1 9\n", "image number 9 is past the 9 images"),
        ] {
            std::fs::write(list("val"), text).expect("list");
            let err = load(dir.path(), 6, None).unwrap_err().to_string();
            assert!(
                err.contains("heel_tripletlist_val.txt") && err.contains(want),
                "{err}"
            );
        }
        std::fs::remove_file(list("val")).expect("rm");
        let err = load(dir.path(), 6, None).unwrap_err().to_string();
        assert!(
            err.contains("heel_tripletlist_val.txt\" is missing"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join(CSN_FILENAMES)).expect("rm");
        let err = load(dir.path(), 6, None).unwrap_err().to_string();
        assert!(err.contains("put CSN's filenames.json"), "{err}");

        // Lists of another dataset: no shoe is in them.
        let other: Vec<String> = (0..9).map(|i| format!("x/9{i}.jpg")).collect();
        let other: Vec<&str> = other.iter().map(String::as_str).collect();
        csn_lists(dir.path(), &other, [train, &[[5, 8, 5]], &[[6, 4, 6]]]);
        let err = load(dir.path(), 6, None).unwrap_err().to_string();
        assert!(
            err.contains("none of the 8 shoes") && err.contains("CSN's lists"),
            "{err}"
        );

        // Without the lists: the hash split, every shoe.
        std::fs::remove_dir_all(dir.path().join(CSN_LISTS)).expect("rm");
        let hashed = load(dir.path(), 6, None).expect("hash");
        assert_eq!((hashed.len(), hashed.csn_splits), (8, Some(false)));
    }
}

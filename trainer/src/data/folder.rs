//! Any folder of images with a CSV of labels (`--data folder:DIR`).
//!
//! ```text
//! DIR/
//! ├─ labels.csv        file,<attribute>,…[,split]
//! │                    shoes/001.jpg,boots,women,,train
//! └─ shoes/001.jpg …   (paths relative to DIR; PNG or JPEG)
//! ```
//!
//! * Each attribute column is a task. Its values are any text: two that spell a
//!   binary attribute (`0`/`1`, `-1`/`1`, `false`/`true`, `no`/`yes`) make a
//!   binary task, anything else one class per distinct value. An empty value is
//!   unknown: that image takes no part in that task's triplets.
//! * The optional `split` column holds `train`, `val` or `test`; without it an
//!   image's split is drawn from a hash of its path, 80/10/10, stable however the
//!   rows are ordered or `--limit`ed.
//! * Images are centre-cropped to a square and resized, as CelebA's are.

use std::path::{Path, PathBuf};

use super::{Dataset, Fit, MISSING, Progress, Split, encode_column, load_images, split_by_hash};
use crate::{Error, Result};

/// The labels file inside the folder.
pub const LABELS: &str = "labels.csv";

fn malformed(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Malformed {
        path: path.into(),
        line,
        msg: msg.into(),
    }
}

/// Labels read from a CSV: the attribute names, then per row the file, its values
/// (`None`: empty) and its split, if given.
pub(crate) struct Table {
    pub attributes: Vec<String>,
    pub rows: Vec<Row>,
}

/// A file, its attributes' values (`None`: unknown) and its split, if given.
pub(crate) type Row = (String, Vec<Option<String>>, Option<Split>);

/// Adds `row` (from line `line`) to `rows` unless its file is there already:
/// listed again alike, it is one image; with other values or split, it is
/// ambiguous and comes back as the error's message. `seen` maps each file to its
/// line and row.
pub(crate) fn duplicate(
    seen: &mut std::collections::HashMap<String, (usize, usize)>,
    rows: &mut Vec<Row>,
    row: Row,
    line: usize,
) -> Option<String> {
    if let Some(&(first, i)) = seen.get(&row.0) {
        return (rows[i] != row).then(|| {
            format!(
                "{:?} is listed again, with other values than on line {first}; keep one row per image",
                row.0
            )
        });
    }
    seen.insert(row.0.clone(), (line, rows.len()));
    rows.push(row);
    None
}

/// Reads `labels.csv` text: a header whose first column names the files and an
/// optional `split` column; `limit` keeps the first N rows.
pub(crate) fn parse_labels(text: &str, path: &Path, limit: Option<usize>) -> Result<Table> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| malformed(path, 1, format!("cannot read the header: {e}")))?
        .clone();
    let names: Vec<String> = header.iter().map(|h| h.to_ascii_lowercase()).collect();
    let split_col = names.iter().position(|n| n == "split");
    if names.iter().filter(|n| *n == "split").count() > 1 {
        return Err(malformed(
            path,
            1,
            "the header names \"split\" twice: keep one split column",
        ));
    }
    let attr_cols: Vec<usize> = (1..names.len()).filter(|&c| Some(c) != split_col).collect();
    if attr_cols.is_empty() {
        return Err(malformed(
            path,
            1,
            "the header names no attribute: write `file,<attribute>,…[,split]`",
        ));
    }
    let attributes: Vec<String> = attr_cols.iter().map(|&c| names[c].clone()).collect();
    modkit_models::tasks::check_header(&attributes).map_err(|msg| malformed(path, 1, msg))?;
    let mut rows: Vec<Row> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, record) in reader.records().enumerate() {
        if limit.is_some_and(|n| rows.len() >= n) {
            break;
        }
        let line = i + 2;
        let record = record.map_err(|e| malformed(path, line, e.to_string()))?;
        let file = record.get(0).unwrap_or_default();
        if file.is_empty() {
            return Err(malformed(path, line, "no file name in the first column"));
        }
        let values = attr_cols
            .iter()
            .map(|&c| record.get(c).filter(|v| !v.is_empty()).map(str::to_string))
            .collect();
        let split = match split_col.and_then(|c| record.get(c)) {
            None | Some("") => None,
            Some("train") => Some(Split::Train),
            Some("val") => Some(Split::Val),
            Some("test") => Some(Split::Test),
            Some(other) => {
                return Err(malformed(
                    path,
                    line,
                    format!("split {other:?} is not train, val or test"),
                ));
            }
        };
        let row = (file.to_string(), values, split);
        if let Some(dup) = duplicate(&mut seen, &mut rows, row, line) {
            return Err(malformed(path, line, dup));
        }
    }
    Ok(Table { attributes, rows })
}

/// The dataset of a labels table whose files are under `root`, squared by `fit`
/// at `size`; images without a split go `train`% / `val`% / rest by their hash.
/// Calls `progress` as the images are decoded.
pub(crate) fn assemble(
    table: Table,
    root: &Path,
    size: usize,
    fit: Fit,
    (train, val): (u64, u64),
    labels_path: &Path,
    progress: Progress,
) -> Result<Dataset> {
    let n = table.rows.len();
    Dataset::check_fits(n, size, &labels_path.display().to_string(), "--limit")?;
    let mut labels = vec![0u16; n * table.attributes.len()];
    let mut classes = Vec::new();
    for (a, name) in table.attributes.iter().enumerate() {
        let column: Vec<Option<&str>> = table.rows.iter().map(|r| r.1[a].as_deref()).collect();
        let (l, names) = encode_column(&column).map_err(|count| {
            Error::Config(format!(
                "{labels_path:?}: attribute {name:?} has {count} classes, more than the {} a task can hold; merge classes or drop the column",
                MISSING - 1
            ))
        })?;
        for (i, c) in l.into_iter().enumerate() {
            labels[i * table.attributes.len() + a] = c;
        }
        classes.push(names);
    }
    let paths: Vec<PathBuf> = table.rows.iter().map(|(f, _, _)| root.join(f)).collect();
    let pixels = load_images(&paths, size, fit, progress)?;
    Ok(Dataset {
        splits: table
            .rows
            .iter()
            .map(|(f, _, s)| s.unwrap_or_else(|| split_by_hash(f, train, val)))
            .collect(),
        files: table.rows.into_iter().map(|(f, _, _)| f).collect(),
        attributes: table.attributes,
        labels,
        classes,
        image_size: size,
        fit,
        pixels,
        notes: Vec::new(),
        csn_splits: None,
    })
}

/// Loads `DIR/labels.csv` and its images at `size`; `limit` keeps the first N rows.
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
    let path = dir.join(LABELS);
    let text = super::read_text(&path)?;
    let table = parse_labels(&text, &path, limit)?;
    assemble(table, dir, size, Fit::Crop, (80, 10), &path, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_with_classes_unknowns_and_splits() {
        let text = "File,Type,Smiling,split\na.png,boots,1,train\nb.png,shoes,-1,test\nc.png,,1,\n";
        let t = parse_labels(text, Path::new("labels.csv"), None).expect("parse");
        assert_eq!(t.attributes, ["type", "smiling"]);
        assert_eq!(t.rows.len(), 3);
        assert_eq!(t.rows[0].2, Some(Split::Train));
        assert_eq!(t.rows[2].1[0], None);
        assert_eq!(t.rows[2].2, None);
        let t = parse_labels(text, Path::new("labels.csv"), Some(2)).expect("limit");
        assert_eq!(t.rows.len(), 2);
        // A file listed twice: alike, one image; otherwise refused with its line.
        let twice = format!("{text}a.png,boots,1,train\n");
        let t = parse_labels(&twice, Path::new("labels.csv"), None).expect("alike");
        assert_eq!(t.rows.len(), 3);
        let other = format!("{text}a.png,boots,-1,train\n");
        let Err(err) = parse_labels(&other, Path::new("labels.csv"), None) else {
            panic!("refused")
        };
        let err = err.to_string();
        assert!(
            err.contains("line 5: \"a.png\" is listed again, with other values than on line 2"),
            "{err}"
        );

        let dir = tempfile::tempdir().expect("tmp");
        for (f, shade) in [("a.png", 10u8), ("b.png", 120), ("c.png", 250)] {
            image::RgbImage::from_pixel(8, 6, image::Rgb([shade, 0, 0]))
                .save(dir.path().join(f))
                .expect("png");
        }
        let t = parse_labels(text, Path::new("labels.csv"), None).expect("parse");
        let ds = assemble(
            t,
            dir.path(),
            4,
            Fit::Crop,
            (80, 10),
            Path::new("labels.csv"),
            &|_, _| {},
        )
        .expect("ds");
        assert_eq!(ds.classes[0], ["boots", "shoes"]);
        assert!(ds.classes[1].is_empty(), "smiling is binary");
        assert_eq!(
            [ds.class(0, 0), ds.class(1, 0), ds.class(2, 0)],
            [0, 1, MISSING]
        );
        assert!(ds.label(0, 1) && !ds.label(1, 1));
        assert_eq!(ds.image(2)[..3], [250, 0, 0]);
        assert_eq!(ds.splits[1], Split::Test);
    }

    #[test]
    fn a_repeated_column_is_named() {
        let text = "file,a,split,Split\na.png,1,train,test\n";
        let err = parse_labels(text, Path::new("labels.csv"), None).map(|_| ());
        let err = err.expect_err("two split columns").to_string();
        assert!(err.contains("names \"split\" twice"), "{err}");
        let text = "file,smiling,Smiling\na.png,1,0\n";
        let Err(err) = parse_labels(text, Path::new("labels.csv"), None) else {
            panic!("a repeated column parsed");
        };
        let err = err.to_string();
        assert!(
            err.contains("labels.csv") && err.contains("names \"smiling\" twice"),
            "{err}"
        );
    }

    #[test]
    fn too_many_classes_name_the_file_and_the_attribute() {
        let rows = (0..usize::from(MISSING))
            .map(|i| (format!("{i}.png"), vec![Some(i.to_string())], None))
            .collect();
        let table = Table {
            attributes: vec!["id".into()],
            rows,
        };
        let err = assemble(
            table,
            Path::new("/none"),
            4,
            Fit::Crop,
            (80, 10),
            Path::new("labels.csv"),
            &|_, _| {},
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.starts_with("\"labels.csv\": attribute \"id\" has 65535 classes")
                && !err.contains("line 0"),
            "{err}"
        );
    }

    #[test]
    fn bad_labels_name_the_line() {
        let p = Path::new("labels.csv");
        let err = |text: &str| {
            parse_labels(text, p, None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err("file\na.png\n").contains("names no attribute"));
        assert!(err("file,a,split\nx.png,1,training\n").contains("line 2: split \"training\""));
        assert!(err("file,a\n,1\n").contains("line 2: no file name"));
        assert!(err("file,heel height\nx.png,1\n").contains("line 1"));
    }
}

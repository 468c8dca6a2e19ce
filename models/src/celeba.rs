//! CelebA's attribute file, the one piece of CelebA's layout that more than one
//! crate reads (the trainer's loader, the runtime's gallery labels).
//!
//! ```text
//! DIR/
//! ├─ img_align_celeba/000001.jpg …   (any format the `image` crate reads)
//! ├─ Anno/list_attr_celeba.txt       line 1: image count
//! │                                  line 2: attribute names
//! │                                  then:   "000001.jpg -1  1 …" (±1 per attribute)
//! └─ Eval/list_eval_partition.txt    "000001.jpg 0"  (0 train, 1 val, 2 test)
//! ```
//!
//! The reader takes any attribute header (not only CelebA's 40 names), lower-cases
//! the names, and rejects malformed lines with their line number.

use std::path::Path;

use crate::{Error, Result};

/// The image folder inside a CelebA directory.
pub const IMAGES: &str = "img_align_celeba";
/// The attribute file inside a CelebA directory.
pub const ATTR_FILE: &str = "Anno/list_attr_celeba.txt";
/// The partition file inside a CelebA directory.
pub const PARTITION_FILE: &str = "Eval/list_eval_partition.txt";

/// The parsed attribute file.
#[derive(Debug, Clone, PartialEq)]
pub struct AttrTable {
    /// Lower-case attribute names.
    pub attributes: Vec<String>,
    /// `(file, labels)` per image.
    pub rows: Vec<(String, Vec<bool>)>,
}

fn malformed(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Malformed {
        path: path.into(),
        line,
        msg: msg.into(),
    }
}

/// Parses `list_attr_celeba.txt` text; `path` names the file in errors.
pub fn parse_attributes(text: &str, path: &Path) -> Result<AttrTable> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let (_, count) = lines
        .next()
        .ok_or_else(|| malformed(path, 1, "empty file"))?;
    let count: usize = count.trim().parse().map_err(|_| {
        malformed(
            path,
            1,
            format!("expected the image count, found {count:?}"),
        )
    })?;
    let (_, header) = lines
        .next()
        .ok_or_else(|| malformed(path, 2, "missing the attribute-name header"))?;
    let attributes: Vec<String> = header
        .split_whitespace()
        .map(|s| s.to_lowercase())
        .collect();
    if attributes.is_empty() {
        return Err(malformed(path, 2, "the attribute-name header is empty"));
    }
    crate::tasks::check_header(&attributes).map_err(|msg| malformed(path, 2, msg))?;
    // Not `count` rows up front: the header's count is checked against the rows.
    let mut rows: Vec<(String, Vec<bool>)> = Vec::new();
    let mut listed = 0;
    // Each file's line: a file listed twice alike is one image; listed with
    // other values, the file is ambiguous.
    let mut seen: std::collections::HashMap<String, (usize, usize)> = Default::default();
    for (no, line) in lines {
        let mut fields = line.split_whitespace();
        let Some(file) = fields.next() else { continue };
        let labels = fields
            .map(|v| match v {
                "1" => Ok(true),
                "-1" | "0" => Ok(false),
                _ => Err(malformed(
                    path,
                    no,
                    format!("value {v:?} is not 1 (with) or -1 (without; 0 is read as -1 too)"),
                )),
            })
            .collect::<Result<Vec<bool>>>()?;
        if labels.len() != attributes.len() {
            return Err(malformed(
                path,
                no,
                format!(
                    "{} values for {} attributes",
                    labels.len(),
                    attributes.len()
                ),
            ));
        }
        listed += 1;
        if let Some(&(first, row)) = seen.get(file) {
            if rows[row].1 != labels {
                return Err(malformed(
                    path,
                    no,
                    format!(
                        "{file:?} is listed again, with other values than on line {first}; keep one row per image"
                    ),
                ));
            }
            continue;
        }
        seen.insert(file.to_string(), (no, rows.len()));
        rows.push((file.to_string(), labels));
    }
    if listed != count {
        return Err(malformed(
            path,
            1,
            format!("the header says {count} images, the file lists {listed}"),
        ));
    }
    Ok(AttrTable { attributes, rows })
}

impl AttrTable {
    /// Reads and parses the attribute file at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        parse_attributes(&crate::read_text(path)?, path)
    }

    /// The column of `attribute` (case-insensitive), if the table has it.
    pub fn column(&self, attribute: &str) -> Option<usize> {
        let attribute = attribute.to_lowercase();
        self.attributes.iter().position(|a| *a == attribute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_any_header_and_case() {
        let t = parse_attributes(
            "2\nHeel_Height Closure\na.jpg 1 -1\nb.jpg -1 1\n",
            Path::new("x"),
        )
        .expect("parse");
        assert_eq!(t.attributes, ["heel_height", "closure"]);
        assert_eq!(t.rows[1], ("b.jpg".to_string(), vec![false, true]));
    }

    #[test]
    fn a_row_listed_twice_alike_is_one_image() {
        let t = parse_attributes("3\nA\na.jpg 1\nb.jpg -1\na.jpg 1\n", Path::new("attr.txt"))
            .expect("parse");
        assert_eq!(
            t.rows,
            [("a.jpg".into(), vec![true]), ("b.jpg".into(), vec![false])]
        );
    }

    #[test]
    fn rejects_malformed_files_with_line_numbers() {
        let cases = [
            ("", "line 1"),
            ("two\nA B\n", "line 1"),
            ("1\n\n", "line 2"),
            ("1\nA B\na.jpg 1\n", "line 3"),
            ("1\nA B\na.jpg 1 2\n", "line 3"),
            ("2\nA B\na.jpg 1 1\n", "says 2 images"),
            ("1\nA b-c\na.jpg 1 1\n", "line 2"),
            ("1\nA a\na.jpg 1 1\n", "names \"a\" twice"),
            (
                "2\nA\na.jpg 1\na.jpg -1\n",
                "line 4: \"a.jpg\" is listed again, with other values than on line 3",
            ),
            // A count no file could hold: an error, not an allocation.
            (
                "999999999999999999\nA\na.jpg 1\n",
                "says 999999999999999999 images",
            ),
        ];
        for (text, want) in cases {
            let err = parse_attributes(text, Path::new("attr.txt"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("attr.txt"),
                "{text:?}: {err}"
            );
        }
    }
}

//! The training checkpoint: a safetensors file with a JSON header in its metadata.
//!
//! ```text
//! safetensors file
//! ├─ metadata
//! │  ├─ "modkit.format"  = "checkpoint"
//! │  ├─ "modkit.version" = "1"
//! │  └─ "modkit.header"  = JSON CheckpointHeader { spec, variant, tasks, preprocess,
//! │                                                epoch, train_config, metrics }
//! └─ tensors (F32, little endian), named as in [`crate::names`]
//! ```
//!
//! Any safetensors reader can read the weights; [`Checkpoint::load`] also checks the
//! format, the version and that every tensor of the schema is present with its shape.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::SafeTensorError;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::{Error, NetSpec, Preprocess, Result, Variant, names, write_atomic};

/// Metadata key naming the file kind.
pub const FORMAT_KEY: &str = "modkit.format";
/// Metadata key holding the format version.
pub const VERSION_KEY: &str = "modkit.version";
/// Metadata key holding the JSON [`CheckpointHeader`].
pub const HEADER_KEY: &str = "modkit.header";
/// The value of [`FORMAT_KEY`].
pub const FORMAT: &str = "checkpoint";
/// The checkpoint format version this build writes and the newest it reads.
pub const VERSION: u32 = 1;

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    pub spec: NetSpec,
    pub variant: Variant,
    /// Task names; row `t` of every per-task tensor belongs to `tasks[t]`.
    pub tasks: Vec<String>,
    /// How images become input.
    pub preprocess: Preprocess,
    /// Epochs completed.
    pub epoch: usize,
    /// The trainer's configuration, as the trainer wrote it.
    pub train_config: serde_json::Value,
    /// Final (or latest) evaluation metrics, as the trainer wrote them.
    pub metrics: serde_json::Value,
}

/// A dense F32 tensor: row-major `data` of `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl TensorData {
    /// A tensor, checking that `data` fills `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::ShapeMismatch {
                name: format!("<{} values>", data.len()),
                found: vec![data.len()],
                expected: shape,
            });
        }
        Ok(TensorData { shape, data })
    }
}

/// A checkpoint in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub header: CheckpointHeader,
    pub tensors: BTreeMap<String, TensorData>,
}

struct F32View<'a>(&'a TensorData);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let bytes: Vec<u8> = self.0.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.into()
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

impl CheckpointHeader {
    /// A header written before [`Preprocess::fit`](crate::Preprocess) existed
    /// reads as cropping; its UT-Zappos50K runs (`--data zappos:…`) padded.
    fn with_inferred_fit(mut self, json: &str) -> Self {
        let raw: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        let recorded = raw["preprocess"].get("fit").is_some();
        let zappos = self.train_config["data"]
            .as_str()
            .is_some_and(|d| d.starts_with("zappos:"));
        if !recorded && zappos {
            self.preprocess.fit = crate::Fit::Pad;
        }
        self
    }
}

/// What the file is when its first bytes name another kind that users hand to a
/// command wanting a checkpoint: a package, an index, an image.
fn other_kind(bytes: &[u8]) -> Option<&'static str> {
    const KINDS: [(&[u8], &str); 4] = [
        (
            b"MODPACK\0",
            "a modkit package, which `modc compile` makes from a checkpoint",
        ),
        (b"MODIDX\0\0", "a modkit gallery index"),
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
    ];
    KINDS
        .iter()
        .find(|(magic, _)| bytes.starts_with(magic))
        .map(|&(_, what)| what)
}

impl Checkpoint {
    /// Serializes to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_string(&self.header).map_err(|source| Error::Header {
            path: "<memory>".into(),
            source,
        })?;
        let meta = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (VERSION_KEY.to_string(), VERSION.to_string()),
            (HEADER_KEY.to_string(), header),
        ]);
        let views = self.tensors.iter().map(|(k, v)| (k.as_str(), F32View(v)));
        safetensors::serialize(views, Some(meta)).map_err(|source| Error::Safetensors {
            path: "<memory>".into(),
            source,
        })
    }

    /// Writes the checkpoint atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// Reads and validates a checkpoint.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses and validates checkpoint bytes; `path` only names the file in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let st_err = |source| Error::Safetensors {
            path: path.into(),
            source,
        };
        let not_ours = |detail: String| Error::NotACheckpoint {
            path: path.into(),
            detail,
        };
        if let Some(kind) = other_kind(bytes) {
            return Err(not_ours(format!("it is {kind}")));
        }
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| match e {
            // The first 8 bytes, read as the header's length, ask for over 100 MB.
            SafeTensorError::HeaderTooLarge => not_ours("not a safetensors file".into()),
            e => st_err(e),
        })?;
        let st = SafeTensors::deserialize(bytes).map_err(st_err)?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Err(not_ours(format!(
                "no `{FORMAT_KEY}` = \"{FORMAT}\" metadata"
            )));
        }
        let found: u32 = match meta.get(VERSION_KEY) {
            Some(v) => v.parse().ok().filter(|&v| v > 0).ok_or_else(|| {
                not_ours(format!(
                    "its `{VERSION_KEY}` is {v:?}, not a format version"
                ))
            })?,
            None => return Err(not_ours(format!("no `{VERSION_KEY}` metadata"))),
        };
        if found > VERSION {
            return Err(Error::VersionMismatch {
                path: path.into(),
                found,
                supported: VERSION,
            });
        }
        let header_json = meta
            .get(HEADER_KEY)
            .ok_or_else(|| not_ours(format!("no `{HEADER_KEY}` metadata")))?;
        let header: CheckpointHeader =
            serde_json::from_str(header_json).map_err(|source| Error::Header {
                path: path.into(),
                source,
            })?;
        let header = header.with_inferred_fit(header_json);
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                return Err(Error::UnsupportedDtype {
                    name: name.into(),
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(
                name.to_string(),
                TensorData {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        let ckpt = Checkpoint { header, tensors };
        ckpt.validate(path)?;
        Ok(ckpt)
    }

    /// Checks the header's spec and that every schema tensor is present with its shape.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.header.spec.validate()?;
        crate::tasks::check_list(&self.header.tasks)?;
        self.header.preprocess.check()?;
        let h = &self.header;
        for e in names::schema(&h.spec, &h.variant, &h.tasks) {
            let t = self
                .tensors
                .get(&e.name)
                .ok_or_else(|| Error::MissingTensor {
                    path: path.into(),
                    name: e.name.clone(),
                })?;
            if t.shape != e.shape {
                return Err(Error::ShapeMismatch {
                    name: e.name,
                    found: t.shape.clone(),
                    expected: e.shape,
                });
            }
        }
        if let Some(name) = self.non_finite() {
            return Err(Error::NonFinite {
                path: path.into(),
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// The first tensor (by name, so the same every time) holding a NaN or an
    /// infinity: a diverged run's.
    pub fn non_finite(&self) -> Option<&str> {
        self.tensors
            .iter()
            .find(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
            .map(|(name, _)| name.as_str())
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Result<&TensorData> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: "<checkpoint>".into(),
            name: name.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let spec = NetSpec::tiny();
        let tasks = vec!["smiling".to_string(), "young".to_string()];
        let variant = Variant::Modulated;
        let mut tensors = BTreeMap::new();
        for (i, e) in names::schema(&spec, &variant, &tasks)
            .into_iter()
            .enumerate()
        {
            let n = e.shape.iter().product::<usize>();
            let data = (0..n).map(|j| (i * 31 + j) as f32 * 0.001).collect();
            tensors.insert(
                e.name,
                TensorData {
                    shape: e.shape,
                    data,
                },
            );
        }
        Checkpoint {
            header: CheckpointHeader {
                spec,
                variant,
                tasks,
                preprocess: Preprocess::default(),
                epoch: 3,
                train_config: serde_json::json!({"lr": 0.01}),
                metrics: serde_json::json!({"mean_accuracy": 0.9}),
            },
            tensors,
        }
    }

    /// What a damaged or hand-made header or a diverged run would hand every
    /// consumer is refused where the checkpoint loads, naming what is wrong.
    #[test]
    fn bad_headers_and_diverged_tensors_are_refused() {
        type Damage = fn(&mut Checkpoint);
        let cases: [(Damage, &str); 5] = [
            (
                |c| c.header.tasks[1] = "Smiling".into(),
                "\"Smiling\" is asked for twice",
            ),
            (|c| c.header.tasks[0] = "a".repeat(65), "at most 64"),
            (
                |c| c.header.preprocess.std[1] = 0.0,
                "standard deviations positive",
            ),
            (
                |c| c.header.preprocess.mean[0] = f32::NAN,
                "means must be finite",
            ),
            (
                |c| c.tensors.get_mut("fc.weight").expect("fc").data[2] = f32::NEG_INFINITY,
                "tensor fc.weight holds NaN or infinity",
            ),
        ];
        sample()
            .validate(Path::new("c"))
            .expect("the sample is valid");
        for (damage, want) in cases {
            let mut c = sample();
            damage(&mut c);
            let err = c.validate(Path::new("c")).expect_err(want).to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn headers_from_before_fit_pad_only_for_zappos_data() {
        let ckpt = sample();
        let header = |data: &str, fit: Option<&str>| {
            let mut h = serde_json::to_value(&ckpt.header).expect("json");
            h["train_config"] = serde_json::json!({ "data": data });
            match fit {
                Some(f) => h["preprocess"]["fit"] = f.into(),
                None => {
                    h["preprocess"].as_object_mut().expect("obj").remove("fit");
                }
            }
            let bytes = rewrite_meta(&ckpt, HEADER_KEY, Some(&h.to_string()));
            Checkpoint::from_bytes(&bytes, Path::new("c"))
                .expect("reads")
                .header
                .preprocess
                .fit
        };
        assert_eq!(header("zappos:/shoes", None), crate::Fit::Pad);
        assert_eq!(header("celeba:/faces", None), crate::Fit::Crop);
        assert_eq!(header("zappos:/shoes", Some("crop")), crate::Fit::Crop);
        assert_eq!(header("folder:/x", Some("pad")), crate::Fit::Pad);
    }

    fn rewrite_meta(ckpt: &Checkpoint, key: &str, value: Option<&str>) -> Vec<u8> {
        let bytes = ckpt.to_bytes().expect("bytes");
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("meta");
        let mut meta = meta.metadata().clone().expect("has meta");
        match value {
            Some(v) => meta.insert(key.into(), v.into()),
            None => meta.remove(key),
        };
        let views = ckpt.tensors.iter().map(|(k, v)| (k.as_str(), F32View(v)));
        safetensors::serialize(views, Some(meta)).expect("serialize")
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.safetensors");
        let ckpt = sample();
        ckpt.save(&path).expect("save");
        assert_eq!(Checkpoint::load(&path).expect("load"), ckpt);
    }

    #[test]
    fn plain_safetensors_readers_see_the_weights() {
        let bytes = sample().to_bytes().expect("bytes");
        let st = SafeTensors::deserialize(&bytes).expect("plain read");
        assert_eq!(st.tensor("modulation.fc").expect("mod").shape(), &[2, 32]);
    }

    #[test]
    fn rejects_future_version() {
        let bytes = rewrite_meta(&sample(), VERSION_KEY, Some("99"));
        let err = Checkpoint::from_bytes(&bytes, Path::new("x.safetensors")).unwrap_err();
        assert!(
            matches!(err, Error::VersionMismatch { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade"), "{err}");
    }

    #[test]
    fn rejects_foreign_safetensors() {
        let bytes = rewrite_meta(&sample(), FORMAT_KEY, None);
        let err = Checkpoint::from_bytes(&bytes, Path::new("x.safetensors")).unwrap_err();
        assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
        assert!(err.to_string().contains("no `modkit.format`"), "{err}");
        // A version that is no number names itself, not a missing format key.
        for v in ["-1", "0"] {
            let bytes = rewrite_meta(&sample(), VERSION_KEY, Some(v));
            let err = Checkpoint::from_bytes(&bytes, Path::new("x.safetensors")).unwrap_err();
            let want = format!("`modkit.version` is \"{v}\", not a format version");
            assert!(err.to_string().contains(&want), "{err}");
        }
    }

    #[test]
    fn other_kinds_of_file_are_named() {
        let package = crate::container::frame(&crate::package::KIND, b"payload");
        let cases: [(&[u8], &str); 4] = [
            (&package, "it is a modkit package"),
            (b"MODIDX\0\0\x01\0\0\0", "it is a modkit gallery index"),
            (b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR", "it is a PNG image"),
            (
                b"some text that is no checkpoint at all",
                "not a safetensors file",
            ),
        ];
        for (bytes, want) in cases {
            let err = Checkpoint::from_bytes(bytes, Path::new("x")).unwrap_err();
            assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn rejects_truncated() {
        let bytes = sample().to_bytes().expect("bytes");
        for cut in [0, 7, 100, bytes.len() - 1] {
            let err = Checkpoint::from_bytes(&bytes[..cut], Path::new("x")).unwrap_err();
            assert!(matches!(err, Error::Safetensors { .. }), "cut {cut}: {err}");
        }
    }

    #[test]
    fn rejects_missing_tensor_and_wrong_shape() {
        let mut c = sample();
        c.tensors.remove("block5.res1.weight");
        let err = Checkpoint::from_bytes(&c.to_bytes().expect("b"), Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("block5.res1.weight"), "{err}");

        let mut c = sample();
        c.tensors.insert(
            "modulation.fc".into(),
            TensorData::new(vec![3, 32], vec![1.0; 96]).expect("t"),
        );
        let err = Checkpoint::from_bytes(&c.to_bytes().expect("b"), Path::new("x")).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    }

    #[test]
    fn rejects_bad_header_json() {
        let bytes = rewrite_meta(&sample(), HEADER_KEY, Some("{not json"));
        let err = Checkpoint::from_bytes(&bytes, Path::new("x")).unwrap_err();
        assert!(matches!(err, Error::Header { .. }), "{err}");
    }
}

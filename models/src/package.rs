//! The compiled package `.modpack` (compiler → runtime), framed by
//! [`crate::container`] with magic `MODPACK\0`.
//!
//! ```text
//! Package (postcard)
//! ├─ spec, variant, tasks, preprocess, precision
//! ├─ trunk: ONNX  image [1, 3, S, S] → features [1, C, H, W]   (conv1..block N)
//! ├─ tails.switch: optional ONNX: features [1, C, H, W] + one vector input per
//! │                modulated stage [B, C_s] → embedding [B, E] (B tasks at once)
//! ├─ tails.folded: (task, ONNX) with the task's vectors folded into the weights:
//! │                features [N, C, H, W] → embedding [N, E]
//! │  every task has a folded tail or is served by the switch tail
//! └─ task_vectors[task][stage]: the modulation vectors with ReLU applied, the
//!    switch tail's inputs (kept in folded packages too, for inspection)
//! ```
//!
//! The package's fingerprint is its payload checksum; a gallery index stores it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::container::{self, Kind};
use crate::{Error, NetSpec, Preprocess, Result, Variant, write_atomic};

/// The `.modpack` file kind.
pub const KIND: Kind = Kind {
    magic: *b"MODPACK\0",
    version: 2,
    what: "modkit package",
    hint: "compile one with `modc compile CKPT -o model.modpack`",
};

/// How weights are stored in the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
}

/// The task-specific part of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tails {
    /// One shared tail whose inputs include the task's vectors (the runtime switch).
    pub switch: Option<Vec<u8>>,
    /// Per-task tails with the task's vectors folded into the weights.
    pub folded: Vec<(String, Vec<u8>)>,
}

impl Tails {
    /// The folded tail of `task`, if it has one.
    pub fn folded(&self, task: &str) -> Option<&[u8]> {
        self.folded
            .iter()
            .find(|(t, _)| t == task)
            .map(|(_, g)| g.as_slice())
    }
}

/// A compiled package in memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Package {
    pub spec: NetSpec,
    pub variant: Variant,
    pub tasks: Vec<String>,
    pub preprocess: Preprocess,
    pub precision: Precision,
    /// ONNX bytes of the trunk.
    pub trunk: Vec<u8>,
    pub tails: Tails,
    /// `[task][stage][channel]`, ReLU applied.
    pub task_vectors: Vec<Vec<Vec<f32>>>,
}

impl Package {
    /// Serializes and frames the package.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let payload = postcard::to_stdvec(self).map_err(|source| Error::Decode {
            path: "<memory>".into(),
            source,
        })?;
        Ok(container::frame(&KIND, &payload))
    }

    /// Writes the package atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// Reads a package and its fingerprint.
    pub fn load(path: &Path) -> Result<(Self, u64)> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses framed bytes; `path` only names the file in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<(Self, u64)> {
        let (payload, version, fingerprint) = container::unframe(&KIND, bytes, path)?;
        let decode = |source| Error::Decode {
            path: path.into(),
            source,
        };
        let pkg: Package = if version < 2 {
            postcard::from_bytes::<v1::Package>(payload)
                .map_err(decode)?
                .into()
        } else {
            postcard::from_bytes(payload).map_err(decode)?
        };
        pkg.spec.validate()?;
        crate::tasks::check_list(&pkg.tasks)?;
        pkg.preprocess.check()?;
        // The switch tail's inputs: per task, one vector (or matrix) per stage.
        // Folded-only packages need none (CSN's had none before they could switch).
        let want = pkg.variant.task_numbers(&pkg.spec);
        if pkg.tails.switch.is_some() && !want.is_empty() {
            let fits = |v: &Vec<Vec<f32>>| v.iter().map(Vec::len).eq(want.iter().copied());
            if pkg.task_vectors.len() != pkg.tasks.len() || !pkg.task_vectors.iter().all(fits) {
                return Err(Error::InvalidSpec(format!(
                    "{path:?}: its task vectors do not fit its {} tasks and its network's modulated stages; compile the package again",
                    pkg.tasks.len()
                )));
            }
        }
        for task in &pkg.tasks {
            if pkg.tails.switch.is_none() && pkg.tails.folded(task).is_none() {
                return Err(Error::InvalidSpec(format!(
                    "{path:?}: task {task:?} has no tail; compile the package again"
                )));
            }
        }
        Ok((pkg, fingerprint))
    }

    /// The index of `task` (case-insensitive), or an error listing the tasks.
    pub fn task_index(&self, task: &str) -> Result<usize> {
        Ok(crate::tasks::select(&[task.to_string()], &self.tasks)?[0])
    }
}

/// Version 1 (before [`Preprocess::fit`]), still read as cropping (a version-1
/// package compiled from a `zappos:` run padded in training: compile it again).
mod v1 {
    use serde::{Deserialize, Serialize};

    use crate::{NetSpec, Variant};

    #[derive(Serialize, Deserialize)]
    pub(super) struct Preprocess {
        pub mean: [f32; 3],
        pub std: [f32; 3],
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct Package {
        pub spec: NetSpec,
        pub variant: Variant,
        pub tasks: Vec<String>,
        pub preprocess: Preprocess,
        pub precision: super::Precision,
        pub trunk: Vec<u8>,
        pub tails: super::Tails,
        pub task_vectors: Vec<Vec<Vec<f32>>>,
    }

    impl From<Package> for super::Package {
        fn from(p: Package) -> Self {
            super::Package {
                spec: p.spec,
                variant: p.variant,
                tasks: p.tasks,
                preprocess: crate::Preprocess {
                    mean: p.preprocess.mean,
                    std: p.preprocess.std,
                    fit: crate::Fit::Crop,
                },
                precision: p.precision,
                trunk: p.trunk,
                tails: p.tails,
                task_vectors: p.task_vectors,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Package {
        Package {
            spec: NetSpec::tiny(),
            variant: Variant::Modulated,
            tasks: vec!["smiling".into(), "young".into()],
            preprocess: Preprocess::default(),
            precision: Precision::F32,
            trunk: vec![1, 2, 3],
            tails: Tails {
                switch: Some(vec![7]),
                folded: vec![("young".into(), vec![5, 6])],
            },
            // One vector per modulated stage (block4, block5, fc), per task.
            task_vectors: (0..2)
                .map(|t| {
                    NetSpec::tiny()
                        .modulated_stages()
                        .iter()
                        .map(|s| vec![0.5 * t as f32; s.channels])
                        .collect()
                })
                .collect(),
        }
    }

    #[test]
    fn folded_packages_need_no_task_vectors() {
        // As CSN's were written before CSN could use the switch.
        let mut csn = sample();
        csn.variant = Variant::Csn;
        csn.tails = Tails {
            switch: None,
            folded: vec![("smiling".into(), vec![1]), ("young".into(), vec![2])],
        };
        csn.task_vectors = vec![Vec::new(), Vec::new()];
        Package::from_bytes(&csn.to_bytes().expect("b"), Path::new("csn.modpack")).expect("loads");
        csn.tails.switch = Some(vec![7]);
        assert!(Package::from_bytes(&csn.to_bytes().expect("b"), Path::new("c")).is_err());
    }

    #[test]
    fn rejects_task_vectors_that_do_not_fit_the_network() {
        let mut short = sample();
        short.task_vectors[1][2].pop();
        let mut fewer = sample();
        fewer.task_vectors.pop();
        for bad in [short, fewer] {
            let err = Package::from_bytes(&bad.to_bytes().expect("b"), Path::new("m.modpack"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("task vectors") && err.contains("compile the package again"),
                "{err}"
            );
        }
    }

    #[test]
    fn round_trip_with_stable_fingerprint() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.modpack");
        sample().save(&path).expect("save");
        let (pkg, fp) = Package::load(&path).expect("load");
        assert_eq!(pkg, sample());
        let (_, fp2) = Package::from_bytes(&sample().to_bytes().expect("b"), &path).expect("again");
        assert_eq!(fp, fp2);
        let mut other = sample();
        other.task_vectors[0][0][0] = 0.9;
        let (_, fp3) = Package::from_bytes(&other.to_bytes().expect("b"), &path).expect("other");
        assert_ne!(fp, fp3);
    }

    #[test]
    fn reads_version_1_as_cropping() {
        let p = sample();
        let old = v1::Package {
            spec: p.spec.clone(),
            variant: p.variant,
            tasks: p.tasks.clone(),
            preprocess: v1::Preprocess {
                mean: [0.1, 0.2, 0.3],
                std: p.preprocess.std,
            },
            precision: p.precision,
            trunk: p.trunk.clone(),
            tails: p.tails.clone(),
            task_vectors: p.task_vectors.clone(),
        };
        let kind = Kind { version: 1, ..KIND };
        let bytes = container::frame(&kind, &postcard::to_stdvec(&old).expect("v1"));
        let (pkg, _) = Package::from_bytes(&bytes, Path::new("old.modpack")).expect("v1 reads");
        assert_eq!(pkg.preprocess.mean, [0.1, 0.2, 0.3]);
        assert_eq!(pkg.preprocess.fit, crate::Fit::Crop);
        assert_eq!((pkg.tasks, pkg.tails), (p.tasks, p.tails));
        // A version-2 payload is longer by the fit, and round-trips a padding one.
        let mut pad = sample();
        pad.preprocess.fit = crate::Fit::Pad;
        let (back, _) =
            Package::from_bytes(&pad.to_bytes().expect("b"), Path::new("p")).expect("v2");
        assert_eq!(back.preprocess.fit, crate::Fit::Pad);
    }

    #[test]
    fn rejects_bad_magic() {
        let mut bytes = sample().to_bytes().expect("b");
        bytes[..8].copy_from_slice(b"MODIDX\0\0");
        let err = Package::from_bytes(&bytes, Path::new("m.modpack"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a modkit package") && err.contains("modc compile"),
            "{err}"
        );
    }

    #[test]
    fn rejects_future_version() {
        let mut bytes = sample().to_bytes().expect("b");
        bytes[8] = 9;
        let err = Package::from_bytes(&bytes, Path::new("m.modpack")).unwrap_err();
        assert!(
            matches!(err, Error::FutureVersion { found: 9, .. }),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_checksum() {
        let mut bytes = sample().to_bytes().expect("b");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        let err = Package::from_bytes(&bytes, Path::new("m.modpack")).unwrap_err();
        assert!(matches!(err, Error::BadChecksum { .. }), "{err}");
    }

    #[test]
    fn rejects_truncated() {
        let bytes = sample().to_bytes().expect("b");
        let err =
            Package::from_bytes(&bytes[..bytes.len() - 3], Path::new("m.modpack")).unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{err}");
    }

    #[test]
    fn unknown_task_lists_tasks() {
        let err = sample().task_index("smile").unwrap_err().to_string();
        assert!(err.contains("smiling, young"), "{err}");
        assert_eq!(sample().task_index("YOUNG").expect("young"), 1);
    }
}

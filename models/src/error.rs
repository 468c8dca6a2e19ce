//! Errors of the format layer.

use std::path::PathBuf;

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong reading, writing or validating modkit's shared types.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown spec preset {name:?}: use one of {available}")]
    UnknownPreset { name: String, available: String },

    #[error(
        "spec {what}: input {input}×{input} is too small for the network (it reaches {reached} at {stage}); use an input of at least {minimum}"
    )]
    InputTooSmall {
        what: String,
        input: usize,
        reached: i64,
        stage: &'static str,
        minimum: usize,
    },

    #[error("invalid spec: {0}")]
    InvalidSpec(String),

    #[error(
        "unknown variant {name:?}: use one of modulated, shared, independent, branch:K, csn, only-mask"
    )]
    UnknownVariant { name: String },

    #[error("unknown task {name:?}; available tasks: {}", available.join(", "))]
    UnknownTask {
        name: String,
        available: Vec<String>,
    },

    #[error(
        "an empty task name in the task list (a stray comma or space?); list tasks as smiling,young"
    )]
    EmptyTask,

    #[error("task {name:?} is asked for twice; list each task once")]
    DuplicateTask { name: String },

    #[error("invalid task name {name:?}: use letters, digits and '_' only, at most 64 of them")]
    InvalidTaskName { name: String },

    #[error("{path:?} is not a modkit checkpoint ({detail}); train one with `modtrain train`")]
    NotACheckpoint { path: PathBuf, detail: String },

    #[error(
        "{path:?} is checkpoint format version {found}, newer than this build supports ({supported}); upgrade modkit"
    )]
    VersionMismatch {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error("{path:?}: checkpoint is missing tensor {name:?}")]
    MissingTensor { path: PathBuf, name: String },

    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    #[error("tensor {name:?} is {dtype}, only F32 is supported")]
    UnsupportedDtype { name: String, dtype: String },

    #[error("{path:?}: corrupt checkpoint: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },

    #[error("{path:?}: bad checkpoint header: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path:?} is not a {what} (bad magic bytes); {hint}")]
    BadMagic {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
    },

    #[error(
        "{path:?} is {what} format version {found}, newer than this build supports ({supported}); upgrade modkit"
    )]
    FutureVersion {
        path: PathBuf,
        what: &'static str,
        found: u32,
        supported: u32,
    },

    #[error(
        "{path:?} is truncated: {found} bytes, the header promises {expected}; the file was cut short, write it again"
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error(
        "{path:?}: tensor {name} holds NaN or infinity (training diverged); use an earlier checkpoint"
    )]
    NonFinite { path: PathBuf, name: String },

    #[error("output {path:?} {reason}")]
    Output { path: PathBuf, reason: String },

    /// A thread count out of range ([`crate::threads`]).
    #[error("{0}")]
    Threads(String),

    #[error("{path:?} is damaged: {detail}; write it again")]
    Damaged { path: PathBuf, detail: String },

    #[error("{path:?} is corrupt (checksum {found:016x}, stored {stored:016x}); write it again")]
    BadChecksum {
        path: PathBuf,
        found: u64,
        stored: u64,
    },

    #[error(
        "{path:?}: cannot decode its contents ({source}); write it again with this build (`modc compile` for a package, `modrt index` for an index)"
    )]
    Decode {
        path: PathBuf,
        #[source]
        source: postcard::Error,
    },

    #[error("{path:?} line {line}: {msg}")]
    Malformed {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    #[error("{path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `err` and its causes on one line, `: `-separated, leaving out a cause whose
/// text its own error's message already holds (most errors here name their cause
/// in their message, and `{:#}` would print it twice).
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut parent = line.clone();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !parent.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        parent = text;
        cause = c.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_names_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::IsADirectory, "Is a directory");
        let err = Error::Io {
            path: "/tmp/d".into(),
            source: io(),
        };
        assert_eq!(one_line(&err), "\"/tmp/d\": Is a directory");
        // A wrapper that does not repeat its cause gets it appended.
        #[derive(Debug, thiserror::Error)]
        #[error("reading the index")]
        struct Outer(#[source] Error);
        let outer = Outer(Error::Io {
            path: "/tmp/d".into(),
            source: io(),
        });
        assert_eq!(
            one_line(&outer),
            "reading the index: \"/tmp/d\": Is a directory"
        );
    }
}

//! Errors of the compiler library.

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong compiling, inspecting or verifying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("variant {variant} cannot be compiled: {why}")]
    Unsupported { variant: String, why: String },

    /// A request that cannot be met as asked; the message says what to change.
    #[error("{0}")]
    Request(String),

    #[error("ONNX graph {graph}: {msg}")]
    Graph { graph: String, msg: String },

    #[error("tract could not run the {graph} graph: {source}")]
    Tract {
        graph: String,
        #[source]
        source: anyhow::Error,
    },

    #[error(transparent)]
    Models(#[from] modkit_models::Error),
}

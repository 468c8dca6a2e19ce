//! Shared helpers of the workspace tests live in `tests.rs` modules.

//! Workspace end-to-end and regression tests, one binary (ripgrep's layout).

mod pipeline;
mod runtime;

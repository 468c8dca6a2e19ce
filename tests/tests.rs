//! Workspace end-to-end and regression tests, one binary (ripgrep's layout).

mod budgets;
// Checkpoints with pseudo-random weights straight from the schema: the compiler
// tests' own, shared rather than copied.
#[path = "../compiler/tests/common/mod.rs"]
mod common;
mod pipeline;
mod runtime;

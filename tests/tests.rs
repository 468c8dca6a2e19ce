//! Workspace end-to-end and regression tests, one binary (ripgrep's layout).

mod budgets;
mod pipeline;
mod runtime;

//! Runtime (modrt): see the runtime issue. Nothing here yet.

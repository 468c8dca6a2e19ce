//! Compiler (modc): see the compiler issue. Nothing here yet.

//! Integration tests: one binary, so mistral.rs is linked once.

mod assets;
mod cli;
mod engine;
mod equivalence;
mod smollm2;
mod tiny;

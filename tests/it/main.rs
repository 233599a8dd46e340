//! Integration tests: one binary, so mistral.rs is linked once.

mod assets;
mod cli;
mod dtypes;
mod engine;
mod equivalence;
mod eval;
mod passkey;
mod policy;
mod qllm;
mod reliability;
mod reuse;
mod serve;
mod smollm2;
mod tiny;

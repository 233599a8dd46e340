//! Real model files, fetched by `scripts/fetch-assets.sh`.

use std::path::PathBuf;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn smollm2() -> PathBuf {
    let path = root().join("assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-assets.sh",
        path.display()
    );
    path
}

/// Qwen2.5-Coder-1.5B-Instruct (GGUF `qwen2`, Q4_K_M, 32K context).
pub fn qwen15b() -> PathBuf {
    let path = root().join("assets/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-assets.sh qwen15b",
        path.display()
    );
    path
}

/// The patched `mistralrs` CLI, built by `scripts/test.sh`.
pub fn mistralrs_bin() -> PathBuf {
    let path = std::env::var_os("QLLM_MISTRALRS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/mistralrs"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh (it builds the CLI first)",
        path.display()
    );
    path
}

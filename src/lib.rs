//! Query-aware long-context attention (Q-LLM) for mistral.rs.
//!
//! The crate implements mistral.rs's [`AttentionHook`]: per layer it receives
//! the pre-RoPE queries, keys and values of a step, keeps each sequence's KV
//! itself and returns the attention output. [`install`] puts it in place
//! process-wide; the patched `mistralrs` CLI calls it for `--qllm`.
//!
//! Modes (see [`Mode`]):
//! - `qllm` (default): the local window with exact positions, attention
//!   sinks, and memory blocks of evicted tokens retrieved per execution block
//!   and layer by the current queries plus the question;
//! - `infllm`: the same without the question;
//! - `streaming`: sinks and the local window only;
//! - `dense`: full causal attention over the hook's own KV store, the
//!   reference the other modes are measured against.

#![deny(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
#![warn(missing_docs)]

pub mod attention;
pub mod config;
pub mod error;
pub mod eval;
pub mod hook;
pub mod kv;
pub mod memory;
pub mod passkey;
pub mod request;
pub mod server;

use std::path::Path;
use std::sync::{Arc, RwLock};

pub use config::{BlockDType, ConfigFile, Mode, Preset, QllmConfig};
pub use error::{Error, Result};
pub use hook::{find_question_span, MemoryStats, QllmHook, RequestPlan, RequestReport};
pub use memory::LayerStats;
pub use mistralrs_core::attention_hook::AttentionHook;

/// Loads the config (defaults when `config_path` is `None`), validates it and
/// installs the hook for every model loaded afterwards. Returns the hook so
/// callers can read its statistics.
pub fn install(config_path: Option<&Path>) -> Result<Arc<QllmHook>> {
    let file = match config_path {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    Ok(install_config(file.resolve()?))
}

/// Installs a hook with an already validated config.
pub fn install_config(config: QllmConfig) -> Arc<QllmHook> {
    tracing::info!("Q-LLM attention hook installed: {config:?}");
    let hook = Arc::new(QllmHook::new(config));
    mistralrs_core::attention_hook::set_attention_hook(Some(hook.clone()));
    *INSTALLED.write().unwrap_or_else(|e| e.into_inner()) = Some(hook.clone());
    hook
}

static INSTALLED: RwLock<Option<Arc<QllmHook>>> = RwLock::new(None);

/// The hook [`install`] or [`install_config`] put in place last, if any.
pub fn installed() -> Option<Arc<QllmHook>> {
    INSTALLED.read().unwrap_or_else(|e| e.into_inner()).clone()
}

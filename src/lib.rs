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
pub mod limits;
pub mod memory;
pub mod passkey;
pub mod request;
pub mod rope;
pub mod server;
pub mod trace;

use std::path::Path;
use std::sync::{Arc, RwLock};

pub use config::{
    BlockDType, ConfigFile, Mode, Positions, Preset, QllmConfig, QuestionRows, Scoring, Selection,
};
pub use error::{Error, Result};
pub use hook::{find_question_span, MemoryStats, Needle, QllmHook, RequestPlan, RequestReport};
pub use memory::LayerStats;
pub use mistralrs_core::attention_hook::AttentionHook;

/// Loads the config (defaults when `config_path` is `None`), validates it and
/// installs the hook for every model loaded afterwards. Returns the hook so
/// callers can read its statistics. Without a `max_memory` in the config,
/// Q-LLM state is capped at half the machine's memory.
pub fn install(config_path: Option<&Path>) -> Result<Arc<QllmHook>> {
    install_with_limits(config_path, None, None)
}

/// [`install`], with the memory caps given as sizes (e.g. `"8GiB"`, from
/// the command line) overriding the config file's `max_memory` and
/// `max_request_memory`.
pub fn install_with_limits(
    config_path: Option<&Path>,
    max_memory: Option<&str>,
    max_request_memory: Option<&str>,
) -> Result<Arc<QllmHook>> {
    let file = match config_path {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let mut config = file.resolve()?;
    if let Some(size) = max_memory {
        config.max_memory = Some(limits::parse_byte_size("max_memory", size)?);
    }
    if let Some(size) = max_request_memory {
        config.max_request_memory = Some(limits::parse_byte_size("max_request_memory", size)?);
    }
    if config.max_memory.is_none() {
        config.max_memory = limits::physical_memory().map(|bytes| bytes / 2);
    }
    tracing::info!(
        "Q-LLM memory caps: max_memory = {}, max_request_memory = {}",
        config
            .max_memory
            .map_or("none".into(), limits::format_bytes),
        config
            .max_request_memory
            .map_or("none".into(), limits::format_bytes)
    );
    Ok(install_config(config))
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

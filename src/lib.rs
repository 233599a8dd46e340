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
//! - `streaming`: InfLLM with `topk = 0`: sinks and the local window;
//! - `dense`: full causal attention over the hook's own KV store, the
//!   reference the other modes are measured against.
//!
//! Rooms, each the one owner of its concern (the README has the map):
//! [`config`] (settings and the config file), [`memory`] (a layer's ledger,
//! KV store and blocks), [`retrieval`] (block scores, top-k, the question's
//! rows), [`attention`] (the math and its slow reference twins), and, with
//! the `engine` feature (default), [`engine`] (the hook), [`question`] (the
//! question's text, span and probe) and [`client`]; [`server`] (feature
//! `server`, default) and `eval` (feature `eval`) build on them.

#![deny(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
#![warn(missing_docs)]

pub mod attention;
pub mod config;
pub mod error;
pub mod memory;
pub mod question;
pub mod retrieval;
pub mod system;

#[cfg(feature = "engine")]
pub mod client;
#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "eval")]
pub mod eval;
#[cfg(feature = "server")]
pub mod server;

pub use config::{
    BlockDType, BlockStorage, Boundaries, ConfigFile, EngineSettings, MemoryCaps, Mode, Policy,
    Positions, Preset, QllmConfig, QuestionRows, QuestionVectors, RequestOptions, Scoring,
    Selection,
};
pub use error::{Error, Result};
pub use memory::LayerStats;

#[cfg(feature = "engine")]
pub use engine::{MemoryStats, Needle, PrefixStats, QllmHook, RequestPlan, RequestReport};
#[cfg(feature = "engine")]
pub use mistralrs_core::attention_hook::AttentionHook;

#[cfg(feature = "engine")]
mod install {
    use std::path::Path;
    use std::sync::{Arc, RwLock};

    use crate::config::size::{format_bytes, parse_byte_size, parse_byte_size_or_zero};
    use crate::{ConfigFile, QllmConfig, QllmHook, Result};

    /// Loads the config (defaults when `config_path` is `None`), validates it
    /// and installs the hook for every model loaded afterwards. Returns the
    /// hook so callers can read its statistics. Without a `max_memory` in the
    /// config, Q-LLM state is capped at half the machine's memory.
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
        install_with_memory(config_path, max_memory, max_request_memory, None)
    }

    /// [`install_with_limits`], with the kept prefixes' budget (`"2GiB"`,
    /// `"0"` for none) overriding the config file's `prefix_cache_memory`.
    pub fn install_with_memory(
        config_path: Option<&Path>,
        max_memory: Option<&str>,
        max_request_memory: Option<&str>,
        prefix_cache_memory: Option<&str>,
    ) -> Result<Arc<QllmHook>> {
        let file = match config_path {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let mut config = file.resolve()?;
        let caps = &mut config.caps;
        if let Some(size) = max_memory {
            caps.max_memory = Some(parse_byte_size("max_memory", size)?);
        }
        if let Some(size) = max_request_memory {
            caps.max_request_memory = Some(parse_byte_size("max_request_memory", size)?);
        }
        if let Some(size) = prefix_cache_memory {
            caps.prefix_cache_memory = parse_byte_size_or_zero("prefix_cache_memory", size)?;
        }
        if caps.max_memory.is_none() {
            caps.max_memory = crate::system::physical_memory().map(|bytes| bytes / 2);
        }
        tracing::info!(
            "Q-LLM memory caps: max_memory = {}, max_request_memory = {}, prefix_cache_memory = {}",
            caps.max_memory.map_or("none".into(), format_bytes),
            caps.max_request_memory.map_or("none".into(), format_bytes),
            format_bytes(caps.prefix_cache_memory)
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
}

#[cfg(feature = "engine")]
pub use install::{install, install_config, install_with_limits, install_with_memory, installed};

//! Errors a user of the crate can see.

use std::path::PathBuf;

/// Everything that can go wrong when configuring or running Q-LLM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid Q-LLM config: `{key}` {reason}")]
    InvalidConfig {
        /// The offending key, as written in the config file.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file could not be read.
    #[error("cannot read Q-LLM config file {path}: {source}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key.
    #[error("cannot parse Q-LLM config file {path}: {message}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// An evaluation task cannot be generated (missing data, a length the
    /// task cannot reach, a bad depth).
    #[error("evaluation: {0}")]
    Eval(String),
    /// A request could not be prepared (its question could not be
    /// tokenized, the probe pass failed, the engine is gone).
    #[error("qllm request: {0}")]
    Request(String),
    /// The engine refused a request before any work (the message says why:
    /// a memory cap, settings the model cannot run).
    #[error("{0}")]
    Refused(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

//! Configuration: a TOML file with every knob optional, resolved into a
//! validated [`QllmConfig`] that the hook reads.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Which attention policy the hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Full causal attention over a KV store kept by the hook.
    Dense,
}

/// Validated settings the hook runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QllmConfig {
    /// The attention policy.
    pub mode: Mode,
    /// Prompts longer than this are fed to the model in chunks of this size.
    pub prefill_chunk_size: usize,
}

impl QllmConfig {
    /// Full attention over the hook's own KV store.
    pub fn dense() -> Self {
        Self {
            mode: Mode::Dense,
            prefill_chunk_size: 512,
        }
    }
}

impl Default for QllmConfig {
    fn default() -> Self {
        Self::dense()
    }
}

/// The config file as written: every key optional, unknown keys rejected.
///
/// ```
/// let file: qllm::ConfigFile = toml::from_str("mode = \"dense\"\nprefill_chunk_size = 256")?;
/// let config = file.resolve()?;
/// assert_eq!(config.prefill_chunk_size, 256);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// See [`QllmConfig::mode`].
    pub mode: Option<Mode>,
    /// See [`QllmConfig::prefill_chunk_size`]. Signed so that a negative value
    /// gets a message naming the key rather than a type error.
    pub prefill_chunk_size: Option<i64>,
}

impl ConfigFile {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::ConfigParse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Fills defaults and validates every value.
    pub fn resolve(&self) -> Result<QllmConfig> {
        let defaults = QllmConfig::default();
        Ok(QllmConfig {
            mode: self.mode.unwrap_or(defaults.mode),
            prefill_chunk_size: positive(
                "prefill_chunk_size",
                self.prefill_chunk_size,
                defaults.prefill_chunk_size,
            )?,
        })
    }
}

fn positive(key: &'static str, value: Option<i64>, default: usize) -> Result<usize> {
    match value {
        None => Ok(default),
        Some(v) if v > 0 => usize::try_from(v).map_err(|_| Error::InvalidConfig {
            key,
            reason: format!("is too large: {v}"),
        }),
        Some(v) => Err(Error::InvalidConfig {
            key,
            reason: format!("must be a positive integer, got {v}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<QllmConfig, String> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), QllmConfig::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("n_lcoal = 4").unwrap_err();
        assert!(err.contains("n_lcoal"), "{err}");
    }

    #[test]
    fn negative_and_zero_sizes_are_named() {
        for text in ["prefill_chunk_size = -3", "prefill_chunk_size = 0"] {
            let err = parse(text).unwrap_err();
            assert!(
                err.contains("`prefill_chunk_size` must be a positive integer"),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_mode_is_rejected() {
        let err = parse("mode = \"sparse\"").unwrap_err();
        assert!(err.contains("sparse"), "{err}");
    }
}

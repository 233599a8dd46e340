//! Memory limits: byte sizes as users write them, and an upper bound on the
//! state a request will need, so that one over a limit is refused before any
//! work.

use candle_core::DType;
use mistralrs_core::attention_hook::HookModel;
use serde::Deserialize;

use crate::config::{Mode, QllmConfig};
use crate::error::{Error, Result};
use crate::kv::grown_capacity;
use crate::memory::SLAB_BLOCKS;

/// A size as written in a config file: bytes, or a string with a unit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(i64),
    /// A number with a unit, e.g. `"8GiB"`, `"512 MB"`.
    Text(String),
}

impl SizeValue {
    /// The size in bytes; errors name `key`.
    pub fn bytes(&self, key: &'static str) -> Result<usize> {
        match self {
            SizeValue::Bytes(n) if *n > 0 => usize::try_from(*n).map_err(|_| too_large(key, n)),
            SizeValue::Bytes(n) => Err(Error::InvalidConfig {
                key,
                reason: format!("must be a positive size, got {n}"),
            }),
            SizeValue::Text(text) => parse_byte_size(key, text),
        }
    }
}

fn too_large(key: &'static str, value: impl std::fmt::Display) -> Error {
    Error::InvalidConfig {
        key,
        reason: format!("is too large: {value}"),
    }
}

/// Parses a byte size: a positive number with an optional unit, `B`, `kB`,
/// `MB`, `GB`, `TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of
/// 1024), case-insensitive. Errors name `key`.
///
/// ```
/// assert_eq!(qllm::limits::parse_byte_size("max_memory", "1.5 GiB").unwrap(), 3 << 29);
/// assert!(qllm::limits::parse_byte_size("max_memory", "lots").is_err());
/// ```
pub fn parse_byte_size(key: &'static str, text: &str) -> Result<usize> {
    let bad = || Error::InvalidConfig {
        key,
        reason: format!(
            "cannot be read as a size: {text:?} (write e.g. 8GiB, 512MiB or a number of bytes)"
        ),
    };
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = (number * scale).round();
    if bytes < 1.0 {
        return Err(Error::InvalidConfig {
            key,
            reason: format!("must be a positive size, got {text:?}"),
        });
    }
    if bytes > 1e18 {
        return Err(too_large(key, format!("{text:?}")));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Range-checked above.
    Ok(bytes as usize)
}

/// A byte count for messages: `1.50 GiB`, `12.0 MiB`, `900 B`.
pub fn format_bytes(bytes: usize) -> String {
    #[allow(clippy::cast_precision_loss)] // Display only.
    let b = bytes as f64;
    const KIB: f64 = 1024.0;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}

/// A `Key: N kB` line of a Linux `/proc` file (`/proc/meminfo`,
/// `/proc/PID/status`), in bytes.
pub fn proc_bytes(path: &str, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let kib: usize = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The machine's physical memory, if known.
pub fn physical_memory() -> Option<usize> {
    proc_bytes("/proc/meminfo", "MemTotal")
}

/// Resident memory of this process, if known.
pub fn resident_memory() -> Option<usize> {
    proc_bytes("/proc/self/status", "VmRSS")
}

/// Hands heap memory that is free back to the operating system. glibc keeps
/// freed chunks for reuse, so without this the KV of a long request that
/// has ended would stay resident; other allocators return memory themselves.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Largest capacity, in tokens, of a KV buffer that has held at most
/// `tokens` (see [`crate::kv::KvBuffer::append`]).
fn kv_capacity(tokens: usize) -> usize {
    if tokens == 0 {
        0
    } else {
        grown_capacity(tokens)
    }
}

/// Most bytes of state one sequence of `tokens` tokens (prompt and generated)
/// can hold under `config` with `model`: what
/// [`crate::QllmHook::memory_stats`] would report at its largest, never
/// less.
pub fn sequence_bytes_bound(config: &QllmConfig, model: &HookModel, tokens: usize) -> usize {
    let kv_token = |dtype: DType| {
        model.num_kv_heads * (model.k_head_dim + model.v_head_dim) * dtype.size_in_bytes()
    };
    let layer = match config.mode {
        // One buffer with every token.
        Mode::Dense => kv_capacity(tokens) * kv_token(model.dtype),
        Mode::Streaming | Mode::Qllm | Mode::Infllm => {
            let heads = model.num_attention_heads;
            let init = config.n_init.min(tokens);
            // Tokens not yet in a block: the window, the execution block being
            // read and the block about to be formed.
            let recent = (config.n_local
                + config.exc_block_size.max(config.prefill_chunk_size)
                + config.block_size)
                .min(tokens);
            let window = (kv_capacity(init) + kv_capacity(recent)) * kv_token(model.dtype)
                // f32 attention received per recent token and query head.
                + 2 * recent * heads * 4;
            if config.mode == Mode::Streaming {
                window
            } else {
                let blocks = tokens.saturating_sub(init) / config.block_size;
                let slabs = blocks.div_ceil(SLAB_BLOCKS);
                let block_dtype = config.block_dtype.resolve(model.dtype);
                window
                    + slabs * SLAB_BLOCKS * config.block_size * kv_token(block_dtype)
                    // f32 representative key per block and query head; the
                    // vector may hold up to twice its length.
                    + 2 * blocks * heads * model.k_head_dim * 4
                    // f32 question vector.
                    + heads * model.k_head_dim * 4
            }
        }
    };
    layer * model.num_layers
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        for (text, bytes) in [
            ("1000", 1000),
            ("2kB", 2000),
            ("2 KiB", 2048),
            ("512MiB", 512 << 20),
            ("8GiB", 8 << 30),
            ("8gib", 8 << 30),
            ("1.5GB", 1_500_000_000),
            ("1TiB", 1 << 40),
        ] {
            assert_eq!(
                parse_byte_size("max_memory", text).unwrap(),
                bytes,
                "{text}"
            );
        }
    }

    #[test]
    fn bad_sizes_are_named() {
        for text in [
            "",
            "lots",
            "8 gigs",
            "-1GiB",
            "0",
            "0.1B",
            "1e30",
            "99999999999TiB",
        ] {
            let err = parse_byte_size("max_memory", text).unwrap_err().to_string();
            assert!(err.contains("`max_memory`"), "{text}: {err}");
        }
        let err = SizeValue::Bytes(-5)
            .bytes("max_request_memory")
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("`max_request_memory` must be a positive size"));
        assert_eq!(SizeValue::Bytes(4096).bytes("x").unwrap(), 4096);
    }

    #[test]
    fn bytes_format_for_messages() {
        assert_eq!(format_bytes(900), "900 B");
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
        assert_eq!(format_bytes(12 << 20), "12.0 MiB");
    }

    /// SmolLM2-135M's shape with f32 activations.
    pub(crate) fn smollm2() -> HookModel {
        HookModel {
            max_seq_len: 8192,
            num_layers: 30,
            num_attention_heads: 9,
            num_kv_heads: 3,
            k_head_dim: 64,
            v_head_dim: 64,
            dtype: DType::F32,
        }
    }

    #[test]
    fn bound_grows_with_tokens_like_the_kv_it_stores() {
        let model = smollm2();
        let config = QllmConfig::default();
        let per_token = 30 * 3 * 128 * 4;
        let at_32k = sequence_bytes_bound(&config, &model, 32 * 1024);
        let at_64k = sequence_bytes_bound(&config, &model, 64 * 1024);
        // Block memory dominates: about one KV per token, plus bookkeeping.
        let growth = at_64k - at_32k;
        assert!(growth >= 32 * 1024 * per_token, "{growth}");
        assert!(growth <= 32 * 1024 * per_token * 11 / 10, "{growth}");
        let streaming = QllmConfig {
            mode: Mode::Streaming,
            ..config
        };
        assert_eq!(
            sequence_bytes_bound(&streaming, &model, 32 * 1024),
            sequence_bytes_bound(&streaming, &model, 64 * 1024),
            "streaming keeps a bounded window"
        );
        let dense = QllmConfig::dense();
        assert!(sequence_bytes_bound(&dense, &model, 1000) >= 1000 * per_token);
    }
}

//! Byte sizes as users write them (`"8GiB"`, `512MB`, bytes) and as
//! messages show them.

use serde::Deserialize;

use crate::error::{Error, Result};

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

impl SizeValue {
    /// [`Self::bytes`], with 0 accepted (a budget that turns a feature off).
    pub fn bytes_or_zero(&self, key: &'static str) -> Result<usize> {
        match self {
            SizeValue::Bytes(0) => Ok(0),
            SizeValue::Text(text) => parse_byte_size_or_zero(key, text),
            _ => self.bytes(key),
        }
    }
}

/// [`parse_byte_size`], with `0` accepted.
pub fn parse_byte_size_or_zero(key: &'static str, text: &str) -> Result<usize> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_byte_size(key, text)
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
/// assert_eq!(qllm::config::size::parse_byte_size("max_memory", "1.5 GiB").unwrap(), 3 << 29);
/// assert!(qllm::config::size::parse_byte_size("max_memory", "lots").is_err());
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

#[cfg(test)]
mod tests {
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
}

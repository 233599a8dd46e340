//! The config file: every key optional, unknown keys rejected, each value
//! checked as it is read.

use std::path::Path;

use serde::Deserialize;

use super::size::SizeValue;
use super::{
    BlockDType, Boundaries, EngineSettings, MemoryCaps, Mode, Policy, Positions, Preset,
    QllmConfig, QuestionRows, QuestionVectors, Scoring, Selection, DEFAULT_PREFIX_CACHE_MEMORY,
};
use crate::error::{Error, Result};

/// The config file as written: every key optional, unknown keys rejected.
///
/// ```
/// let file: qllm::ConfigFile = toml::from_str("preset = \"512\"\ntopk = 6")?;
/// let config = file.resolve()?;
/// assert_eq!((config.policy.n_local, config.policy.topk), (256, 6));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// See [`Policy::mode`].
    pub mode: Option<Mode>,
    /// Starting point for the sizes below; `1k` when absent.
    pub preset: Option<Preset>,
    // Sizes are signed so that a negative value gets a message naming the
    // key rather than a type error.
    /// See [`Policy::n_init`].
    pub n_init: Option<i64>,
    /// See [`Policy::n_local`].
    pub n_local: Option<i64>,
    /// See [`Policy::block_size`].
    pub block_size: Option<i64>,
    /// See [`Policy::exc_block_size`].
    pub exc_block_size: Option<i64>,
    /// See [`Policy::topk`].
    pub topk: Option<i64>,
    /// See [`Policy::repr_topk`].
    pub repr_topk: Option<i64>,
    /// See [`Policy::question_weight`].
    pub question_weight: Option<f64>,
    /// See [`Policy::question_rows`].
    pub question_rows: Option<QuestionRows>,
    /// See [`Policy::positions`].
    pub positions: Option<Positions>,
    /// See [`Policy::scoring`].
    pub scoring: Option<Scoring>,
    /// See [`Policy::selection`].
    pub selection: Option<Selection>,
    /// See [`Policy::mass_candidates`].
    pub mass_candidates: Option<i64>,
    /// See [`Policy::answer_mass_candidates`].
    pub answer_mass_candidates: Option<i64>,
    /// See [`Policy::neighbours`].
    pub neighbours: Option<i64>,
    /// See [`Policy::consensus`].
    pub consensus: Option<i64>,
    /// See [`Policy::question_topk`].
    pub question_topk: Option<i64>,
    /// See [`Policy::answer_topk`].
    pub answer_topk: Option<i64>,
    /// See [`Policy::answer_refresh`].
    pub answer_refresh: Option<i64>,
    /// See [`Policy::answer_pool`].
    pub answer_pool: Option<i64>,
    /// See [`EngineSettings::prefill_chunk_size`].
    pub prefill_chunk_size: Option<i64>,
    /// See [`EngineSettings::max_context_len`].
    pub max_context_len: Option<i64>,
    /// See [`Policy::block_dtype`].
    pub block_dtype: Option<BlockDType>,
    /// See [`Policy::boundaries`].
    pub boundaries: Option<Boundaries>,
    /// See [`Policy::question_first`].
    pub question_first: Option<bool>,
    /// See [`Policy::question_vectors`].
    pub question_vectors: Option<QuestionVectors>,
    /// See [`MemoryCaps::max_memory`]: bytes, or a size such as `"8GiB"`.
    pub max_memory: Option<SizeValue>,
    /// See [`MemoryCaps::max_request_memory`]: bytes, or a size such as
    /// `"2GiB"`.
    pub max_request_memory: Option<SizeValue>,
    /// See [`MemoryCaps::prefix_cache_memory`]: bytes, or a size such as
    /// `"2GiB"`; 0 keeps no prefixes.
    pub prefix_cache_memory: Option<SizeValue>,
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

    /// Fills defaults from the preset and validates every value.
    pub fn resolve(&self) -> Result<QllmConfig> {
        let base = Policy::preset(self.preset.unwrap_or(Preset::Budget1k));
        let engine = EngineSettings::default();
        let policy = Policy {
            mode: self.mode.unwrap_or(base.mode),
            n_init: size("n_init", self.n_init, base.n_init, 0)?,
            n_local: size("n_local", self.n_local, base.n_local, 1)?,
            block_size: size("block_size", self.block_size, base.block_size, 1)?,
            exc_block_size: size(
                "exc_block_size",
                self.exc_block_size,
                base.exc_block_size,
                1,
            )?,
            topk: size("topk", self.topk, base.topk, 0)?,
            repr_topk: size("repr_topk", self.repr_topk, base.repr_topk, 1)?,
            question_weight: question_weight(self.question_weight, base.question_weight)?,
            question_rows: self.question_rows.unwrap_or(base.question_rows),
            positions: self.positions.unwrap_or(base.positions),
            scoring: self.scoring.unwrap_or(base.scoring),
            selection: self.selection.unwrap_or(base.selection),
            mass_candidates: size(
                "mass_candidates",
                self.mass_candidates,
                base.mass_candidates,
                0,
            )?,
            answer_mass_candidates: size(
                "answer_mass_candidates",
                self.answer_mass_candidates,
                base.answer_mass_candidates,
                0,
            )?,
            neighbours: size("neighbours", self.neighbours, base.neighbours, 0)?,
            consensus: size("consensus", self.consensus, base.consensus, 0)?,
            question_topk: size("question_topk", self.question_topk, base.question_topk, 0)?,
            answer_topk: size("answer_topk", self.answer_topk, base.answer_topk, 0)?,
            answer_refresh: size(
                "answer_refresh",
                self.answer_refresh,
                base.answer_refresh,
                1,
            )?,
            answer_pool: size("answer_pool", self.answer_pool, base.answer_pool, 0)?,
            block_dtype: self.block_dtype.unwrap_or(base.block_dtype),
            boundaries: self.boundaries.unwrap_or(base.boundaries),
            question_first: self.question_first.unwrap_or(base.question_first),
            question_vectors: self.question_vectors.unwrap_or(base.question_vectors),
        };
        let engine = EngineSettings {
            prefill_chunk_size: size(
                "prefill_chunk_size",
                self.prefill_chunk_size,
                engine.prefill_chunk_size,
                1,
            )?,
            max_context_len: size(
                "max_context_len",
                self.max_context_len,
                engine.max_context_len,
                1,
            )?,
        };
        let caps = MemoryCaps {
            max_memory: self
                .max_memory
                .as_ref()
                .map(|v| v.bytes("max_memory"))
                .transpose()?,
            max_request_memory: self
                .max_request_memory
                .as_ref()
                .map(|v| v.bytes("max_request_memory"))
                .transpose()?,
            prefix_cache_memory: self
                .prefix_cache_memory
                .as_ref()
                .map_or(Ok(DEFAULT_PREFIX_CACHE_MEMORY), |v| {
                    v.bytes_or_zero("prefix_cache_memory")
                })?,
        };
        let config = QllmConfig {
            policy,
            engine,
            caps,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Sizes above this are refused: no sensible setting comes near it, and it
/// keeps position and buffer arithmetic far from overflow.
const MAX_SIZE: i64 = 1 << 30;

/// Checks a `question_weight` value; `None` keeps `default`.
pub(crate) fn question_weight(value: Option<f64>, default: f32) -> Result<f32> {
    #[allow(clippy::cast_possible_truncation)] // Range-checked just before.
    match value {
        None => Ok(default),
        Some(w) if w.is_finite() && (0.0..=1e6).contains(&w) => Ok(w as f32),
        Some(w) => Err(Error::InvalidConfig {
            key: "question_weight",
            reason: format!("must be a number in [0, 1e6], got {w}"),
        }),
    }
}

/// Checks a size value; `None` keeps `default`.
pub(crate) fn size(
    key: &'static str,
    value: Option<i64>,
    default: usize,
    min: i64,
) -> Result<usize> {
    let Some(v) = value else {
        return Ok(default);
    };
    let what = if min == 0 {
        "a non-negative integer"
    } else {
        "a positive integer"
    };
    if v < min {
        return Err(Error::InvalidConfig {
            key,
            reason: format!("must be {what}, got {v}"),
        });
    }
    if v > MAX_SIZE {
        return Err(Error::InvalidConfig {
            key,
            reason: format!("is too large: {v} (at most {MAX_SIZE})"),
        });
    }
    usize::try_from(v).map_err(|_| Error::InvalidConfig {
        key,
        reason: format!("is too large: {v}"),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::config::{BlockStorage, Read};

    fn parse(text: &str) -> std::result::Result<QllmConfig, String> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_the_1k_qllm_preset() {
        let config = parse("").unwrap();
        assert_eq!(config, QllmConfig::default());
        assert_eq!(config.policy.mode, Mode::Qllm);
        assert_eq!(
            (
                config.policy.n_init,
                config.policy.n_local,
                config.policy.block_size,
                config.policy.topk
            ),
            (128, 512, 64, 8)
        );
    }

    #[test]
    fn presets_set_the_papers_budgets_and_keys_override_them() {
        let config = parse("preset = \"2k\"\nmode = \"infllm\"\ntopk = 3").unwrap();
        assert_eq!(config.policy.mode, Mode::Infllm);
        assert_eq!(
            (
                config.policy.n_local,
                config.policy.block_size,
                config.policy.exc_block_size,
                config.policy.topk
            ),
            (1024, 128, 512, 3)
        );
        let config = parse("preset = \"infllm\"").unwrap();
        assert_eq!((config.policy.n_local, config.policy.topk), (4096, 16));
    }

    #[test]
    fn block_dtype_is_parsed_and_checked() {
        let file: ConfigFile = toml::from_str("block_dtype = \"bf16\"").unwrap();
        let config = file.resolve().unwrap();
        assert_eq!(config.policy.block_dtype, BlockDType::Bf16);
        assert_eq!(
            config.policy.block_dtype.resolve(DType::F32),
            BlockStorage::Float(DType::BF16)
        );
        assert_eq!(
            BlockDType::Model.resolve(DType::F16),
            BlockStorage::Float(DType::F16)
        );
        let file: ConfigFile = toml::from_str("block_dtype = \"q8_0\"").unwrap();
        let config = file.resolve().unwrap();
        assert_eq!(
            config.policy.block_dtype.resolve(DType::BF16),
            BlockStorage::Q8
        );
        // A 64-value row: 64 bytes and a 4-byte scale, against 128 in bf16.
        assert_eq!(BlockStorage::Q8.row_bytes(64), 68);
        assert_eq!(BlockStorage::Float(DType::BF16).row_bytes(64), 128);
        let err = toml::from_str::<ConfigFile>("block_dtype = \"int4\"").unwrap_err();
        assert!(err.to_string().contains("int4"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("n_lcoal = 4").unwrap_err();
        assert!(err.contains("n_lcoal"), "{err}");
    }

    #[test]
    fn negative_and_zero_sizes_are_named() {
        for (text, message) in [
            (
                "prefill_chunk_size = -3",
                "`prefill_chunk_size` must be a positive integer",
            ),
            (
                "prefill_chunk_size = 0",
                "`prefill_chunk_size` must be a positive integer",
            ),
            ("n_local = 0", "`n_local` must be a positive integer"),
            ("topk = -1", "`topk` must be a non-negative integer"),
            ("block_size = 4000000000000", "`block_size` is too large"),
            ("topk = 100000", "`topk` is too large: 100000 (at most 4096"),
            ("max_memory = 0", "`max_memory` must be a positive size"),
            (
                "max_memory = \"8 gigs\"",
                "`max_memory` cannot be read as a size",
            ),
            (
                "max_request_memory = -1",
                "`max_request_memory` must be a positive size",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(message), "{text}: {err}");
        }
    }

    #[test]
    fn memory_limits_take_bytes_or_sizes_with_units() {
        let config = parse("max_memory = \"8GiB\"\nmax_request_memory = 1000000").unwrap();
        assert_eq!(config.caps.max_memory, Some(8 << 30));
        assert_eq!(config.caps.max_request_memory, Some(1_000_000));
        assert_eq!(parse("").unwrap().caps.max_memory, None);
        let caps = |text| parse(text).unwrap().caps.prefix_cache_memory;
        assert_eq!(caps(""), DEFAULT_PREFIX_CACHE_MEMORY);
        assert_eq!(caps("prefix_cache_memory = 0"), 0);
        assert_eq!(caps("prefix_cache_memory = \"0\""), 0);
        assert_eq!(caps("prefix_cache_memory = \"512MiB\""), 512 << 20);
        let err = parse("prefix_cache_memory = -5").unwrap_err().to_string();
        assert!(
            err.contains("`prefix_cache_memory` must be a positive size"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_values_are_named() {
        let err = parse("n_local = 128\nexc_block_size = 256").unwrap_err();
        assert!(
            err.contains("`exc_block_size` (256) must not exceed `n_local` (128)"),
            "{err}"
        );
        let err = parse("prefill_chunk_size = 768").unwrap_err();
        assert!(
            err.contains("`prefill_chunk_size` (768) must be a multiple of `exc_block_size` (512)"),
            "{err}"
        );
        assert!(parse("prefill_chunk_size = 1024").is_ok());
        let err = Policy {
            exc_block_size: 0,
            ..Policy::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("`exc_block_size` must be a positive integer"),
            "{err}"
        );
        assert!(parse("mode = \"dense\"\nprefill_chunk_size = 768").is_ok());
        let err = parse("block_size = 2\nrepr_topk = 4").unwrap_err();
        assert!(err.contains("`repr_topk`"), "{err}");
        let err = parse("question_weight = -1.0").unwrap_err();
        assert!(err.contains("`question_weight`"), "{err}");
        let err = parse("question_weight = nan").unwrap_err();
        assert!(err.contains("`question_weight`"), "{err}");
        let err = parse("topk = 4\nneighbours = 4").unwrap_err();
        assert!(
            err.contains("`neighbours` (4) must be less than `topk` (4)"),
            "{err}"
        );
        let err = parse("consensus = 8").unwrap_err();
        assert!(
            err.contains("`consensus` (8) must be less than `topk` (8)"),
            "{err}"
        );
        let err = parse("consensus = -1").unwrap_err();
        assert!(err.contains("`consensus`"), "{err}");
        assert_eq!(parse("consensus = 2").unwrap().policy.consensus, 2);
        let err = parse("question_topk = 513").unwrap_err();
        assert!(err.contains("`question_topk` is too large: 513"), "{err}");
        assert_eq!(parse("").unwrap().policy.answer_refresh, 1);
        assert_eq!(
            parse("answer_refresh = 4").unwrap().policy.answer_refresh,
            4
        );
        let err = parse("answer_refresh = 0").unwrap_err();
        assert!(
            err.contains("`answer_refresh` must be a positive integer, got 0"),
            "{err}"
        );
        let err = parse("answer_refresh = 65").unwrap_err();
        assert!(
            err.contains("`answer_refresh` must be between 1 and 64 decode steps"),
            "{err}"
        );
        let pool = parse("answer_refresh = 8\nanswer_pool = 32")
            .unwrap()
            .policy;
        assert_eq!((pool.answer_refresh, pool.answer_pool), (8, 32));
        assert_eq!(parse("").unwrap().policy.answer_pool, 0);
        for (text, says) in [
            ("answer_pool = 32", "needs `answer_refresh` of 2 or more"),
            (
                "answer_refresh = 8\nanswer_pool = 32\nscoring = \"dot\"",
                "needs `scoring = \"attention_mass\"`",
            ),
            (
                "answer_refresh = 8\nanswer_pool = 32\nanswer_mass_candidates = 64",
                "cannot be set with `answer_mass_candidates`",
            ),
            (
                "answer_refresh = 8\nanswer_pool = 4",
                "must be between the blocks a decode step retrieves (8) and 4096, got 4",
            ),
            (
                "answer_refresh = 8\nanswer_pool = -1",
                "a non-negative integer",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                err.contains("`answer_pool`") && err.contains(says),
                "{text}: {err}"
            );
        }
        let err = parse("answer_topk = 600").unwrap_err();
        assert!(err.contains("`answer_topk` is too large: 600"), "{err}");
        assert_eq!(
            parse("question_topk = 256").unwrap().policy.question_topk,
            256
        );
        let err = parse("scoring = \"dot\"\nmass_candidates = 64").unwrap_err();
        assert!(
            err.contains("`mass_candidates`")
                && err.contains("needs `scoring = \"attention_mass\"`"),
            "{err}"
        );
        let err = parse("mass_candidates = -1").unwrap_err();
        assert!(err.contains("`mass_candidates`"), "{err}");
        assert_eq!(
            parse("mass_candidates = 64")
                .unwrap()
                .policy
                .mass_candidates,
            64
        );
    }

    #[test]
    fn decode_steps_read_candidate_blocks_only_with_attention_mass() {
        let exact = parse("").unwrap().policy;
        assert_eq!(exact.mass_candidates_for(Read::Answer), 0);
        assert!(!exact.keeps_key_moments());
        let decode = parse("answer_mass_candidates = 64").unwrap().policy;
        assert_eq!(decode.mass_candidates_for(Read::Prompt), 0);
        assert_eq!(decode.mass_candidates_for(Read::Question), 0);
        assert_eq!(decode.mass_candidates_for(Read::Answer), 64);
        assert!(decode.keeps_key_moments());
        let both = parse("mass_candidates = 32\nanswer_mass_candidates = 64")
            .unwrap()
            .policy;
        assert_eq!(
            (
                both.mass_candidates_for(Read::Prompt),
                both.mass_candidates_for(Read::Answer)
            ),
            (32, 64)
        );
        // The paper's scoring reads no keys: a value given for it is
        // refused rather than ignored.
        let err = parse("scoring = \"dot\"\nanswer_mass_candidates = 32").unwrap_err();
        assert!(
            err.contains("`answer_mass_candidates`")
                && err.contains("needs `scoring = \"attention_mass\"`"),
            "{err}"
        );
        assert!(parse("scoring = \"dot\"\nanswer_mass_candidates = 0").is_ok());
        let err = parse("answer_mass_candidates = -4").unwrap_err();
        assert!(err.contains("`answer_mass_candidates`"), "{err}");
    }

    #[test]
    fn boundaries_are_parsed_and_set_the_smallest_advance() {
        let config = parse("boundaries = \"sentence\"").unwrap();
        assert_eq!(config.policy.boundaries, Boundaries::Sentence);
        assert_eq!(config.policy.min_block_advance(), 32);
        assert_eq!(Policy::default().boundaries, Boundaries::Fixed);
        assert_eq!(Policy::default().min_block_advance(), 64);
        let err = parse("boundaries = \"paragraph\"").unwrap_err();
        assert!(err.contains("paragraph"), "{err}");
    }

    #[test]
    fn positions_are_parsed_and_bound_the_rope_table_needed() {
        let config = parse("positions = \"ordered\"\nneighbours = 1\nquestion_topk = 0").unwrap();
        assert_eq!(
            (config.policy.positions, config.policy.neighbours),
            (Positions::Ordered, 1)
        );
        // 1k preset: 128 sinks + 9 blocks of 64 + 2 x 512 + 512; more blocks
        // at the question need more positions.
        assert_eq!(config.policy.positions_needed(), 128 + 9 * 64 + 1024 + 512);
        let wide = parse("positions = \"ordered\"\nquestion_topk = 60").unwrap();
        assert_eq!(wide.policy.positions_needed(), 128 + 61 * 64 + 1024 + 512);
        assert_eq!(Policy::default().positions_needed(), 512 + 512 - 1);
        // Interpolated: the window and a position beside it, whatever
        // `question_topk` is (memory keys are squeezed into what is left).
        let squeezed = parse("positions = \"interpolated\"\nquestion_topk = 256").unwrap();
        assert_eq!(
            (
                squeezed.policy.positions,
                squeezed.policy.positions_needed()
            ),
            (Positions::Interpolated, 512 + 512)
        );
        let config = parse("scoring = \"attention_mass\"\nselection = \"per_kv_head\"").unwrap();
        assert_eq!(
            (config.policy.scoring, config.policy.selection),
            (Scoring::AttentionMass, Selection::PerKvHead)
        );
        assert!(parse("selection = \"per_head\"")
            .unwrap_err()
            .contains("per_head"));
        assert!(parse("scoring = \"cosine\"")
            .unwrap_err()
            .contains("cosine"));
        let err = parse("positions = \"absolute\"").unwrap_err();
        assert!(err.contains("absolute"), "{err}");
    }

    #[test]
    fn modes_and_presets_parse_from_strings() {
        assert_eq!("streaming".parse::<Mode>(), Ok(Mode::Streaming));
        assert_eq!("2k".parse::<Preset>(), Ok(Preset::Budget2k));
        assert!("full".parse::<Mode>().unwrap_err().contains("full"));
    }

    #[test]
    fn unknown_mode_and_preset_are_rejected() {
        let err = parse("mode = \"sparse\"").unwrap_err();
        assert!(err.contains("sparse"), "{err}");
        let err = parse("preset = \"4k\"").unwrap_err();
        assert!(err.contains("4k"), "{err}");
    }

    #[test]
    fn question_token_rows_need_attention_mass_scoring() {
        let config = parse("question_rows = \"tokens\"").unwrap();
        assert_eq!(config.policy.question_rows, QuestionRows::Tokens);
        let err = parse("question_rows = \"tokens\"\nscoring = \"dot\"").unwrap_err();
        assert!(
            err.contains("question_rows") && err.contains("attention_mass"),
            "{err}"
        );
        assert!(parse("question_rows = \"all\"")
            .unwrap_err()
            .contains("all"));
    }

    #[test]
    fn question_vectors_are_in_line_unless_the_probe_is_asked_for() {
        assert_eq!(
            parse("").unwrap().policy.question_vectors,
            QuestionVectors::InLine
        );
        let config = parse("question_vectors = \"probe\"").unwrap();
        assert_eq!(config.policy.question_vectors, QuestionVectors::Probe);
        let err = parse("question_vectors = \"both\"").unwrap_err();
        assert!(err.contains("both") && err.contains("in_line"), "{err}");
    }
}

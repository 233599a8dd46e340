//! Configuration: a TOML file with every knob optional, resolved into a
//! validated [`QllmConfig`] that the hook reads.

use std::path::Path;
use std::str::FromStr;

use candle_core::DType;
use serde::de::IntoDeserializer;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits::SizeValue;

/// Which attention policy the hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Q-LLM: block memory retrieved by the current queries plus the
    /// question.
    Qllm,
    /// InfLLM: the same block memory, retrieved by the current queries only.
    Infllm,
    /// StreamingLLM-style: attention sinks plus the local window; evicted
    /// tokens are dropped, no memory blocks.
    Streaming,
    /// Full causal attention over a KV store kept by the hook.
    Dense,
}

impl Mode {
    /// Whether evicted tokens are kept as retrievable blocks.
    pub fn keeps_blocks(self) -> bool {
        matches!(self, Mode::Qllm | Mode::Infllm)
    }

    /// Whether the question steers retrieval.
    pub fn uses_question(self) -> bool {
        self == Mode::Qllm
    }
}

/// Budgets of the Q-LLM paper's released configs (`n_local + topk *
/// block_size` keys besides the sinks), and InfLLM's own default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Preset {
    /// `n_local` 256, 4 blocks of 64, execution blocks of 256.
    #[serde(rename = "512")]
    Budget512,
    /// `n_local` 512, 8 blocks of 64, execution blocks of 512.
    #[serde(rename = "1k")]
    Budget1k,
    /// `n_local` 1024, 8 blocks of 128, execution blocks of 512.
    #[serde(rename = "2k")]
    Budget2k,
    /// InfLLM's repository default: `n_local` 4096, 16 blocks of 128.
    #[serde(rename = "infllm")]
    InfllmDefault,
}

/// Parses a config file's string value, e.g. `"qllm"` or `"1k"`.
fn from_config_str<T: for<'de> Deserialize<'de>>(s: &str) -> std::result::Result<T, String> {
    T::deserialize(s.into_deserializer()).map_err(|e: serde::de::value::Error| e.to_string())
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        from_config_str(s)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Qllm => "qllm",
            Mode::Infllm => "infllm",
            Mode::Streaming => "streaming",
            Mode::Dense => "dense",
        })
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        from_config_str(s)
    }
}

/// How memory blocks are ranked for retrieval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// The paper's: the dot product of the (question-weighted) query with a
    /// block's representative, summed over all heads.
    Dot,
    /// TokenSelect's: the same dot product per KV head (its query heads
    /// summed), softmax-normalised over the blocks per KV head, then summed:
    /// every head votes with the same weight, whatever its logits' scale.
    HeadSoftmax,
    /// A block's best token: the highest dot product of the query with any
    /// of its keys (summed over heads), as token-level selection does. Reads
    /// every stored key per retrieval, so it costs in proportion to the
    /// context.
    TokenMax,
    /// The share of attention full attention would give each block: per
    /// query head, a softmax over every stored key of the execution block's
    /// mean query (and, as a second row weighted by `question_weight`, of
    /// the question vector), summed over the block's tokens, then over
    /// heads. Every head spends one unit, whatever its logits' scale. Reads
    /// every stored key per retrieval, like `token_max`. The default.
    #[default]
    AttentionMass,
}

impl FromStr for Scoring {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        from_config_str(s)
    }
}

impl std::fmt::Display for Scoring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scoring::Dot => "dot",
            Scoring::HeadSoftmax => "head_softmax",
            Scoring::TokenMax => "token_max",
            Scoring::AttentionMass => "attention_mass",
        })
    }
}

/// Which heads share a retrieval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The paper's: one set of `topk` blocks per layer, scored over all
    /// heads together.
    Shared,
    /// Every KV head ranks the blocks by its own query heads' scores and
    /// attends its own `topk` (as TokenSelect and InfiniteHiP select per
    /// head): a block that matters to a few heads is not outvoted by the
    /// rest. Same budget per head, so the same attention cost. The default.
    #[default]
    PerKvHead,
}

impl FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        from_config_str(s)
    }
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Selection::Shared => "shared",
            Selection::PerKvHead => "per_kv_head",
        })
    }
}

/// What the question contributes to `attention_mass` scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionRows {
    /// The paper's question vector: per head, the mean query of the
    /// question's `repr_topk` most attended tokens, as one row.
    #[default]
    Mean,
    /// Every question token's query as a row of its own (up to
    /// [`MAX_QUESTION_ROWS`] per head, the most attended first), the rows
    /// sharing `question_weight`: a rare name in the question finds the
    /// block that holds it instead of being averaged away. Only with
    /// `attention_mass` scoring.
    Tokens,
}

/// Question tokens kept as rows per head with `question_rows = "tokens"`.
pub const MAX_QUESTION_ROWS: usize = 64;

impl FromStr for QuestionRows {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        from_config_str(s)
    }
}

impl std::fmt::Display for QuestionRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuestionRows::Mean => "mean",
            QuestionRows::Tokens => "tokens",
        })
    }
}

/// Where memory tokens sit for RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// The paper's: every token outside the local window (sinks, retrieved
    /// blocks, older recent tokens) at one distance, `n_local` - 1, from
    /// the query.
    #[default]
    Fixed,
    /// Sinks, retrieved blocks (in their original order), older recent
    /// tokens and the local window at consecutive positions, as ReAttention
    /// and LongHeads place them: a retrieved sentence keeps its word order.
    /// Still within `n_init + (topk + 1) * block_size + 2 * exc_block_size +
    /// n_local` positions.
    Ordered,
}

impl FromStr for Positions {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        from_config_str(s)
    }
}

impl std::fmt::Display for Positions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Positions::Fixed => "fixed",
            Positions::Ordered => "ordered",
        })
    }
}

/// The dtype memory blocks are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockDType {
    /// The model's compute dtype.
    #[default]
    Model,
    /// bfloat16: half the bytes of f32, the exponent range of f32.
    Bf16,
    /// float16.
    F16,
    /// float32.
    F32,
}

impl BlockDType {
    /// The dtype for a model computing in `model`.
    pub fn resolve(self, model: DType) -> DType {
        match self {
            BlockDType::Model => model,
            BlockDType::Bf16 => DType::BF16,
            BlockDType::F16 => DType::F16,
            BlockDType::F32 => DType::F32,
        }
    }
}

/// Validated settings the hook runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QllmConfig {
    /// The attention policy.
    pub mode: Mode,
    /// Attention sinks: the first tokens of a sequence, always attended.
    pub n_init: usize,
    /// Local window: each query attends its last `n_local` tokens with exact
    /// relative positions.
    pub n_local: usize,
    /// Tokens per memory block.
    pub block_size: usize,
    /// Prompt tokens that share one retrieval.
    pub exc_block_size: usize,
    /// Memory blocks retrieved per execution block and layer.
    pub topk: usize,
    /// Most-attended tokens averaged into a block's representative key.
    pub repr_topk: usize,
    /// Weight of the question vector in the retrieval score.
    pub question_weight: f32,
    /// What the question contributes to `attention_mass` scoring.
    pub question_rows: QuestionRows,
    /// Where memory tokens sit for RoPE.
    pub positions: Positions,
    /// How blocks are ranked for retrieval.
    pub scoring: Scoring,
    /// Whether the KV heads share one retrieval or make their own.
    pub selection: Selection,
    /// Blocks after each retrieved block attended with it (EM-LLM's
    /// contiguity), within the same `topk` budget: a fact cut by a block
    /// boundary is read whole.
    pub neighbours: usize,
    /// Prompts longer than this are fed to the model in chunks of this size.
    pub prefill_chunk_size: usize,
    /// Longest prompt accepted (replaces the model's own limit; not in
    /// `dense` mode, which keeps it).
    pub max_context_len: usize,
    /// Storage dtype of memory blocks (the bulk of a long context's memory).
    pub block_dtype: BlockDType,
    /// Cap on the state of all sequences together, in bytes: a request that
    /// would go over it is refused before any work.
    pub max_memory: Option<usize>,
    /// Cap on the state of one request (all its sequences), in bytes.
    pub max_request_memory: Option<usize>,
}

impl QllmConfig {
    /// Full attention over the hook's own KV store.
    pub fn dense() -> Self {
        Self {
            mode: Mode::Dense,
            ..Self::preset(Preset::Budget1k)
        }
    }

    /// This config with `preset`'s budget: its `n_local`, `block_size`,
    /// `exc_block_size` and `topk`.
    pub fn with_preset(self, preset: Preset) -> Self {
        let budget = Self::preset(preset);
        Self {
            n_local: budget.n_local,
            block_size: budget.block_size,
            exc_block_size: budget.exc_block_size,
            topk: budget.topk,
            ..self
        }
    }

    /// Q-LLM with one of the paper's budgets.
    pub fn preset(preset: Preset) -> Self {
        let (n_local, block_size, topk, exc_block_size) = match preset {
            Preset::Budget512 => (256, 64, 4, 256),
            Preset::Budget1k => (512, 64, 8, 512),
            Preset::Budget2k => (1024, 128, 8, 512),
            Preset::InfllmDefault => (4096, 128, 16, 512),
        };
        Self {
            mode: Mode::Qllm,
            n_init: 128,
            n_local,
            block_size,
            exc_block_size,
            topk,
            repr_topk: 4,
            question_weight: 1.0,
            question_rows: QuestionRows::Mean,
            positions: Positions::Fixed,
            // Not the paper's (`dot`, `shared`): with them a one-sentence
            // fact in prose 12K tokens deep is retrieved by at most 2 of
            // SmolLM2's 30 layers, with these by 8-10 (README, diagnosis).
            scoring: Scoring::AttentionMass,
            selection: Selection::PerKvHead,
            neighbours: 0,
            prefill_chunk_size: 512,
            max_context_len: 1 << 20,
            block_dtype: BlockDType::Model,
            max_memory: None,
            max_request_memory: None,
        }
    }

    /// RoPE positions the policy may use: the model's table must cover them.
    pub fn positions_needed(&self) -> usize {
        match self.positions {
            Positions::Fixed => self.n_local + self.exc_block_size - 1,
            // Sinks, retrieved blocks, older recent tokens (fewer than a block
            // plus an execution block) and the window of an execution block.
            Positions::Ordered => {
                self.n_init
                    + (self.topk + 1) * self.block_size
                    + 2 * self.exc_block_size
                    + self.n_local
            }
        }
    }

    /// Checks the values against each other.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key, reason: String| Err(Error::InvalidConfig { key, reason });
        // The file's keys are checked as they are read; a config built in
        // code is checked here.
        for (key, value) in [
            ("n_local", self.n_local),
            ("block_size", self.block_size),
            ("exc_block_size", self.exc_block_size),
            ("repr_topk", self.repr_topk),
            ("prefill_chunk_size", self.prefill_chunk_size),
            ("max_context_len", self.max_context_len),
        ] {
            if value == 0 {
                return invalid(key, "must be a positive integer, got 0".into());
            }
        }
        if self.exc_block_size > self.n_local {
            return invalid(
                "exc_block_size",
                format!(
                    "({}) must not exceed `n_local` ({})",
                    self.exc_block_size, self.n_local
                ),
            );
        }
        // Retrieval runs once per execution block, cut at multiples of
        // `exc_block_size`; a prompt chunk ending inside one would split it
        // into two retrievals, so the answer would depend on the chunking.
        if self.mode != Mode::Dense && !self.prefill_chunk_size.is_multiple_of(self.exc_block_size)
        {
            return invalid(
                "prefill_chunk_size",
                format!(
                    "({}) must be a multiple of `exc_block_size` ({}): prompt chunks must end \
                     where execution blocks do",
                    self.prefill_chunk_size, self.exc_block_size
                ),
            );
        }
        if self.repr_topk > self.block_size {
            return invalid(
                "repr_topk",
                format!(
                    "({}) must not exceed `block_size` ({})",
                    self.repr_topk, self.block_size
                ),
            );
        }
        if self.topk > MAX_TOPK {
            return invalid(
                "topk",
                format!(
                    "is too large: {} (at most {MAX_TOPK} blocks per retrieval)",
                    self.topk
                ),
            );
        }
        if self.neighbours >= self.topk.max(1) {
            return invalid(
                "neighbours",
                format!(
                    "({}) must be less than `topk` ({}): each retrieved block brings that many \
                     neighbours within the `topk` budget",
                    self.neighbours, self.topk
                ),
            );
        }
        if self.question_rows == QuestionRows::Tokens && self.scoring != Scoring::AttentionMass {
            return invalid(
                "question_rows",
                format!(
                    "\"tokens\" needs `scoring = \"attention_mass\"` (got \"{}\"): the other \
                     scorings read the question as one vector",
                    self.scoring
                ),
            );
        }
        if !self.question_weight.is_finite() || self.question_weight < 0.0 {
            return invalid(
                "question_weight",
                format!("must be a finite number >= 0, got {}", self.question_weight),
            );
        }
        Ok(())
    }
}

impl Default for QllmConfig {
    fn default() -> Self {
        Self::preset(Preset::Budget1k)
    }
}

/// The config file as written: every key optional, unknown keys rejected.
///
/// ```
/// let file: qllm::ConfigFile = toml::from_str("preset = \"512\"\ntopk = 6")?;
/// let config = file.resolve()?;
/// assert_eq!((config.n_local, config.topk), (256, 6));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// See [`QllmConfig::mode`].
    pub mode: Option<Mode>,
    /// Starting point for the sizes below; `1k` when absent.
    pub preset: Option<Preset>,
    // Sizes are signed so that a negative value gets a message naming the
    // key rather than a type error.
    /// See [`QllmConfig::n_init`].
    pub n_init: Option<i64>,
    /// See [`QllmConfig::n_local`].
    pub n_local: Option<i64>,
    /// See [`QllmConfig::block_size`].
    pub block_size: Option<i64>,
    /// See [`QllmConfig::exc_block_size`].
    pub exc_block_size: Option<i64>,
    /// See [`QllmConfig::topk`].
    pub topk: Option<i64>,
    /// See [`QllmConfig::repr_topk`].
    pub repr_topk: Option<i64>,
    /// See [`QllmConfig::question_weight`].
    pub question_weight: Option<f64>,
    /// See [`QllmConfig::question_rows`].
    pub question_rows: Option<QuestionRows>,
    /// See [`QllmConfig::positions`].
    pub positions: Option<Positions>,
    /// See [`QllmConfig::scoring`].
    pub scoring: Option<Scoring>,
    /// See [`QllmConfig::selection`].
    pub selection: Option<Selection>,
    /// See [`QllmConfig::neighbours`].
    pub neighbours: Option<i64>,
    /// See [`QllmConfig::prefill_chunk_size`].
    pub prefill_chunk_size: Option<i64>,
    /// See [`QllmConfig::max_context_len`].
    pub max_context_len: Option<i64>,
    /// See [`QllmConfig::block_dtype`].
    pub block_dtype: Option<BlockDType>,
    /// See [`QllmConfig::max_memory`]: bytes, or a size such as `"8GiB"`.
    pub max_memory: Option<SizeValue>,
    /// See [`QllmConfig::max_request_memory`]: bytes, or a size such as
    /// `"2GiB"`.
    pub max_request_memory: Option<SizeValue>,
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
        let base = QllmConfig::preset(self.preset.unwrap_or(Preset::Budget1k));
        let question_weight = question_weight(self.question_weight, base.question_weight)?;
        let config = QllmConfig {
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
            question_weight,
            question_rows: self.question_rows.unwrap_or(base.question_rows),
            positions: self.positions.unwrap_or(base.positions),
            scoring: self.scoring.unwrap_or(base.scoring),
            selection: self.selection.unwrap_or(base.selection),
            neighbours: size("neighbours", self.neighbours, base.neighbours, 0)?,
            prefill_chunk_size: size(
                "prefill_chunk_size",
                self.prefill_chunk_size,
                base.prefill_chunk_size,
                1,
            )?,
            max_context_len: size(
                "max_context_len",
                self.max_context_len,
                base.max_context_len,
                1,
            )?,
            block_dtype: self.block_dtype.unwrap_or(base.block_dtype),
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
        };
        config.validate()?;
        Ok(config)
    }
}

/// More blocks than any budget retrieves (4096 blocks of 64 tokens attend
/// 256K tokens per query, which defeats the purpose); larger `topk` values
/// are refused rather than silently capped.
pub const MAX_TOPK: usize = 4096;

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
    use super::*;

    fn parse(text: &str) -> std::result::Result<QllmConfig, String> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_the_1k_qllm_preset() {
        let config = parse("").unwrap();
        assert_eq!(config, QllmConfig::default());
        assert_eq!(config.mode, Mode::Qllm);
        assert_eq!(
            (
                config.n_init,
                config.n_local,
                config.block_size,
                config.topk
            ),
            (128, 512, 64, 8)
        );
    }

    #[test]
    fn presets_set_the_papers_budgets_and_keys_override_them() {
        let config = parse("preset = \"2k\"\nmode = \"infllm\"\ntopk = 3").unwrap();
        assert_eq!(config.mode, Mode::Infllm);
        assert_eq!(
            (
                config.n_local,
                config.block_size,
                config.exc_block_size,
                config.topk
            ),
            (1024, 128, 512, 3)
        );
        let config = parse("preset = \"infllm\"").unwrap();
        assert_eq!((config.n_local, config.topk), (4096, 16));
    }

    #[test]
    fn block_dtype_is_parsed_and_checked() {
        let file: ConfigFile = toml::from_str("block_dtype = \"bf16\"").unwrap();
        let config = file.resolve().unwrap();
        assert_eq!(config.block_dtype, BlockDType::Bf16);
        assert_eq!(config.block_dtype.resolve(DType::F32), DType::BF16);
        assert_eq!(BlockDType::Model.resolve(DType::F16), DType::F16);
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
        assert_eq!(config.max_memory, Some(8 << 30));
        assert_eq!(config.max_request_memory, Some(1_000_000));
        assert_eq!(parse("").unwrap().max_memory, None);
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
        let err = QllmConfig {
            exc_block_size: 0,
            ..QllmConfig::default()
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
    }

    #[test]
    fn positions_are_parsed_and_bound_the_rope_table_needed() {
        let config = parse("positions = \"ordered\"\nneighbours = 1").unwrap();
        assert_eq!(
            (config.positions, config.neighbours),
            (Positions::Ordered, 1)
        );
        // 1k preset: 128 sinks + 9 blocks of 64 + 2 x 512 + 512.
        assert_eq!(config.positions_needed(), 128 + 9 * 64 + 1024 + 512);
        assert_eq!(QllmConfig::default().positions_needed(), 512 + 512 - 1);
        let config = parse("scoring = \"attention_mass\"\nselection = \"per_kv_head\"").unwrap();
        assert_eq!(
            (config.scoring, config.selection),
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
        assert_eq!(config.question_rows, QuestionRows::Tokens);
        let err = parse("question_rows = \"tokens\"\nscoring = \"dot\"").unwrap_err();
        assert!(
            err.contains("question_rows") && err.contains("attention_mass"),
            "{err}"
        );
        assert!(parse("question_rows = \"all\"")
            .unwrap_err()
            .contains("all"));
    }
}

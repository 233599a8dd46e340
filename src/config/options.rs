//! Per-request settings: the `qllm` object of a request body.

use serde::Deserialize;

use super::{
    question_weight, size, Boundaries, Mode, Policy, Positions, Preset, QllmConfig, QuestionRows,
    QuestionVectors, Scoring, Selection,
};
use crate::error::{Error, Result};

/// Per-request settings: the `qllm` object of a request body. Every field is
/// optional; the server's config gives the rest.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestOptions {
    /// `false` serves the request with full attention and the model's own
    /// length limit, as without Q-LLM.
    pub enabled: Option<bool>,
    /// The policy (`qllm`, `infllm`, `streaming`, `dense`).
    pub mode: Option<Mode>,
    /// A budget preset (`512`, `1k`, `2k`, `infllm`): its `n_local`,
    /// `block_size`, `exc_block_size` and `topk` replace the server's.
    pub preset: Option<Preset>,
    /// Memory blocks retrieved per execution block.
    pub topk: Option<i64>,
    /// Local window.
    pub n_local: Option<i64>,
    /// Weight of the question in block retrieval.
    pub question_weight: Option<f64>,
    /// What the question contributes to `attention_mass` scoring (`mean`,
    /// `tokens`).
    pub question_rows: Option<QuestionRows>,
    /// Where memory tokens sit for RoPE (`fixed`, `ordered`).
    pub positions: Option<Positions>,
    /// Blocks per KV head whose keys `attention_mass` reads (0: all).
    pub mass_candidates: Option<i64>,
    /// Blocks per KV head whose keys `attention_mass` reads at a decode step
    /// (0: `mass_candidates`).
    pub answer_mass_candidates: Option<i64>,
    /// Neighbour blocks attended with each retrieved block.
    pub neighbours: Option<i64>,
    /// Blocks of `topk` taken from those the other layers retrieved most.
    pub consensus: Option<i64>,
    /// Blocks retrieved by the question's execution blocks.
    pub question_topk: Option<i64>,
    /// Blocks retrieved by each decode step.
    pub answer_topk: Option<i64>,
    /// Decode steps per retrieval.
    pub answer_refresh: Option<i64>,
    /// Blocks per KV head the decode steps between retrievals rank again.
    pub answer_pool: Option<i64>,
    /// How blocks are ranked (`dot`, `head_softmax`, `token_max`,
    /// `attention_mass`).
    pub scoring: Option<Scoring>,
    /// Whether KV heads share a retrieval (`shared`, `per_kv_head`).
    pub selection: Option<Selection>,
    /// Where memory blocks begin (`fixed`, `sentence`).
    pub boundaries: Option<Boundaries>,
    /// Whether the question is also copied before the document.
    pub question_first: Option<bool>,
    /// Where the question's vectors come from (`in_line`, `probe`).
    pub question_vectors: Option<QuestionVectors>,
    /// `false` reads the whole prompt even when it begins with a kept
    /// prefix, and keeps nothing of this request for later ones.
    pub reuse: Option<bool>,
    /// The question; overrides the one found in the prompt.
    pub question: Option<String>,
    /// Debug: a passage of the prompt to trace; the response's report then
    /// says, per layer, whether the memory blocks holding it were retrieved.
    pub needle: Option<String>,
    /// Debug, from Rust callers that know it: the token span to trace,
    /// instead of `needle`'s text.
    #[serde(skip)]
    pub needle_span: Option<std::ops::Range<usize>>,
}

impl RequestOptions {
    /// The policy of a request whose server runs with `base`: its policy
    /// with these overrides, checked against its engine settings.
    pub fn apply(&self, base: &QllmConfig) -> Result<Policy> {
        let mut config = match self.preset {
            Some(preset) => base.policy.with_preset(preset),
            None => base.policy,
        };
        if let Some(mode) = self.mode {
            config.mode = mode;
        }
        match self.enabled {
            Some(false) => config.mode = Mode::Dense,
            Some(true) if config.mode == Mode::Dense => config.mode = Mode::Qllm,
            _ => {}
        }
        config.topk = size("topk", self.topk, config.topk, 0)?;
        config.n_local = size("n_local", self.n_local, config.n_local, 1)?;
        config.question_weight = question_weight(self.question_weight, config.question_weight)?;
        if let Some(rows) = self.question_rows {
            config.question_rows = rows;
        }
        if let Some(positions) = self.positions {
            config.positions = positions;
        }
        if let Some(scoring) = self.scoring {
            config.scoring = scoring;
        }
        if let Some(selection) = self.selection {
            config.selection = selection;
        }
        if let Some(boundaries) = self.boundaries {
            config.boundaries = boundaries;
        }
        if let Some(first) = self.question_first {
            config.question_first = first;
        }
        if let Some(vectors) = self.question_vectors {
            config.question_vectors = vectors;
        }
        config.mass_candidates = size(
            "mass_candidates",
            self.mass_candidates,
            config.mass_candidates,
            0,
        )?;
        config.answer_mass_candidates = size(
            "answer_mass_candidates",
            self.answer_mass_candidates,
            config.answer_mass_candidates,
            0,
        )?;
        config.neighbours = size("neighbours", self.neighbours, config.neighbours, 0)?;
        config.consensus = size("consensus", self.consensus, config.consensus, 0)?;
        config.question_topk = size("question_topk", self.question_topk, config.question_topk, 0)?;
        config.answer_topk = size("answer_topk", self.answer_topk, config.answer_topk, 0)?;
        config.answer_refresh = size(
            "answer_refresh",
            self.answer_refresh,
            config.answer_refresh,
            1,
        )?;
        config.answer_pool = size("answer_pool", self.answer_pool, config.answer_pool, 0)?;
        for (key, text) in [("question", &self.question), ("needle", &self.needle)] {
            if text.as_ref().is_some_and(|t| t.trim().is_empty()) {
                return Err(Error::InvalidConfig {
                    key,
                    reason: "is empty".into(),
                });
            }
        }
        config.validate_with(&base.engine)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_override_the_server_config() {
        let base = QllmConfig::default();
        let off = RequestOptions {
            enabled: Some(false),
            ..Default::default()
        };
        assert_eq!(off.apply(&base).unwrap().mode, Mode::Dense);
        let tuned = RequestOptions {
            preset: Some(Preset::Budget2k),
            topk: Some(3),
            question_weight: Some(2.0),
            scoring: Some(Scoring::AttentionMass),
            selection: Some(Selection::PerKvHead),
            ..Default::default()
        }
        .apply(&base)
        .unwrap();
        assert_eq!((tuned.n_local, tuned.topk), (1024, 3));
        assert_eq!(
            (tuned.scoring, tuned.selection),
            (Scoring::AttentionMass, Selection::PerKvHead)
        );
        assert!((tuned.question_weight - 2.0).abs() < f32::EPSILON);
        let err = RequestOptions {
            n_local: Some(64),
            ..Default::default()
        }
        .apply(&base)
        .unwrap_err();
        assert!(err.to_string().contains("`exc_block_size`"), "{err}");
        let err = RequestOptions {
            topk: Some(-2),
            ..Default::default()
        }
        .apply(&base)
        .unwrap_err();
        assert!(err.to_string().contains("`topk`"), "{err}");
        let err = RequestOptions {
            question: Some("  ".into()),
            ..Default::default()
        }
        .apply(&base)
        .unwrap_err();
        assert!(err.to_string().contains("`question` is empty"), "{err}");
        let cut: RequestOptions = serde_json::from_str(r#"{"boundaries": "sentence"}"#).unwrap();
        assert_eq!(cut.apply(&base).unwrap().boundaries, Boundaries::Sentence);
        assert!(serde_json::from_str::<RequestOptions>(r#"{"boundaries": "words"}"#).is_err());
        let voted: RequestOptions =
            serde_json::from_str(r#"{"consensus": 2, "question_topk": 64, "answer_topk": 32}"#)
                .unwrap();
        let voted = voted.apply(&base).unwrap();
        assert_eq!(
            (voted.consensus, voted.question_topk, voted.answer_topk),
            (2, 64, 32)
        );
        let err = RequestOptions {
            topk: Some(2),
            consensus: Some(2),
            ..Default::default()
        }
        .apply(&base)
        .unwrap_err();
        assert!(err.to_string().contains("`consensus` (2)"), "{err}");
        let refresh: RequestOptions = serde_json::from_str(r#"{"answer_refresh": 8}"#).unwrap();
        assert_eq!(refresh.apply(&base).unwrap().answer_refresh, 8);
        let err = RequestOptions {
            answer_refresh: Some(0),
            ..Default::default()
        }
        .apply(&base)
        .unwrap_err();
        assert!(err.to_string().contains("`answer_refresh`"), "{err}");
        let pool: RequestOptions =
            serde_json::from_str(r#"{"answer_refresh": 8, "answer_pool": 32}"#).unwrap();
        assert_eq!(pool.apply(&base).unwrap().answer_pool, 32);
        let err = RequestOptions {
            answer_pool: Some(32),
            ..Default::default()
        }
        .apply(&base)
        .unwrap_err();
        assert!(err.to_string().contains("`answer_pool`"), "{err}");
        let bounded: RequestOptions = serde_json::from_str(r#"{"mass_candidates": 48}"#).unwrap();
        assert_eq!(bounded.apply(&base).unwrap().mass_candidates, 48);
        let err = RequestOptions {
            scoring: Some(Scoring::Dot),
            mass_candidates: Some(48),
            ..Default::default()
        }
        .apply(&base)
        .unwrap_err();
        assert!(err.to_string().contains("`mass_candidates`"), "{err}");
        let decode: RequestOptions =
            serde_json::from_str(r#"{"answer_mass_candidates": 64}"#).unwrap();
        assert_eq!(decode.apply(&base).unwrap().answer_mass_candidates, 64);
        let dot = RequestOptions {
            scoring: Some(Scoring::Dot),
            ..Default::default()
        };
        let err = RequestOptions {
            answer_mass_candidates: Some(16),
            ..dot
        }
        .apply(&base)
        .unwrap_err();
        assert!(
            err.to_string().contains("`answer_mass_candidates`"),
            "{err}"
        );
        let err = serde_json::from_str::<RequestOptions>(r#"{"top_k": 3}"#).unwrap_err();
        assert!(err.to_string().contains("top_k"), "{err}");
    }
}

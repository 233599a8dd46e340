//! Query awareness for ordinary requests: per-request settings, the question
//! of a request, and the probe pass that computes the question's vectors
//! before the document is read.
//!
//! The question of a request is, in this order:
//! 1. the `question` field of its [`RequestOptions`] (the `qllm` extension of
//!    an OpenAI request);
//! 2. for chat, found in the last user message by [`find_question`];
//! 3. for a plain completion, found the same way in the prompt.
//!
//! With `mode = "qllm"`, [`prepare`] then runs a probe: the question alone,
//! one token generated, its state thrown away, keeping only each layer's
//! question vector. The real request retrieves with it from its first
//! memory block on, unless its question lies within the first
//! `n_init + n_local` tokens, where the hook captures it in line as the paper
//! does.

use std::sync::Arc;

use mistralrs_core::{MistralRs, NormalRequest, Request, RequestMessage, Response, SamplingParams};
use serde::Deserialize;

use crate::config::{
    question_weight, size, Mode, Positions, Preset, QllmConfig, QuestionRows, Scoring, Selection,
};
use crate::error::{Error, Result};
use crate::eval::tokenize_with;
use crate::hook::{Needle, QllmHook, RequestPlan};

/// Longest question taken from a message by [`find_question`], in bytes.
/// The hook also keeps at most `n_local` of its tokens.
pub const QUESTION_MAX_BYTES: usize = 600;

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
    /// Neighbour blocks attended with each retrieved block.
    pub neighbours: Option<i64>,
    /// How blocks are ranked (`dot`, `head_softmax`, `token_max`,
    /// `attention_mass`).
    pub scoring: Option<Scoring>,
    /// Whether KV heads share a retrieval (`shared`, `per_kv_head`).
    pub selection: Option<Selection>,
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
    /// The settings of a request whose server runs with `base`.
    pub fn apply(&self, base: &QllmConfig) -> Result<QllmConfig> {
        let mut config = match self.preset {
            Some(preset) => base.with_preset(preset),
            None => *base,
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
        config.neighbours = size("neighbours", self.neighbours, config.neighbours, 0)?;
        for (key, text) in [("question", &self.question), ("needle", &self.needle)] {
            if text.as_ref().is_some_and(|t| t.trim().is_empty()) {
                return Err(Error::InvalidConfig {
                    key,
                    reason: "is empty".into(),
                });
            }
        }
        config.validate()?;
        Ok(config)
    }
}

/// Where a request's question came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuestionSource {
    /// The `question` field of the request options.
    Explicit,
    /// The final paragraph of the last user message (or of the prompt).
    Last,
    /// The first paragraph of the last user message, a question followed by
    /// a document.
    First,
}

impl std::fmt::Display for QuestionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuestionSource::Explicit => "the request's `question` field",
            QuestionSource::Last => "the end of the last user message",
            QuestionSource::First => "the start of the last user message",
        })
    }
}

/// The question found in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Its text.
    pub text: String,
    /// Where it came from.
    pub source: QuestionSource,
}

/// The question of a request's messages: for chat, in the last user message
/// (system prompts and earlier turns are ignored); for a completion, in the
/// prompt. Within that text, split into paragraphs at blank lines:
/// - the final paragraph, if it contains a `?` or is the only one;
/// - else the first paragraph, if it contains a `?` and is at most
///   [`QUESTION_MAX_BYTES`] long (a question before its document);
/// - else the final paragraph (an instruction such as "Summarise the text.").
///
/// A paragraph longer than [`QUESTION_MAX_BYTES`] is cut to its last
/// sentences within that length. `None` when there is no user text.
pub fn find_question(messages: &RequestMessage) -> Option<Question> {
    let text = match messages {
        RequestMessage::Chat { messages, .. } | RequestMessage::MultimodalChat { messages, .. } => {
            messages
                .iter()
                .rev()
                .find(|m| {
                    m.get("role")
                        .and_then(|r| r.as_ref().left())
                        .is_some_and(|r| r == "user")
                })
                .map(|m| message_text(m.get("content")))?
        }
        RequestMessage::Completion { text, .. } => text.clone(),
        _ => return None,
    };
    question_in_text(&text)
}

/// Bytes of text in a request's messages (the prompt without its template),
/// if it is given as text.
fn prompt_bytes(messages: &RequestMessage) -> Option<usize> {
    match messages {
        RequestMessage::Chat { messages, .. } | RequestMessage::MultimodalChat { messages, .. } => {
            Some(
                messages
                    .iter()
                    .map(|m| message_text(m.get("content")).len())
                    .sum(),
            )
        }
        RequestMessage::Completion { text, .. } => Some(text.len()),
        _ => None,
    }
}

/// The text parts of a message's content.
fn message_text(content: Option<&mistralrs_core::MessageContent>) -> String {
    match content {
        None => String::new(),
        Some(either::Either::Left(text)) => text.clone(),
        Some(either::Either::Right(parts)) => parts
            .iter()
            .filter(|part| part.get("type").and_then(|t| t.as_str()) == Some("text"))
            .filter_map(|part| part.get("text").and_then(|t| t.as_str()))
            .collect::<Vec<_>>()
            .join("\n\n"),
    }
}

/// [`find_question`]'s rule on one text.
pub fn question_in_text(text: &str) -> Option<Question> {
    let paragraphs: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let (&first, &last) = (paragraphs.first()?, paragraphs.last()?);
    let (text, source) = if last.contains('?') || paragraphs.len() == 1 {
        (last, QuestionSource::Last)
    } else if first.contains('?') && first.len() <= QUESTION_MAX_BYTES {
        (first, QuestionSource::First)
    } else {
        (last, QuestionSource::Last)
    };
    Some(Question {
        text: last_sentences(text, QUESTION_MAX_BYTES).to_string(),
        source,
    })
}

/// The longest tail of `text` of at most `max` bytes that starts at a
/// sentence (or, failing that, a word) boundary.
fn last_sentences(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = text.len() - max;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let tail = &text[cut..];
    let sentence = tail
        .match_indices(['.', '?', '!', '\n'])
        .map(|(i, m)| i + m.len())
        .find(|&i| i < tail.len() && !tail[i..].trim().is_empty());
    let word = tail.find(char::is_whitespace);
    match sentence.or(word) {
        Some(at) => tail[at..].trim_start(),
        None => tail,
    }
}

/// Removes a request's settings from the hook when dropped: keep it until
/// the request's response is complete.
#[derive(Debug)]
pub struct RequestGuard {
    hook: Arc<QllmHook>,
    request_id: usize,
}

impl RequestGuard {
    /// The id of the request it covers.
    pub fn request_id(&self) -> usize {
        self.request_id
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.hook.forget_request(self.request_id);
    }
}

/// What [`prepare`] did for a request.
#[derive(Debug)]
pub struct Prepared {
    /// Keeps the request's settings alive.
    pub guard: RequestGuard,
    /// The settings the request runs with.
    pub config: QllmConfig,
    /// The question, if any.
    pub question: Option<Question>,
    /// Tokens of the question (no special tokens).
    pub question_tokens: usize,
    /// Whether a probe pass computed the question's vectors.
    pub probed: bool,
}

/// Registers `request`'s settings with `hook` (from `options` over the
/// hook's config), finds its question and, in `qllm` mode, runs the probe
/// pass. Call before sending the request; keep the returned guard until its
/// response is complete.
pub async fn prepare(
    mistralrs: &MistralRs,
    hook: &Arc<QllmHook>,
    request: &NormalRequest,
    options: &RequestOptions,
) -> Result<Prepared> {
    let config = options.apply(hook.config())?;
    let question = match &options.question {
        Some(text) => Some(Question {
            text: text.clone(),
            source: QuestionSource::Explicit,
        }),
        None => find_question(&request.messages),
    };
    if let (Some(q), Some(prompt_bytes)) = (&question, prompt_bytes(&request.messages)) {
        // Caught here, before the probe pass would run it through the model;
        // the hook compares tokens once the engine has tokenized the prompt.
        if q.text.len() > prompt_bytes {
            return Err(Error::Refused(format!(
                "qllm: the question ({} bytes) is longer than the prompt ({prompt_bytes} \
                 bytes); the question must be part of the prompt",
                q.text.len()
            )));
        }
    }
    let mut question_tokens = Vec::new();
    if let (Some(q), true) = (&question, config.mode.uses_question()) {
        question_tokens = tokenize_with(mistralrs, &q.text, false).await?;
        tracing::info!(
            "qllm: request {}: question from {} ({} tokens): {:?}",
            request.id,
            q.source,
            question_tokens.len(),
            q.text
        );
    } else if config.mode.uses_question() {
        tracing::info!("qllm: request {}: no question found", request.id);
    }
    let guard = RequestGuard {
        hook: hook.clone(),
        request_id: request.id,
    };
    let needle = match (&options.needle_span, &options.needle) {
        (Some(span), _) => Some(Needle::Span(span.clone())),
        (None, Some(text)) => Some(Needle::Tokens(tokenize_with(mistralrs, text, false).await?)),
        (None, None) => None,
    };
    let plan = RequestPlan {
        config,
        question: (!question_tokens.is_empty()).then(|| question_tokens.clone()),
        probe_for: None,
        needle,
    };
    hook.register_request(request.id, plan.clone());
    let probed =
        config.mode.uses_question() && config.question_weight > 0.0 && !question_tokens.is_empty();
    if probed {
        let text = &question.as_ref().expect("tokens come from a question").text;
        probe(mistralrs, hook, request.id, &plan, text).await?;
    }
    Ok(Prepared {
        guard,
        config,
        question,
        question_tokens: question_tokens.len(),
        probed,
    })
}

/// Runs the question alone through the model (one token generated) so the
/// hook keeps each layer's question vector for request `request_id`.
async fn probe(
    mistralrs: &MistralRs,
    hook: &Arc<QllmHook>,
    request_id: usize,
    plan: &RequestPlan,
    question: &str,
) -> Result<()> {
    let tokens = tokenize_with(mistralrs, question, true).await?;
    let probe_id = mistralrs.next_request_id();
    let _probe_guard = RequestGuard {
        hook: hook.clone(),
        request_id: probe_id,
    };
    hook.register_request(
        probe_id,
        RequestPlan {
            probe_for: Some(request_id),
            needle: None,
            ..plan.clone()
        },
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let probe = NormalRequest::new_simple(
        RequestMessage::CompletionTokens(tokens),
        SamplingParams {
            max_len: Some(1),
            ..SamplingParams::deterministic()
        },
        tx,
        probe_id,
        None,
        None,
    );
    mistralrs
        .get_sender(None)
        .map_err(|e| Error::Request(format!("no model to send the probe to: {e}")))?
        .send(Request::Normal(Box::new(probe)))
        .await
        .map_err(|_| Error::Request("the engine stopped before the probe".into()))?;
    match rx.recv().await {
        Some(Response::CompletionDone(_)) => Ok(()),
        Some(Response::ValidationError(e)) => Err(Error::Refused(e.to_string())),
        Some(Response::InternalError(e)) => Err(Error::Request(format!(
            "the question's probe pass failed: {e}"
        ))),
        Some(Response::CompletionModelError(e, _)) => Err(Error::Request(format!(
            "the question's probe pass failed: {e}"
        ))),
        Some(_) => Err(Error::Request(
            "unexpected response to the question's probe pass".into(),
        )),
        None => Err(Error::Request("the engine stopped during the probe".into())),
    }
}

#[cfg(test)]
mod tests {
    use indexmap::IndexMap;

    use super::*;

    fn chat(turns: &[(&str, &str)]) -> RequestMessage {
        RequestMessage::Chat {
            messages: turns
                .iter()
                .map(|(role, content)| {
                    IndexMap::from([
                        ("role".to_string(), either::Either::Left(role.to_string())),
                        (
                            "content".to_string(),
                            either::Either::Left(content.to_string()),
                        ),
                    ])
                })
                .collect(),
            enable_thinking: None,
            reasoning_effort: None,
        }
    }

    fn question(messages: &RequestMessage) -> Option<(String, QuestionSource)> {
        find_question(messages).map(|q| (q.text, q.source))
    }

    const DOC: &str = "The grass is green. The sky is blue.\n\nThe pass key is 12345. \
                       Remember it.\n\nThe sun is yellow. Here we go.";

    #[test]
    fn question_last_is_the_final_paragraph() {
        let m = chat(&[("user", &format!("{DOC}\n\nWhat is the pass key?"))]);
        assert_eq!(
            question(&m),
            Some(("What is the pass key?".into(), QuestionSource::Last))
        );
    }

    #[test]
    fn question_first_is_the_first_paragraph() {
        let m = chat(&[("user", &format!("What is the pass key?\n\n{DOC}"))]);
        assert_eq!(
            question(&m),
            Some(("What is the pass key?".into(), QuestionSource::First))
        );
    }

    #[test]
    fn system_prompt_and_earlier_turns_are_ignored() {
        let m = chat(&[
            ("system", "You are helpful. What could go wrong?"),
            ("user", &format!("{DOC}\n\nWho wrote this?")),
            ("assistant", "Nobody knows."),
            ("user", "And what is the pass key?"),
        ]);
        assert_eq!(
            question(&m),
            Some(("And what is the pass key?".into(), QuestionSource::Last))
        );
    }

    #[test]
    fn no_question_mark_takes_the_final_instruction() {
        let m = chat(&[("user", &format!("{DOC}\n\nSummarise the text in one line."))]);
        assert_eq!(
            question(&m),
            Some((
                "Summarise the text in one line.".into(),
                QuestionSource::Last
            ))
        );
    }

    #[test]
    fn no_user_text_gives_no_question() {
        assert_eq!(question(&chat(&[("system", "Be brief.")])), None);
        assert_eq!(question(&chat(&[("user", " \n\n ")])), None);
        assert_eq!(question(&chat(&[])), None);
    }

    #[test]
    fn long_final_paragraph_is_cut_to_its_last_sentences() {
        let filler = "The grass is green. ".repeat(100);
        let m = chat(&[(
            "user",
            &format!("{filler}What is the pass key? Answer briefly."),
        )]);
        let (text, source) = question(&m).unwrap();
        assert_eq!(source, QuestionSource::Last);
        assert!(text.len() <= QUESTION_MAX_BYTES, "{}", text.len());
        assert!(text.starts_with("The grass"), "{text}");
        assert!(
            text.ends_with("What is the pass key? Answer briefly."),
            "{text}"
        );
    }

    #[test]
    fn completions_use_the_prompt() {
        let m = RequestMessage::Completion {
            text: format!("{DOC}\n\nWhat is the pass key? The pass key is"),
            echo_prompt: false,
            best_of: None,
        };
        assert_eq!(
            question(&m).unwrap().0,
            "What is the pass key? The pass key is"
        );
    }

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
        let err = serde_json::from_str::<RequestOptions>(r#"{"top_k": 3}"#).unwrap_err();
        assert!(err.to_string().contains("top_k"), "{err}");
    }
}

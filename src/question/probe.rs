//! The probe pass: the question run alone through the model before its
//! request, so retrieval uses the question's vectors from the first memory
//! block on.

use std::sync::Arc;

use mistralrs_core::{MistralRs, NormalRequest, Request, RequestMessage, Response, SamplingParams};

use super::text::{
    copy_question_first, find_question, prompt_text, Question, QuestionCopy, QuestionSource,
};
use crate::client::tokenize_with;
use crate::config::{Boundaries, Policy, RequestOptions};
use crate::engine::{Needle, QllmHook, RequestPlan};
use crate::error::{Error, Result};
use crate::memory::SENTENCE_END_TEXTS;

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
    pub policy: Policy,
    /// The question, if any.
    pub question: Option<Question>,
    /// Tokens of the question (no special tokens).
    pub question_tokens: usize,
    /// Whether a probe pass computed the question's vectors.
    pub probed: bool,
    /// Whether the question was copied before the document
    /// ([`Policy::question_first`]).
    pub question_copied: bool,
}

/// Registers `request`'s settings with `hook` (from `options` over the
/// hook's config), finds its question and, in `qllm` mode, copies it before
/// the document (with `question_first`) and runs the probe pass. Call
/// before sending the request; keep the returned guard until its response
/// is complete.
pub async fn prepare(
    mistralrs: &MistralRs,
    hook: &Arc<QllmHook>,
    request: &mut NormalRequest,
    options: &RequestOptions,
) -> Result<Prepared> {
    let policy = options.apply(hook.config())?;
    if policy.boundaries == Boundaries::Sentence && !hook.knows_sentence_ends() {
        let tokens = sentence_end_tokens(mistralrs).await?;
        tracing::info!("qllm: sentence-end tokens {tokens:?}");
        hook.set_sentence_end_tokens(tokens);
    }
    let mut question = match &options.question {
        Some(text) => Some(Question {
            text: text.clone(),
            source: QuestionSource::Explicit,
        }),
        None => find_question(&request.messages),
    };
    if let (Some(q), Some(prompt_bytes)) =
        (&question, prompt_text(&request.messages).map(|t| t.len()))
    {
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
    let mut needle_span = options.needle_span.clone();
    let mut question_copied = false;
    if let Some(q) = &mut question {
        if policy.question_first && policy.mode.uses_question() {
            if let Some(asked) = copy_first(mistralrs, request, q, needle_span.as_mut()).await? {
                // The copy is the question the hook looks up and reads in line.
                q.text = asked;
                question_copied = true;
            }
        }
    }
    // Tokenized in every mode: where the question begins, the document
    // ends, and its state is kept for other questions (see `reuse`).
    let mut question_tokens = Vec::new();
    if let Some(q) = &question {
        question_tokens = tokenize_with(mistralrs, &q.text, false).await?;
        tracing::info!(
            "qllm: request {}: question from {} ({} tokens): {:?}",
            request.id,
            q.source,
            question_tokens.len(),
            q.text
        );
    } else if policy.mode.uses_question() {
        tracing::info!("qllm: request {}: no question found", request.id);
    }
    let guard = RequestGuard {
        hook: hook.clone(),
        request_id: request.id,
    };
    let needle = match (&needle_span, &options.needle) {
        (Some(span), _) => Some(Needle::Span(span.clone())),
        (None, Some(text)) => Some(Needle::Tokens(tokenize_with(mistralrs, text, false).await?)),
        (None, None) => None,
    };
    let plan = RequestPlan {
        policy,
        question: (!question_tokens.is_empty()).then(|| question_tokens.clone()),
        probe_for: None,
        needle,
        reuse: options.reuse.unwrap_or(true),
        question_copied,
    };
    hook.register_request(request.id, plan.clone());
    let probed =
        policy.mode.uses_question() && policy.question_weight > 0.0 && !question_tokens.is_empty();
    if probed {
        let text = &question.as_ref().expect("tokens come from a question").text;
        probe(mistralrs, hook, request.id, &plan, text).await?;
    }
    Ok(Prepared {
        guard,
        policy,
        question,
        question_tokens: question_tokens.len(),
        probed,
        question_copied,
    })
}

/// Copies `question` before the document of `request`
/// ([`copy_question_first`]); a traced `needle_span` moves with the tokens
/// the copy adds. The text copied, if it was.
async fn copy_first(
    mistralrs: &MistralRs,
    request: &mut NormalRequest,
    question: &Question,
    needle_span: Option<&mut std::ops::Range<usize>>,
) -> Result<Option<String>> {
    let tokens_before = match (&needle_span, prompt_text(&request.messages)) {
        (Some(_), Some(text)) => Some(tokenize_with(mistralrs, &text, false).await?.len()),
        _ => None,
    };
    let copy = copy_question_first(&mut request.messages, question);
    tracing::info!(
        "qllm: request {}: question copied first: {copy:?}",
        request.id
    );
    let QuestionCopy::Copied(asked) = copy else {
        return Ok(None);
    };
    if let (Some(span), Some(before)) = (needle_span, tokens_before) {
        let text = prompt_text(&request.messages).expect("the copy went into text");
        let added = tokenize_with(mistralrs, &text, false).await?.len() - before;
        *span = span.start + added..span.end + added;
    }
    Ok(Some(asked))
}

/// The model's sentence-end tokens: each of [`SENTENCE_END_TEXTS`] that its
/// tokenizer spells as one token, alone or after a word.
pub async fn sentence_end_tokens(mistralrs: &MistralRs) -> Result<Vec<u32>> {
    const WORD: &str = "Fine";
    let word = tokenize_with(mistralrs, WORD, false).await?;
    let mut tokens = Vec::new();
    for text in SENTENCE_END_TEXTS {
        if let [token] = tokenize_with(mistralrs, text, false).await?[..] {
            tokens.push(token);
        }
        let after = tokenize_with(mistralrs, &format!("{WORD}{text}"), false).await?;
        if after.len() == word.len() + 1 && after.starts_with(&word) {
            tokens.extend(after.last());
        }
    }
    if tokens.is_empty() {
        return Err(Error::Request(
            "the tokenizer spells no sentence end (`.`, `?`, `!`, a line break) as one token; \
             use `boundaries = \"fixed\"`"
                .into(),
        ));
    }
    Ok(tokens)
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

/// [`prepare`] with the server's settings, for callers that send requests
/// to the engine themselves (the CLI's `run`, Rust programs): the question
/// is found, copied first and probed as `serve` does it. `None` when no
/// hook is installed.
pub async fn prepare_installed(
    mistralrs: &MistralRs,
    request: &mut NormalRequest,
) -> Result<Option<Prepared>> {
    let Some(hook) = crate::installed() else {
        return Ok(None);
    };
    prepare(mistralrs, &hook, request, &RequestOptions::default())
        .await
        .map(Some)
}

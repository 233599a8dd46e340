//! Talking to a loaded mistral.rs engine: tokenization with the model's own
//! tokenizer, from async code or from outside it.

use either::Either;
use mistralrs_core::{MistralRs, Request, TokenizationRequest};

use crate::error::{Error, Result};

/// Counts tokens with a loaded mistral.rs model's own tokenizer, through
/// the engine's tokenization request. It blocks: call it from outside async
/// code.
#[derive(Debug, Clone)]
pub struct EngineTokenizer {
    sender: tokio::sync::mpsc::Sender<Request>,
}

impl EngineTokenizer {
    /// The tokenizer of `mistralrs`'s default model.
    pub fn new(mistralrs: &MistralRs) -> Result<Self> {
        let sender = mistralrs.get_sender(None).map_err(no_model)?;
        Ok(Self { sender })
    }

    /// The tokens of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let (request, mut rx) = tokenization_request(text, false);
        self.sender
            .blocking_send(request)
            .map_err(|_| engine_gone())?;
        rx.blocking_recv()
            .ok_or_else(engine_gone)?
            .map_err(tokenization_failed)
    }
}

/// A tokenization request for `text` (with special tokens if `special`) and
/// where its answer arrives.
fn tokenization_request(
    text: &str,
    special: bool,
) -> (
    Request,
    tokio::sync::mpsc::Receiver<anyhow::Result<Vec<u32>>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let request = TokenizationRequest {
        text: Either::Right(text.to_string()),
        tools: None,
        add_generation_prompt: false,
        add_special_tokens: special,
        enable_thinking: None,
        reasoning_effort: None,
        response: tx,
    };
    (Request::Tokenize(request), rx)
}

pub(crate) fn engine_gone() -> Error {
    Error::Request("the engine stopped before answering".into())
}

fn tokenization_failed(e: anyhow::Error) -> Error {
    Error::Request(format!("tokenization failed: {e}"))
}

pub(crate) fn no_model(e: impl std::fmt::Display) -> Error {
    Error::Request(format!("no model to send the request to: {e}"))
}

/// The tokens of `text` with `mistralrs`'s default model, from async code.
pub async fn tokenize(mistralrs: &MistralRs, text: &str) -> Result<Vec<u32>> {
    tokenize_with(mistralrs, text, false).await
}

/// The tokens of `text`, with the model's special tokens (such as BOS) when
/// `special` is set.
pub async fn tokenize_with(mistralrs: &MistralRs, text: &str, special: bool) -> Result<Vec<u32>> {
    let (request, mut rx) = tokenization_request(text, special);
    mistralrs
        .get_sender(None)
        .map_err(no_model)?
        .send(request)
        .await
        .map_err(|_| engine_gone())?;
    rx.recv()
        .await
        .ok_or_else(engine_gone)?
        .map_err(tokenization_failed)
}

//! Query-aware serving: the OpenAI chat and completion endpoints of
//! `mistralrs serve` with a `qllm` request extension.
//!
//! [`router`] answers `POST /v1/chat/completions` and `POST /v1/completions`
//! like mistral.rs's own handlers (which it calls), and reads one more field
//! of the request body:
//!
//! ```json
//! { "model": "default", "messages": [...],
//!   "qllm": { "question": "What is the pass key?", "topk": 4 } }
//! ```
//!
//! See [`RequestOptions`] for the keys. Each request's question is found (see
//! [`crate::question`]), probed and registered with the hook before the
//! request is sent; the non-streaming response carries a `qllm` object with
//! what the hook did ([`crate::RequestReport`]), and every request logs it.
//! Bad options get HTTP 400 with a message naming the key; a body that is
//! not JSON gets HTTP 400 too.
//!
//! `GET /v1/qllm/stats` reports the hook's live state and memory
//! ([`Stats`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use either::Either;
use mistralrs_core::{Request, Response as EngineResponse};
use mistralrs_server_core::handler_core::{create_response_channel, send_request_with_model};
use mistralrs_server_core::mistralrs_server_router_builder::DEFAULT_MAX_BODY_LIMIT;
use mistralrs_server_core::openai::{ChatCompletionRequest, CompletionRequest};
use mistralrs_server_core::types::SharedMistralRsState;
use mistralrs_server_core::{chat_completion, completions};
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::RequestOptions;
use crate::engine::QllmHook;
use crate::error::Error;
use crate::question::probe::{prepare, Prepared, RequestGuard};

/// Name of the request extension field.
pub const EXTENSION_FIELD: &str = "qllm";

#[derive(Clone)]
struct ServerState {
    mistralrs: SharedMistralRsState,
    hook: Arc<QllmHook>,
}

/// Routes for the chat and completion endpoints with the `qllm` extension.
/// Put them in front of mistral.rs's router, e.g.
/// `qllm::server::router(state, hook).fallback_service(app)`. They carry the
/// same CORS policy and body size limit as mistral.rs's default router.
pub fn router(mistralrs: SharedMistralRsState, hook: Arc<QllmHook>) -> Router {
    let cors = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
        .allow_origin(AllowOrigin::any());
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route("/v1/qllm/stats", get(stats))
        .layer(cors)
        .layer(DefaultBodyLimit::max(DEFAULT_MAX_BODY_LIMIT))
        .with_state(ServerState { mistralrs, hook })
}

/// An error answered with an OpenAI-style body.
struct HttpError(StatusCode, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "message": self.1, "type": "invalid_request_error" } });
        (self.0, Json(body)).into_response()
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> HttpError {
    HttpError(status, client_message(&message.to_string()))
}

/// `text` without the backtrace candle appends to its errors (when
/// `RUST_BACKTRACE` is set): clients get the message, the log gets the rest.
fn client_message(text: &str) -> String {
    // A backtrace's first frame: "   0: candle_core::error::Error::bt".
    let first_frame = |line: &str| line.starts_with(' ') && line.trim_start().starts_with("0: ");
    match text.lines().position(first_frame) {
        Some(first_frame) => {
            tracing::warn!("qllm: error sent to the client without its backtrace: {text}");
            let message: Vec<&str> = text.lines().take(first_frame).collect();
            message.join("\n").trim_end().to_string()
        }
        None => text.to_string(),
    }
}

/// [`client_message`] applied to every string in a JSON error body.
fn strip_backtraces(value: &mut Value) {
    match value {
        Value::String(text) => *text = client_message(text),
        Value::Array(items) => items.iter_mut().for_each(strip_backtraces),
        Value::Object(fields) => fields.values_mut().for_each(strip_backtraces),
        _ => {}
    }
}

/// What `GET /v1/qllm/stats` answers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Sequences with state.
    pub sequences: usize,
    /// Bytes of state they hold.
    pub bytes: usize,
    /// Bytes counted against `max_memory` (reservations included).
    pub charged_bytes: usize,
    /// Most bytes of state held at once since the server started.
    pub peak_bytes: usize,
    /// Requests with settings, probe vectors or a report still kept.
    pub tracked_requests: usize,
    /// The server's cap on all state, if any.
    pub max_memory: Option<usize>,
    /// The cap per request, if any.
    pub max_request_memory: Option<usize>,
    /// Resident memory of the server process.
    pub resident_bytes: Option<usize>,
    /// States kept for follow-up requests.
    pub kept_prefixes: usize,
    /// Bytes they hold (each shared block slab once).
    pub kept_prefix_bytes: usize,
    /// Their budget, `prefix_cache_memory`.
    pub prefix_cache_memory: usize,
}

async fn stats(State(state): State<ServerState>) -> Json<Stats> {
    let memory = state.hook.memory_stats();
    let kept = state.hook.prefix_stats();
    let config = state.hook.config();
    Json(Stats {
        sequences: memory.sequences,
        bytes: memory.bytes,
        charged_bytes: memory.charged_bytes,
        peak_bytes: memory.peak_bytes,
        tracked_requests: state.hook.tracked_requests(),
        max_memory: config.caps.max_memory,
        max_request_memory: config.caps.max_request_memory,
        resident_bytes: crate::system::resident_memory(),
        kept_prefixes: kept.entries,
        kept_prefix_bytes: kept.bytes,
        prefix_cache_memory: config.caps.prefix_cache_memory,
    })
}

/// Splits the extension off a request body and parses the rest as `T`.
fn split_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> std::result::Result<(T, RequestOptions), HttpError> {
    let mut body: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON in UTF-8: {e}"),
        )
    })?;
    let options = match body.as_object_mut().and_then(|o| o.remove(EXTENSION_FIELD)) {
        None | Some(Value::Null) => RequestOptions::default(),
        Some(value) => serde_json::from_value(value).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("invalid `{EXTENSION_FIELD}` options: {e}"),
            )
        })?,
    };
    let request = serde_json::from_value(body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid request body: {e}"),
        )
    })?;
    Ok((request, options))
}

/// Registers the request with the hook, copies its question first (with
/// `question_first`) and runs its probe.
async fn prepare_request(
    state: &ServerState,
    request: &mut Request,
    options: &RequestOptions,
) -> std::result::Result<Prepared, HttpError> {
    let Request::Normal(normal) = request else {
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "qllm: unexpected request kind",
        ));
    };
    prepare(&state.mistralrs, &state.hook, normal, options)
        .await
        .map_err(|e| match e {
            Error::InvalidConfig { .. } => error(StatusCode::BAD_REQUEST, e),
            Error::Refused(_) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
            e => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        })
}

/// Logs what the hook did for a request and returns it as JSON.
fn report(hook: &QllmHook, guard: &RequestGuard, prepared_probe: bool) -> Value {
    let id = guard.request_id();
    let report = hook.request_report(id);
    tracing::info!("qllm: request {id}: probe {prepared_probe}, {report:?}");
    serde_json::to_value(report).unwrap_or(Value::Null)
}

/// Waits until the engine has started a streaming request's sequences or
/// refused it, so that a refused request (over a memory cap, say) gets an
/// HTTP error rather than an event stream carrying one error message.
/// Returns the receiver to stream from.
async fn await_start(
    hook: &QllmHook,
    request_id: usize,
    mut rx: Receiver<EngineResponse>,
) -> std::result::Result<Receiver<EngineResponse>, HttpError> {
    loop {
        if hook.request_started(request_id) {
            return Ok(rx);
        }
        tokio::select! {
            first = rx.recv() => {
                let first = match first {
                    Some(EngineResponse::ValidationError(e)) => {
                        return Err(error(StatusCode::UNPROCESSABLE_ENTITY, e));
                    }
                    Some(EngineResponse::InternalError(e)) => {
                        return Err(error(StatusCode::INTERNAL_SERVER_ERROR, e));
                    }
                    Some(first) => first,
                    None => {
                        return Err(error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "the engine dropped the request",
                        ));
                    }
                };
                // A response came before the start was seen: hand it and
                // the rest to the streamer.
                let (tx, forwarded) = tokio::sync::mpsc::channel(16);
                tokio::spawn(async move {
                    let mut next = Some(first);
                    while let Some(response) = next {
                        if tx.send(response).await.is_err() {
                            break;
                        }
                        next = rx.recv().await;
                    }
                });
                return Ok(forwarded);
            }
            () = tokio::time::sleep(START_POLL) => {}
        }
    }
}

/// How often [`await_start`] looks for the request's sequences.
const START_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Adds the report to a successful JSON response; strips backtraces from an
/// error's.
async fn with_report(response: Response, report: Value) -> Response {
    let ok = response.status() == StatusCode::OK;
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read the response",
        )
        .into_response();
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(mut object)) if ok => {
            object.insert(EXTENSION_FIELD.into(), report);
            (parts, Json(Value::Object(object))).into_response()
        }
        Ok(mut body) if !ok => {
            strip_backtraces(&mut body);
            (parts, Json(body)).into_response()
        }
        _ => (parts, axum::body::Body::from(bytes)).into_response(),
    }
}

/// Fills in `max_tokens` when a request leaves it out: with the context
/// limit lifted for Q-LLM, nothing else would stop a model that never emits
/// its end token. The model's trained context is the bound upstream applies
/// to prompt and answer together.
fn bound_generation(max_tokens: &mut Option<usize>, hook: &QllmHook) {
    if max_tokens.is_none() {
        *max_tokens = hook.model_max_len();
    }
}

async fn chat(State(state): State<ServerState>, body: Bytes) -> Response {
    let (mut oairequest, options) = match split_body::<ChatCompletionRequest>(&body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let empty = match &oairequest.messages {
        Either::Left(messages) => messages.is_empty(),
        Either::Right(text) => text.trim().is_empty(),
    };
    if empty {
        return error(StatusCode::BAD_REQUEST, "`messages` must not be empty").into_response();
    }
    bound_generation(&mut oairequest.max_tokens, &state.hook);
    let model_id = (oairequest.model != "default").then(|| oairequest.model.clone());
    let (tx, mut rx) = create_response_channel(None);
    let mistralrs = state.mistralrs.clone();
    let (mut request, is_streaming) =
        match chat_completion::parse_request(oairequest, mistralrs.clone(), tx).await {
            Ok(x) => x,
            Err(e) => return chat_completion::handle_error(mistralrs, e.into()).into_response(),
        };
    let prepared = match prepare_request(&state, &mut request, &options).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = send_request_with_model(&mistralrs, request, model_id.as_deref()).await {
        return chat_completion::handle_error(mistralrs, e.into()).into_response();
    }
    let (guard, probed) = (prepared.guard, prepared.probed);
    if is_streaming {
        let rx = match await_start(&state.hook, guard.request_id(), rx).await {
            Ok(rx) => rx,
            Err(e) => return e.into_response(),
        };
        let hook = state.hook.clone();
        // The guard lives as long as the stream: its settings stay until the
        // last chunk is sent or the client goes away.
        let on_done: chat_completion::ChatCompletionOnDoneCallback = Box::new(move |_| {
            report(&hook, &guard, probed);
        });
        chat_completion::create_streamer(rx, mistralrs, None, Some(on_done)).into_response()
    } else {
        let response = chat_completion::process_non_streaming_response(&mut rx, mistralrs)
            .await
            .into_response();
        with_report(response, report(&state.hook, &guard, probed)).await
    }
}

async fn completion(State(state): State<ServerState>, body: Bytes) -> Response {
    let (mut oairequest, options) = match split_body::<CompletionRequest>(&body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    bound_generation(&mut oairequest.max_tokens, &state.hook);
    let model_id = (oairequest.model != "default").then(|| oairequest.model.clone());
    let (tx, mut rx) = create_response_channel(None);
    let mistralrs = state.mistralrs.clone();
    let (mut request, is_streaming) =
        match completions::parse_request(oairequest, mistralrs.clone(), tx) {
            Ok(x) => x,
            Err(e) => return completions::handle_error(mistralrs, e.into()).into_response(),
        };
    let prepared = match prepare_request(&state, &mut request, &options).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = send_request_with_model(&mistralrs, request, model_id.as_deref()).await {
        return completions::handle_error(mistralrs, e.into()).into_response();
    }
    let (guard, probed) = (prepared.guard, prepared.probed);
    if is_streaming {
        let rx = match await_start(&state.hook, guard.request_id(), rx).await {
            Ok(rx) => rx,
            Err(e) => return e.into_response(),
        };
        let hook = state.hook.clone();
        let on_done: completions::CompletionOnDoneCallback = Box::new(move |_| {
            report(&hook, &guard, probed);
        });
        completions::create_streamer(rx, mistralrs, None, Some(on_done)).into_response()
    } else {
        let response = completions::process_non_streaming_response(&mut rx, mistralrs)
            .await
            .into_response();
        with_report(response, report(&state.hook, &guard, probed)).await
    }
}

#[cfg(test)]
mod tests {
    use mistralrs_core::attention_hook::AttentionHook;

    use super::*;
    use crate::QllmConfig;

    #[test]
    fn clients_get_error_messages_without_backtraces() {
        let with_backtrace = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg(
                "qllm: layer 3 got tokens at position 9 but holds 4 tokens".into(),
            )),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let full = with_backtrace.to_string();
        assert!(full.contains("   0: "), "{full}");
        let sent = error(StatusCode::INTERNAL_SERVER_ERROR, &with_backtrace);
        assert_eq!(
            sent.1,
            "qllm: layer 3 got tokens at position 9 but holds 4 tokens"
        );
        let mut body = json!({"message": full, "object": "error", "code": 500});
        strip_backtraces(&mut body);
        assert_eq!(
            body,
            json!({
                "message": "qllm: layer 3 got tokens at position 9 but holds 4 tokens",
                "object": "error",
                "code": 500,
            })
        );
        // Text without a backtrace is sent as it is, lines and numbers too.
        let plain = "two problems:\n1. topk\n2: n_local";
        assert_eq!(client_message(plain), "two problems:\n1. topk\n2: n_local");
    }

    #[test]
    fn a_request_without_max_tokens_is_bounded_by_the_trained_context() {
        let hook = QllmHook::new(QllmConfig::default());
        let mut absent = None;
        bound_generation(&mut absent, &hook);
        assert_eq!(absent, None, "no model loaded yet");
        let lifted = hook.model_loaded(&crate::engine::tests::hook_model());
        assert_eq!(lifted, Some(1 << 20));
        bound_generation(&mut absent, &hook);
        assert_eq!(absent, Some(8192));
        let mut asked = Some(40);
        bound_generation(&mut asked, &hook);
        assert_eq!(asked, Some(40));
    }
}

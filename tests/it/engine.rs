//! Driving mistral.rs's real engine from tests.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Tensor;
use mistralrs_core::{
    CustomLogitsProcessor, MistralRs, ModelDType, ModelSelected, NormalRequest, Request,
    RequestMessage, Response, SamplingParams, TokenSource,
};
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;

/// The attention hook is process-wide: tests that load a model or install a
/// hook take this lock so they do not see each other's hook.
pub fn engine_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Loads a local GGUF through the same builder `mistralrs serve` uses.
pub async fn load_gguf(file: &Path, dtype: ModelDType) -> Arc<MistralRs> {
    try_load_gguf(file, dtype).await.expect("model loads")
}

/// [`load_gguf`], returning the loader's error (with its causes) instead.
pub async fn try_load_gguf(file: &Path, dtype: ModelDType) -> Result<Arc<MistralRs>, String> {
    let dir = file.parent().unwrap().to_string_lossy().to_string();
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    MistralRsForServerBuilder::new()
        .with_model(ModelSelected::GGUF {
            tok_model_id: None,
            quantized_model_id: dir,
            quantized_filename: name,
            dtype,
            topology: None,
            max_seq_len: 4096,
            max_batch_size: 2,
        })
        .with_cpu(true)
        .with_token_source(TokenSource::None)
        .with_max_seqs(4)
        .build()
        .await
        .map_err(|e| format!("{e:#}"))
}

/// Runs a token prompt with greedy sampling for `new_tokens` tokens and records
/// the logits of every step (prompt step first). Tokens in `banned` are never
/// sampled, so a random model cannot stop early on its EOS token.
pub async fn generate_tokens(
    mistralrs: &MistralRs,
    prompt: Vec<u32>,
    new_tokens: usize,
    banned: &[u32],
) -> Vec<Vec<f32>> {
    let trace = Arc::new(Mutex::new(Vec::<Vec<f32>>::new()));
    let recorder = {
        let trace = trace.clone();
        let banned = banned.to_vec();
        move |logits: &Tensor, _ctx: &[u32]| -> candle_core::Result<Tensor> {
            let mut values = logits.to_vec1::<f32>()?;
            trace.lock().unwrap().push(values.clone());
            for &b in &banned {
                values[b as usize] = f32::NEG_INFINITY;
            }
            Tensor::new(values, logits.device())
        }
    };
    greedy(
        mistralrs,
        RequestMessage::CompletionTokens(prompt),
        new_tokens,
        vec![Arc::new(recorder)],
    )
    .await;
    let logits = trace.lock().unwrap().clone();
    logits
}

/// Runs a token prompt, then decodes exactly `forced` (whatever the model
/// prefers), and records the logits of every step (prompt step first): two
/// implementations compared this way read the same tokens even where their
/// rounding would break a near-tie differently.
pub async fn forced_logits(
    mistralrs: &MistralRs,
    prompt: Vec<u32>,
    forced: &[u32],
) -> Vec<Vec<f32>> {
    let trace = Arc::new(Mutex::new(Vec::<Vec<f32>>::new()));
    let recorder = {
        let trace = trace.clone();
        let forced = forced.to_vec();
        move |logits: &Tensor, _ctx: &[u32]| -> candle_core::Result<Tensor> {
            let values = logits.to_vec1::<f32>()?;
            let mut trace = trace.lock().unwrap();
            let step = trace.len();
            trace.push(values.clone());
            let mut only = vec![f32::NEG_INFINITY; values.len()];
            only[forced[step.min(forced.len() - 1)] as usize] = 0.0;
            Tensor::new(only, logits.device())
        }
    };
    greedy(
        mistralrs,
        RequestMessage::CompletionTokens(prompt),
        forced.len(),
        vec![Arc::new(recorder)],
    )
    .await;
    let logits = trace.lock().unwrap().clone();
    logits
}

/// Sends a request with greedy sampling for at most `max_len` tokens and
/// returns the generated text.
pub async fn greedy(
    mistralrs: &MistralRs,
    messages: RequestMessage,
    max_len: usize,
    logits_processors: Vec<Arc<dyn CustomLogitsProcessor>>,
) -> String {
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let params = SamplingParams {
        max_len: Some(max_len),
        ..SamplingParams::deterministic()
    };
    let mut request = NormalRequest::new_simple(
        messages,
        params,
        tx,
        mistralrs.next_request_id(),
        None,
        None,
    );
    request.logits_processors = Some(logits_processors);
    mistralrs
        .get_sender(None)
        .unwrap()
        .send(Request::Normal(Box::new(request)))
        .await
        .unwrap();
    final_text(&mut rx).await
}

/// Waits for the final response of a request and returns its text; panics
/// with the engine's message on any error.
async fn final_text(rx: &mut tokio::sync::mpsc::Receiver<Response>) -> String {
    match rx.recv().await.expect("a response") {
        Response::CompletionDone(done) => done.choices[0].text.clone(),
        Response::Done(done) => done.choices[0].message.content.clone().unwrap_or_default(),
        Response::InternalError(e) | Response::ValidationError(e) => panic!("request failed: {e}"),
        Response::ModelError(e, _) | Response::CompletionModelError(e, _) => {
            panic!("model error: {e}")
        }
        _ => panic!("unexpected response"),
    }
}

/// Largest absolute difference between two logit traces (requests x steps x
/// vocabulary); panics if their shapes differ.
pub fn max_abs_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
    let mut worst = 0f32;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len(), "different number of steps");
        for (sa, sb) in ra.iter().zip(rb) {
            for (x, y) in sa.iter().zip(sb) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    worst
}

//! Passkey retrieval through mistral.rs with the Q-LLM hook.
//!
//! A 5-digit key is hidden at several depths of a long filler text; the model
//! is asked to repeat it. Prints one line per (length, depth) with the answer,
//! prefill and decode speed.
//!
//! ```text
//! cargo run --release --example passkey -- --model assets/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --tokens 1024,4096 --depths 0.1,0.5,0.9 [--config qllm.toml] [--no-hook]
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use either::Either;
use mistralrs_core::{
    MistralRs, ModelDType, ModelSelected, NormalRequest, Request, RequestMessage, Response,
    SamplingParams, TokenSource, TokenizationRequest,
};
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;

const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n";
const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

struct Args {
    model: PathBuf,
    tokens: Vec<usize>,
    depths: Vec<f64>,
    config: Option<PathBuf>,
    hook: bool,
    seed: u64,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: PathBuf::from("assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
        tokens: vec![4096],
        depths: vec![0.1, 0.5, 0.9],
        config: None,
        hook: true,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?.into(),
            "--tokens" => args.tokens = list(&value()?)?,
            "--depths" => args.depths = list(&value()?)?,
            "--config" => args.config = Some(value()?.into()),
            "--seed" => args.seed = value()?.parse()?,
            "--no-hook" => args.hook = false,
            other => bail!("unknown argument {other}"),
        }
    }
    if let Some(d) = args.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("--depths: {d} is not between 0 and 1");
    }
    Ok(args)
}

fn list<T: std::str::FromStr>(text: &str) -> Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text.split(',')
        .map(|s| {
            s.trim()
                .parse::<T>()
                .with_context(|| format!("bad list item {s:?}"))
        })
        .collect()
}

async fn count_tokens(mistralrs: &MistralRs, text: &str) -> Result<usize> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let request = TokenizationRequest {
        text: Either::Right(text.to_string()),
        tools: None,
        add_generation_prompt: false,
        add_special_tokens: false,
        enable_thinking: None,
        reasoning_effort: None,
        response: tx,
    };
    mistralrs
        .get_sender(None)?
        .send(Request::Tokenize(request))
        .await?;
    Ok(rx.recv().await.context("no tokenizer response")??.len())
}

/// The prompt with about `target` tokens and the key at `depth` of the filler.
async fn build_prompt(
    mistralrs: &MistralRs,
    target: usize,
    depth: f64,
    key: u32,
) -> Result<String> {
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
    let fixed = count_tokens(mistralrs, &format!("{INTRO}{needle}{QUESTION}")).await?;
    let per_filler = count_tokens(mistralrs, &FILLER.repeat(16)).await? as f64 / 16.0;
    let reps = ((target.saturating_sub(fixed)) as f64 / per_filler).round() as usize;
    let at = (reps as f64 * depth).round() as usize;
    Ok(format!(
        "{INTRO}{}{needle}{}{QUESTION}",
        FILLER.repeat(at),
        FILLER.repeat(reps - at)
    ))
}

async fn complete(
    mistralrs: &MistralRs,
    prompt: String,
) -> Result<(String, mistralrs_core::Usage)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let params = SamplingParams {
        max_len: Some(8),
        ..SamplingParams::deterministic()
    };
    let request = NormalRequest::new_simple(
        RequestMessage::Completion {
            text: prompt,
            echo_prompt: false,
            best_of: None,
        },
        params,
        tx,
        mistralrs.next_request_id(),
        None,
        None,
    );
    mistralrs
        .get_sender(None)?
        .send(Request::Normal(Box::new(request)))
        .await?;
    match rx.recv().await.context("no response")? {
        Response::CompletionDone(done) => Ok((done.choices[0].text.clone(), done.usage)),
        Response::InternalError(e) | Response::ValidationError(e) => bail!("request failed: {e}"),
        Response::CompletionModelError(e, _) => bail!("model error: {e}"),
        _ => bail!("unexpected response"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    if !args.model.exists() {
        bail!(
            "model file {} does not exist (scripts/fetch-assets.sh fetches the default)",
            args.model.display()
        );
    }
    if args.hook {
        qllm::install(args.config.as_deref())?;
    }
    let mistralrs = MistralRsForServerBuilder::new()
        .with_model(ModelSelected::GGUF {
            tok_model_id: None,
            quantized_model_id: args.model.parent().unwrap().to_string_lossy().into(),
            quantized_filename: args.model.file_name().unwrap().to_string_lossy().into(),
            dtype: ModelDType::Auto,
            topology: None,
            max_seq_len: 4096,
            max_batch_size: 1,
        })
        .with_cpu(true)
        .with_token_source(TokenSource::None)
        .build()
        .await?;
    let mode = if args.hook { "hook" } else { "upstream" };
    println!("mode\ttokens\tdepth\tkey\tfound\tprefill_tok_s\tdecode_tok_s\tanswer");
    let mut found = 0;
    let mut cells = 0;
    for &target in &args.tokens {
        for (i, &depth) in args.depths.iter().enumerate() {
            let key = 10000
                + ((args.seed * 7919 + target as u64 * 31 + i as u64 * 104729) % 90000) as u32;
            let prompt = build_prompt(&mistralrs, target, depth, key).await?;
            let (answer, usage) = complete(&mistralrs, prompt).await?;
            let ok = answer.contains(&key.to_string());
            found += usize::from(ok);
            cells += 1;
            println!(
                "{mode}\t{}\t{depth}\t{key}\t{ok}\t{:.1}\t{:.1}\t{:?}",
                usage.prompt_tokens,
                usage.avg_prompt_tok_per_sec,
                usage.avg_compl_tok_per_sec,
                answer
            );
        }
    }
    println!("found {found}/{cells}");
    Ok(())
}

//! Passkey retrieval through mistral.rs, with or without the Q-LLM hook.
//!
//! A 5-digit key is hidden at several depths of a long filler text
//! ([`qllm::eval::passkey`]); the model completes "The pass key is". Prints one
//! line per (length, depth) with the answer, prefill and decode speed, then
//! the process's peak resident memory and the peak bytes the hook held.
//!
//! ```text
//! cargo run --release --example passkey -- --model assets/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --tokens 1024,4096 --depths 0.1,0.5,0.9 [--mode qllm|infllm|streaming|dense|upstream] \
//!     [--preset 512|1k|2k|infllm] [--config qllm.toml] [--dtype f32|bf16|f16|auto] \
//!     [--max-new-tokens 8] [--seed 1] [--dequantize]
//! ```
//!
//! `--dequantize` turns the GGUF weights into f32 at load
//! (`CANDLE_DEQUANTIZE_ALL=1`): prefill runs on f32 matrix products instead
//! of candle's quantized dot products.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use mistralrs_core::{MistralRs, ModelDType, ModelSelected, TokenSource};
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;
use qllm::eval::passkey;
use qllm::eval::{complete, tokenize};
use qllm::ConfigFile;

struct Args {
    model: PathBuf,
    tokens: Vec<usize>,
    depths: Vec<f64>,
    config: Option<PathBuf>,
    mode: String,
    preset: Option<String>,
    dtype: ModelDType,
    seed: u64,
    max_new_tokens: usize,
    dequantize: bool,
}

const USAGE: &str = "usage: passkey [--model FILE.gguf] [--tokens LIST] [--depths LIST] \
                     [--config FILE] [--mode qllm|infllm|streaming|dense|upstream] [--preset NAME] \
                     [--dtype f32|bf16|f16|auto] [--seed N] [--max-new-tokens N] [--dequantize]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: PathBuf::from("assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
        tokens: vec![4096],
        depths: vec![0.1, 0.5, 0.9],
        config: None,
        mode: "qllm".into(),
        preset: None,
        dtype: ModelDType::F32,
        seed: 1,
        max_new_tokens: 8,
        dequantize: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?.into(),
            "--tokens" => args.tokens = list(&value()?)?,
            "--depths" => args.depths = list(&value()?)?,
            "--config" => args.config = Some(value()?.into()),
            "--mode" => args.mode = value()?,
            "--preset" => args.preset = Some(value()?),
            "--dtype" => {
                args.dtype = match value()?.as_str() {
                    "f32" => ModelDType::F32,
                    "bf16" => ModelDType::BF16,
                    "f16" => ModelDType::F16,
                    "auto" => ModelDType::Auto,
                    other => bail!("--dtype: unknown dtype {other} (f32, bf16, f16, auto)"),
                }
            }
            "--seed" => args.seed = value()?.parse()?,
            "--max-new-tokens" => args.max_new_tokens = value()?.parse()?,
            "--dequantize" => args.dequantize = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
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

/// The hook's config: the file (if any), then `--mode` and `--preset`.
fn hook_config(args: &Args) -> Result<qllm::QllmConfig> {
    let mut file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    file.mode = Some(
        args.mode
            .parse()
            .map_err(anyhow::Error::msg)
            .context("--mode")?,
    );
    if let Some(preset) = &args.preset {
        file.preset = Some(
            preset
                .parse()
                .map_err(anyhow::Error::msg)
                .context("--preset")?,
        );
    }
    let mut config = file.resolve()?;
    // Each run reads its prompt from the start, and its peak RSS is its own.
    config.caps.prefix_cache_memory = 0;
    Ok(config)
}

/// The prompt with about `target` tokens and the key at `depth`, and the
/// token position where the key's sentence starts.
async fn build_prompt(
    mistralrs: &MistralRs,
    target: usize,
    depth: f64,
    key: u32,
) -> Result<(String, usize)> {
    let fixed = tokenize(mistralrs, &passkey::fixed_text(key)).await?.len();
    let units = 64;
    #[allow(clippy::cast_precision_loss)]
    let per_unit = tokenize(mistralrs, &passkey::FILLER.repeat(units))
        .await?
        .len() as f64
        / units as f64;
    let prompt = passkey::prompt(
        passkey::filler_units_for(target, fixed, per_unit),
        depth,
        key,
    );
    let needle_at = prompt
        .find(&passkey::needle(key))
        .context("the needle is missing from the prompt")?;
    let needle_token = tokenize(mistralrs, &prompt[..needle_at]).await?.len();
    Ok((prompt, needle_token))
}

/// Peak resident memory of this process, from `/proc/self/status`.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    mistralrs_core::initialize_logging();
    if !args.model.exists() {
        bail!(
            "model file {} does not exist (scripts/fetch-assets.sh fetches the default)",
            args.model.display()
        );
    }
    if args.dequantize {
        // Before any weight is loaded: candle reads it once per thread.
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    }
    let hook = if args.mode == "upstream" {
        None
    } else {
        Some(qllm::install_config(hook_config(&args)?))
    };
    let mistralrs = MistralRsForServerBuilder::new()
        .with_model(ModelSelected::GGUF {
            tok_model_id: None,
            quantized_model_id: args.model.parent().unwrap().to_string_lossy().into(),
            quantized_filename: args.model.file_name().unwrap().to_string_lossy().into(),
            dtype: args.dtype,
            topology: None,
            max_seq_len: 4096,
            max_batch_size: 1,
        })
        .with_cpu(true)
        .with_token_source(TokenSource::None)
        .build()
        .await?;
    if let Some(hook) = &hook {
        hook.set_question(Some(tokenize(&mistralrs, passkey::QUESTION).await?));
        hook.set_sentence_end_tokens(qllm::question::probe::sentence_end_tokens(&mistralrs).await?);
    }
    println!("mode\ttokens\tdepth\tneedle_token\tkey\tfound\tprefill_tok_s\tdecode_tok_s\tanswer");
    let mut found = 0;
    let mut cells = 0;
    for &target in &args.tokens {
        for &depth in &args.depths {
            let key = passkey::key(args.seed, cells);
            cells += 1;
            let (prompt, needle_token) = build_prompt(&mistralrs, target, depth, key).await?;
            let (answer, usage) =
                match complete(&mistralrs, prompt, args.max_new_tokens, None).await {
                    Ok(done) => (done.text, done.usage),
                    Err(e) => {
                        println!(
                            "{}\t{target}\t{depth}\t{needle_token}\t{key}\terror\t\t\t{e}",
                            args.mode
                        );
                        continue;
                    }
                };
            let ok = answer.contains(&key.to_string());
            found += usize::from(ok);
            println!(
                "{}\t{}\t{depth}\t{needle_token}\t{key}\t{ok}\t{:.1}\t{:.1}\t{:?}",
                args.mode,
                usage.prompt_tokens,
                usage.avg_prompt_tok_per_sec,
                usage.avg_compl_tok_per_sec,
                answer
            );
        }
    }
    println!("found {found}/{cells}");
    if let Some(mib) = peak_rss_mib() {
        println!("peak_rss_mib\t{mib:.0}");
    }
    if let Some(hook) = &hook {
        // The hook's own high-water mark, to tell its memory from the rest
        // of the process's.
        #[allow(clippy::cast_precision_loss)]
        let mib = hook.memory_stats().peak_bytes as f64 / f64::from(1 << 20);
        println!("peak_hook_mib\t{mib:.0}");
    }
    Ok(())
}

//! Follow-up questions about one document: what reusing its kept state
//! saves, and what it does to the answers.
//!
//! A `fact` prompt (essays, an invented fact at the first depth) gets a
//! second invented fact at the second depth. Per mode, one hook with its
//! kept prefixes on serves, in order:
//! 1. `first`: the document, then the first fact's question;
//! 2. `follow-up`: that prompt, its answer, then the second question (a
//!    chat's next turn: resumes from the state kept at the first answer's
//!    end);
//! 3. `follow-up fresh`: the same prompt with `reuse` off (read whole, with
//!    the second question from the start);
//! 4. `other question`: the document, then the second question alone
//!    (resumes from the state kept before the first question);
//! 5. `other question fresh`: the same with `reuse` off.
//!
//! One line each: the answer and whether it is right, the prompt tokens
//! read and reused, the prefill time and the wall time (probe pass, prefill
//! and decode). `--json FILE` also writes them; `--fresh false` leaves out
//! the fresh reads (3 and 5).
//!
//! ```text
//! cargo run --release --example followup -- [--model FILE.gguf] [--tokens 12288] \
//!     [--depths 0.1,0.6] [--modes qllm,infllm] [--seed 1] [--max-new-tokens 12] \
//!     [--config FILE] [--json FILE] [--fresh false]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mistralrs_core::{ModelDType, ModelSelected, TokenSource};
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;
use qllm::eval::{self, complete, Corpus, EngineTokenizer, Placement, Task};
use qllm::{ConfigFile, Mode, RequestOptions};

struct Args {
    model: PathBuf,
    tokens: usize,
    depths: (f64, f64),
    modes: Vec<Mode>,
    seed: u64,
    max_new_tokens: usize,
    config: Option<PathBuf>,
    json: Option<PathBuf>,
    fresh: bool,
}

const USAGE: &str = "usage: followup [--model FILE.gguf] [--tokens N] [--depths A,B] \
                     [--modes LIST] [--seed N] [--max-new-tokens N] [--config FILE] [--json FILE] \
                     [--fresh false]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: PathBuf::from("assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
        tokens: 12_288,
        depths: (0.1, 0.6),
        modes: vec![Mode::Qllm, Mode::Infllm],
        seed: 1,
        max_new_tokens: 12,
        config: None,
        json: None,
        fresh: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--tokens" => args.tokens = value.parse().context("--tokens")?,
            "--depths" => {
                let depths: Vec<f64> = value
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--depths")?;
                let [a, b] = depths[..] else {
                    bail!("--depths takes two depths, e.g. 0.1,0.6\n{USAGE}");
                };
                if !(0.0..1.0).contains(&a) || !(0.0..1.0).contains(&b) {
                    bail!("--depths must lie in [0, 1)");
                }
                args.depths = (a, b);
            }
            "--modes" => {
                args.modes = value
                    .split(',')
                    .map(|m| m.parse().map_err(anyhow::Error::msg))
                    .collect::<Result<_>>()
                    .context("--modes")?;
            }
            "--seed" => args.seed = value.parse().context("--seed")?,
            "--max-new-tokens" => {
                args.max_new_tokens = value.parse().context("--max-new-tokens")?
            }
            "--config" => args.config = Some(value.into()),
            "--json" => args.json = Some(value.into()),
            "--fresh" => args.fresh = value.parse().context("--fresh (true or false)")?,
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    Ok(args)
}

/// The document with both facts, and the two facts.
struct Document {
    text: String,
    facts: [Asked; 2],
}

/// A question, the start of its answer, and what a right answer contains.
struct Asked {
    question: String,
    answer_prefix: String,
    answer: String,
}

/// Puts `sentence` after the sentence end nearest `depth` of the way
/// through the document part of `text` (after `from`).
fn insert_at(text: &str, from: usize, sentence: &str, depth: f64) -> Result<String> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    let target = from + ((text.len() - from) as f64 * depth) as usize;
    let at = text[from..]
        .match_indices(". ")
        .map(|(i, _)| from + i + 1)
        .min_by_key(|&i| i.abs_diff(target))
        .context("the document has no sentence end")?;
    Ok(format!("{} {}{}", &text[..at], sentence, &text[at..]))
}

fn document(args: &Args, corpus: &Corpus, tokenizer: &EngineTokenizer) -> Result<Document> {
    let sample = eval::generate(
        Task::Fact,
        args.tokens,
        args.depths.0,
        args.seed,
        Placement::Last,
        corpus,
        tokenizer,
    )?;
    let tail_start = sample
        .prompt
        .rfind("\n\nAnswer the question using the text above.")
        .context("a `fact` prompt ends with its question")?;
    let answer_at = sample
        .prompt
        .rfind("\nAnswer: ")
        .context("a `fact` prompt ends with the start of its answer")?;
    let first = Asked {
        question: sample.question.clone(),
        answer_prefix: sample.prompt[answer_at + "\nAnswer: ".len()..].to_string(),
        answer: sample.answers[0].clone(),
    };
    // A second fact of another kind, whose answer the text does not hold.
    let kind = |question: &str| question.split(' ').take(2).collect::<Vec<_>>().join(" ");
    let second = (1..)
        .map(|i| eval::draw_fact(args.seed.wrapping_add(1000 * i)))
        .find(|f| kind(&f.question) != kind(&first.question) && !sample.prompt.contains(&f.answer))
        .expect("some seed draws another fact");
    let head_end = sample
        .prompt
        .find("\n\n")
        .map_or(0, |i| i + 2)
        .min(tail_start);
    let text = insert_at(
        &sample.prompt[..tail_start],
        head_end,
        &second.sentence,
        args.depths.1,
    )?;
    let second_sentence = second.sentence.clone();
    let second = Asked {
        question: second.question,
        answer_prefix: second.answer_prefix,
        answer: second.answer,
    };
    debug_assert!(text.contains(&second_sentence));
    Ok(Document {
        text,
        facts: [first, second],
    })
}

#[derive(serde::Serialize)]
struct Row {
    mode: String,
    turn: &'static str,
    answer: String,
    right: bool,
    prompt_tokens: usize,
    reused_prompt_tokens: usize,
    prefill_s: f64,
    wall_s: f64,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !args.model.exists() {
        bail!(
            "model file {} does not exist (scripts/fetch-assets.sh fetches the default)",
            args.model.display()
        );
    }
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let runtime = tokio::runtime::Runtime::new()?;
    let hook_config = |mode: Mode| -> Result<qllm::QllmConfig> {
        let mut file = match &args.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        file.mode = Some(mode);
        Ok(file.resolve()?)
    };
    let mut hook = qllm::install_config(hook_config(args.modes[0])?);
    let mistralrs = runtime.block_on(
        MistralRsForServerBuilder::new()
            .with_model(ModelSelected::GGUF {
                tok_model_id: None,
                quantized_model_id: args.model.parent().unwrap().to_string_lossy().into(),
                quantized_filename: args.model.file_name().unwrap().to_string_lossy().into(),
                dtype: ModelDType::F32,
                topology: None,
                max_seq_len: 4096,
                max_batch_size: 1,
            })
            .with_cpu(true)
            .with_token_source(TokenSource::None)
            .build(),
    )?;
    let tokenizer = EngineTokenizer::new(&mistralrs)?;
    let corpus = Corpus::load(std::path::Path::new("assets"), true, false, false)?;
    let doc = document(&args, &corpus, &tokenizer)?;
    let [first, second] = &doc.facts;
    println!(
        "document of about {} tokens; {:?} ({}) at {}, {:?} ({}) at {}",
        args.tokens,
        first.question,
        first.answer,
        args.depths.0,
        second.question,
        second.answer,
        args.depths.1
    );

    let mut rows = Vec::new();
    for &mode in &args.modes {
        let idle_by = Instant::now() + std::time::Duration::from_secs(60);
        while hook.memory_stats().sequences > 0 && Instant::now() < idle_by {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        hook = qllm::install_config(hook_config(mode)?);
        let ask = |prompt: String, fact: &Asked, turn: &'static str, reuse: bool| {
            let options = RequestOptions {
                question: Some(fact.question.clone()),
                reuse: Some(reuse),
                // A kept state is resumed by a prompt that begins as its own;
                // a question copied first would begin each prompt with it.
                question_first: Some(false),
                ..RequestOptions::default()
            };
            let start = Instant::now();
            let done = runtime.block_on(complete(
                &mistralrs,
                prompt,
                args.max_new_tokens,
                Some((&hook, &options)),
            ))?;
            let report = done.report.clone().unwrap_or_default();
            let row = Row {
                mode: mode.to_string(),
                turn,
                right: eval::score(std::slice::from_ref(&fact.answer), &done.text) > 0.99,
                answer: done.text.clone(),
                prompt_tokens: done.usage.prompt_tokens,
                reused_prompt_tokens: report.reused_prompt_tokens,
                prefill_s: f64::from(done.usage.total_prompt_time_sec),
                wall_s: start.elapsed().as_secs_f64(),
            };
            println!(
                "{mode:>9} {turn:<21} {} {:<28} prompt {:>6} tokens, {:>6} reused; prefill \
                 {:>7.2} s, wall {:>7.2} s",
                if row.right { "right" } else { "wrong" },
                format!("{:?}", row.answer.trim()),
                row.prompt_tokens,
                row.reused_prompt_tokens,
                row.prefill_s,
                row.wall_s
            );
            // Let the engine drop the sequence, so its final state is kept.
            let idle_by = Instant::now() + std::time::Duration::from_secs(60);
            while hook.memory_stats().sequences > 0 && Instant::now() < idle_by {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            anyhow::Ok((row, done.text))
        };
        let turn1 = format!(
            "{}{}",
            doc.text,
            eval::fact_tail(&first.question, &first.answer_prefix)
        );
        let (row, answer1) = ask(turn1.clone(), first, "first", true)?;
        rows.push(row);
        let follow_up = format!(
            "{turn1}{answer1}\nQuestion: {}\nAnswer: {}",
            second.question, second.answer_prefix
        );
        rows.push(ask(follow_up.clone(), second, "follow-up", true)?.0);
        if args.fresh {
            rows.push(ask(follow_up, second, "follow-up fresh", false)?.0);
        }
        let other = format!(
            "{}{}",
            doc.text,
            eval::fact_tail(&second.question, &second.answer_prefix)
        );
        rows.push(ask(other.clone(), second, "other question", true)?.0);
        if args.fresh {
            rows.push(ask(other, second, "other question fresh", false)?.0);
        }
        let kept = hook.prefix_stats();
        println!(
            "{mode:>9} kept prefixes: {} holding {:.1} MiB",
            kept.entries,
            kept.bytes as f64 / f64::from(1 << 20)
        );
        hook.clear_prefixes();
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

//! Long-context evaluation through mistral.rs: a grid of tasks x context
//! lengths x needle depths x attention modes, with accuracy and cost per
//! cell, a JSON results file and pictures (needle heatmaps, accuracy
//! against length).
//!
//! ```text
//! cargo run --release --example eval -- [--quick] [--model FILE.gguf]
//!     [--tasks passkey,number,kv_retrieval,niah_single,niah_multikey,hotpotqa,fact,fact_jargon]
//!     [--lengths 1024,4096] [--depths 0,0.5,1] [--modes qllm,infllm,streaming,dense]
//!     [--samples 1] [--seed 1] [--question-first] [--preset 1k] [--config qllm.toml]
//!     [--max-new-tokens 16] [--quantized-matmul] [--in-line-question]
//!     [--drawn-as TOKENS] [--out results/eval/NAME]
//! ```
//!
//! `--drawn-as 12288` draws every cell's needle, question and haystack as
//! for a 12288-token cell and cuts the document to the cell's length: the
//! facts of a 12K grid, asked of full attention inside the window.
//!
//! Each prompt's question is given to Q-LLM as the request's question, whose
//! vectors a probe pass computes before the prompt is read
//! ([`qllm::question`]); `--in-line-question` instead captures them where the
//! question is read, as the paper's code does.
//!
//! Finished cells are kept in `OUT/results.json` and not recomputed when the
//! same command runs again.

mod plot;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mistralrs_core::{ModelDType, ModelSelected, TokenSource};
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;
use qllm::engine::trace::NeedleReport;
use qllm::eval::{self, complete, Corpus, EngineTokenizer, Placement, Sample, Task};
use qllm::RequestOptions;
use qllm::{ConfigFile, Mode};
use serde::{Deserialize, Serialize};

/// Settings that change results: a resumed run must use the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    model: String,
    seed: u64,
    placement: Placement,
    max_new_tokens: usize,
    preset: Option<String>,
    config: Option<String>,
    /// `dequantized` (f32 weights, CANDLE_DEQUANTIZE_ALL) or `quantized`.
    weights: String,
    /// `probe` when the question's vectors come from a probe pass; absent
    /// when they are captured where the question is read (`--in-line-question`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    question_vectors: Option<String>,
    /// Every cell's needle, question and haystack drawn as for a cell of
    /// this many tokens (`--drawn-as`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    drawn_as: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cell {
    task: Task,
    mode: Mode,
    length: usize,
    depth: f64,
    sample: usize,
    prompt_tokens: usize,
    needle_token: usize,
    answers: Vec<String>,
    output: String,
    score: f64,
    prefill_s: f64,
    decode_s: f64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    peak_rss_mib: f64,
    error: Option<String>,
    /// Whether the needle's memory blocks were retrieved, per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    needle: Option<NeedleReport>,
    /// Memory blocks of a layer, and the Q-LLM state's bytes, at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memory: Option<(usize, usize)>,
}

impl Cell {
    fn key(&self) -> CellKey {
        CellKey::new(self.task, self.mode, self.length, self.depth, self.sample)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct CellKey {
    task: Task,
    mode: String,
    length: usize,
    depth_per_mille: u32,
    sample: usize,
}

impl CellKey {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn new(task: Task, mode: Mode, length: usize, depth: f64, sample: usize) -> Self {
        CellKey {
            task,
            mode: mode.to_string(),
            length,
            depth_per_mille: (depth * 1000.0).round() as u32,
            sample,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RunFile {
    settings: Settings,
    cells: Vec<Cell>,
}

struct Args {
    model: PathBuf,
    tasks: Vec<Task>,
    lengths: Vec<usize>,
    depths: Vec<f64>,
    modes: Vec<Mode>,
    samples: usize,
    seed: u64,
    placement: Placement,
    preset: Option<String>,
    config: Option<PathBuf>,
    max_new_tokens: usize,
    quantized_matmul: bool,
    in_line_question: bool,
    drawn_as: Option<usize>,
    out: Option<PathBuf>,
}

const USAGE: &str = "usage: eval [--quick] [--model FILE.gguf] [--tasks LIST] [--lengths LIST] \
                     [--depths LIST] [--modes LIST] [--samples N] [--seed N] [--question-first] \
                     [--preset NAME] [--config FILE] [--max-new-tokens N] [--quantized-matmul] \
                     [--in-line-question] [--drawn-as TOKENS] [--out DIR]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: PathBuf::from("assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
        tasks: Task::ALL.to_vec(),
        lengths: vec![1024, 2048, 4096, 8192, 16384, 32768],
        depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
        modes: vec![Mode::Qllm, Mode::Infllm, Mode::Streaming, Mode::Dense],
        samples: 1,
        seed: 1,
        placement: Placement::Last,
        preset: None,
        config: None,
        max_new_tokens: 16,
        quantized_matmul: false,
        in_line_question: false,
        drawn_as: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--quick" => {
                args.tasks = vec![Task::Passkey, Task::NiahSingle];
                args.lengths = vec![1024, 2048];
                args.depths = vec![0.25, 0.75];
                args.modes = vec![Mode::Qllm, Mode::Infllm];
            }
            "--model" => args.model = value()?.into(),
            "--tasks" => args.tasks = list(&value()?, "--tasks")?,
            "--lengths" => args.lengths = list(&value()?, "--lengths")?,
            "--depths" => args.depths = list(&value()?, "--depths")?,
            "--modes" => args.modes = list(&value()?, "--modes")?,
            "--samples" => args.samples = value()?.parse().context("--samples")?,
            "--seed" => args.seed = value()?.parse().context("--seed")?,
            "--question-first" => args.placement = Placement::First,
            "--in-line-question" => args.in_line_question = true,
            "--drawn-as" => args.drawn_as = Some(value()?.parse().context("--drawn-as")?),
            "--preset" => args.preset = Some(value()?),
            "--config" => args.config = Some(value()?.into()),
            "--max-new-tokens" => {
                args.max_new_tokens = value()?.parse().context("--max-new-tokens")?;
            }
            "--quantized-matmul" => args.quantized_matmul = true,
            "--out" => args.out = Some(value()?.into()),
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
    if args.samples == 0 || args.max_new_tokens == 0 {
        bail!("--samples and --max-new-tokens must be at least 1");
    }
    if args.tasks.is_empty() || args.lengths.is_empty() || args.depths.is_empty() {
        bail!("--tasks, --lengths and --depths must not be empty");
    }
    Ok(args)
}

fn list<T: std::str::FromStr>(text: &str, flag: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    text.split(',')
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("{flag}: bad item {s:?}: {e}"))
        })
        .collect()
}

/// The model's trained context, from its GGUF metadata.
fn context_length(model: &Path) -> Result<usize> {
    let mut file = std::fs::File::open(model)
        .with_context(|| format!("cannot open model file {}", model.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .with_context(|| format!("{} is not a GGUF file", model.display()))?;
    let value = content
        .metadata
        .iter()
        .find(|(k, _)| k.ends_with(".context_length"))
        .map(|(_, v)| v.to_u64())
        .context("the GGUF file has no context_length")??;
    Ok(usize::try_from(value)?)
}

/// Peak resident memory since the last [`reset_peak_rss`].
fn peak_rss_mib() -> f64 {
    #[allow(clippy::cast_precision_loss)] // Display only.
    qllm::system::proc_bytes("/proc/self/status", "VmHWM")
        .map_or(f64::NAN, |bytes| bytes as f64 / (1024.0 * 1024.0))
}

fn reset_peak_rss() {
    // Linux: "5" resets the peak resident set size to the current one.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn save(path: &Path, run: &RunFile) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(run)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn load(path: &Path, settings: &Settings) -> Result<Vec<Cell>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let run: RunFile = serde_json::from_str(&std::fs::read_to_string(path)?)
        .with_context(|| format!("{} is not a results file of this program", path.display()))?;
    if run.settings != *settings {
        bail!(
            "{} was made with other settings ({:?}); pass another --out",
            path.display(),
            run.settings
        );
    }
    Ok(run.cells)
}

fn hook_config(args: &Args, mode: Mode) -> Result<qllm::QllmConfig> {
    let mut file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    file.mode = Some(mode);
    if let Some(preset) = &args.preset {
        file.preset = Some(preset.parse().map_err(anyhow::Error::msg)?);
    }
    let mut config = file.resolve()?;
    // Each cell reads its prompt from the start, and its peak RSS is its own.
    config.caps.prefix_cache_memory = 0;
    Ok(config)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if std::env::var_os("RUST_LOG").is_some() {
        mistralrs_core::initialize_logging();
    }
    if !args.model.exists() {
        bail!(
            "model file {} does not exist (scripts/fetch-assets.sh fetches the default)",
            args.model.display()
        );
    }
    if !args.quantized_matmul {
        // Before any weight is loaded: candle reads it once per thread.
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    }
    let model_name = args
        .model
        .file_name()
        .context("--model has no file name")?
        .to_string_lossy()
        .into_owned();
    let settings = Settings {
        model: model_name.clone(),
        seed: args.seed,
        placement: args.placement,
        max_new_tokens: args.max_new_tokens,
        preset: args.preset.clone(),
        config: args.config.as_ref().map(|p| p.display().to_string()),
        weights: if args.quantized_matmul {
            "quantized"
        } else {
            "dequantized"
        }
        .into(),
        question_vectors: (!args.in_line_question).then(|| "probe".into()),
        drawn_as: args.drawn_as,
    };
    for &mode in &args.modes {
        hook_config(&args, mode)?;
    }
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("results/eval").join(model_name.trim_end_matches(".gguf"))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let results_path = out.join("results.json");
    let mut cells = load(&results_path, &settings)?;
    let done: HashMap<CellKey, usize> = cells
        .iter()
        .enumerate()
        .map(|(i, c)| (c.key(), i))
        .collect();

    let context = context_length(&args.model)?;
    let assets = PathBuf::from("assets");
    let corpus = Corpus::load(
        &assets,
        args.tasks.iter().any(|t| t.needs_essays()),
        args.tasks.contains(&Task::Hotpotqa),
        args.tasks.iter().any(|t| t.needs_jargon()),
    )?;

    // Every cell to run, grouped by prompt so the modes share one.
    let mut plan: Vec<PlannedPrompt> = Vec::new();
    for &length in &args.lengths {
        for &depth in &args.depths {
            for &task in &args.tasks {
                for sample in 0..args.samples {
                    let modes: Vec<Mode> = args
                        .modes
                        .iter()
                        .copied()
                        .filter(|&m| m != Mode::Dense || length + args.max_new_tokens <= context)
                        .filter(|&m| {
                            !done.contains_key(&CellKey::new(task, m, length, depth, sample))
                        })
                        .collect();
                    if !modes.is_empty() {
                        plan.push((task, length, depth, sample, modes));
                    }
                }
            }
        }
    }
    let total_tokens: usize = plan.iter().map(|(_, l, _, _, m)| l * m.len()).sum();
    println!(
        "{}: {} cells to run ({} done), {} prompt tokens; results in {}{}",
        model_name,
        plan.iter().map(|p| p.4.len()).sum::<usize>(),
        cells.len(),
        total_tokens,
        results_path.display(),
        if args.quantized_matmul {
            ""
        } else {
            "; weights dequantized to f32 (--quantized-matmul keeps the GGUF kernels)"
        }
    );

    if !plan.is_empty() {
        run_plan(
            &args,
            &settings,
            plan,
            total_tokens,
            &results_path,
            &corpus,
            &mut cells,
        )?;
    }
    let pictures = plot::render(&out, &cells)?;
    println!("{}", summary(&cells));
    for path in pictures {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// A prompt and the modes to run it with.
type PlannedPrompt = (Task, usize, f64, usize, Vec<Mode>);

/// Loads the model and runs every planned cell, saving after each.
fn run_plan(
    args: &Args,
    settings: &Settings,
    plan: Vec<PlannedPrompt>,
    total_tokens: usize,
    results_path: &Path,
    corpus: &Corpus,
    cells: &mut Vec<Cell>,
) -> Result<()> {
    let model_name = settings.model.clone();
    let runtime = tokio::runtime::Runtime::new()?;
    let first_mode = args.modes.first().copied().unwrap_or(Mode::Qllm);
    let mut hook = qllm::install_config(hook_config(args, first_mode)?);
    let mistralrs = runtime.block_on(
        MistralRsForServerBuilder::new()
            .with_model(ModelSelected::GGUF {
                tok_model_id: None,
                quantized_model_id: args.model.parent().unwrap().to_string_lossy().into(),
                quantized_filename: model_name.clone(),
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

    let bar = ProgressBar::new(total_tokens as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {percent:>3}% of prompt tokens, {eta} left  {msg}",
        )?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_secs(1));
    for (task, length, depth, sample, modes) in plan {
        bar.set_message(format!("{} {length} @ {depth}", task.name()));
        let seed = args.seed.wrapping_add(sample as u64);
        let prompt: Sample = eval::generate_drawn_as(
            task,
            length,
            args.drawn_as.unwrap_or(length),
            depth,
            seed,
            args.placement,
            corpus,
            &tokenizer,
        )
        .with_context(|| format!("{} at {length} tokens", task.name()))?;
        let question = tokenizer.encode(&prompt.question)?;
        let options = RequestOptions {
            question: Some(prompt.question.clone()),
            needle_span: Some(prompt.needle_token..prompt.needle_end),
            ..RequestOptions::default()
        };
        for mode in modes {
            bar.set_message(format!("{} {length} @ {depth} {mode}", task.name()));
            // The engine may step a finished sequence once more before
            // dropping it: swap hooks only once the last one holds nothing.
            let idle_by = std::time::Instant::now() + Duration::from_secs(120);
            while hook.memory_stats().sequences > 0 && std::time::Instant::now() < idle_by {
                std::thread::sleep(Duration::from_millis(50));
            }
            hook = qllm::install_config(hook_config(args, mode)?);
            let qllm = if args.in_line_question {
                hook.set_question(Some(question.clone()));
                None
            } else {
                Some((&hook, &options))
            };
            reset_peak_rss();
            let result = runtime.block_on(complete(
                &mistralrs,
                prompt.prompt.clone(),
                args.max_new_tokens,
                qllm,
            ));
            let cell = match result {
                Ok(done) => Cell {
                    task,
                    mode,
                    length,
                    depth,
                    sample,
                    prompt_tokens: done.usage.prompt_tokens,
                    needle_token: prompt.needle_token,
                    answers: prompt.answers.clone(),
                    score: eval::score(&prompt.answers, &done.text),
                    output: done.text,
                    prefill_s: f64::from(done.usage.total_prompt_time_sec),
                    decode_s: f64::from(done.usage.total_completion_time_sec),
                    prefill_tok_s: f64::from(done.usage.avg_prompt_tok_per_sec),
                    decode_tok_s: f64::from(done.usage.avg_compl_tok_per_sec),
                    peak_rss_mib: peak_rss_mib(),
                    error: None,
                    memory: done.report.as_ref().map(|r| (r.blocks, r.memory_bytes)),
                    needle: done.report.and_then(|r| r.needle),
                },
                Err(e) => Cell {
                    task,
                    mode,
                    length,
                    depth,
                    sample,
                    prompt_tokens: prompt.prompt_tokens,
                    needle_token: prompt.needle_token,
                    answers: prompt.answers.clone(),
                    output: String::new(),
                    score: 0.0,
                    prefill_s: 0.0,
                    decode_s: 0.0,
                    prefill_tok_s: 0.0,
                    decode_tok_s: 0.0,
                    peak_rss_mib: peak_rss_mib(),
                    error: Some(format!("{e:#}")),
                    needle: None,
                    memory: None,
                },
            };
            let line = format!(
                "{:<13} {:<9} {length:>6} @ {depth:<4} score {:.2}  {}  prefill {:>6.1} tok/s  \
                 decode {:>5.1} tok/s  {:>6.0} MiB  {:?}",
                task.name(),
                mode.to_string(),
                cell.score,
                needle_summary(cell.needle.as_ref()),
                cell.prefill_tok_s,
                cell.decode_tok_s,
                cell.peak_rss_mib,
                cell.error.as_deref().unwrap_or(&cell.output),
            );
            // A hidden bar (output not a terminal) drops its log lines.
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
            cells.push(cell);
            save(
                results_path,
                &RunFile {
                    settings: settings.clone(),
                    cells: cells.clone(),
                },
            )?;
            bar.inc(length as u64);
        }
    }
    bar.finish_and_clear();
    drop(hook);
    Ok(())
}

/// "needle retrieved by N of L layers" at the first decode step (and at the
/// question), with the blocks it lies in.
fn needle_summary(needle: Option<&NeedleReport>) -> String {
    match needle {
        Some(n) => {
            let mut ranks: Vec<usize> = n.ranks_at_question.iter().flatten().copied().collect();
            ranks.sort_unstable();
            let median = ranks
                .get(ranks.len() / 2)
                .map_or("-".to_string(), ToString::to_string);
            let at_question = if n.question_before {
                "question read before it".to_string()
            } else {
                format!(
                    "retrieved by {}/{} layers at the question (median rank {median})",
                    n.at_question, n.layers
                )
            };
            format!(
                "needle in blocks {:?}{}: {at_question}, {}/{} at the answer's first token, {}/{} \
                 at decode",
                n.blocks,
                if n.cut { " (cut)" } else { "" },
                n.at_answer,
                n.layers,
                n.at_decode.first().copied().unwrap_or(0),
                n.layers
            )
        }
        None => "needle not traced".into(),
    }
}

/// Mean score per task, mode and length, as a table.
fn summary(cells: &[Cell]) -> String {
    let mut sums: BTreeMap<(Task, String, usize), (f64, usize)> = BTreeMap::new();
    for c in cells {
        let e = sums
            .entry((c.task, c.mode.to_string(), c.length))
            .or_default();
        e.0 += c.score;
        e.1 += 1;
    }
    let mut text = String::from("task\tmode\tlength\tmean_score\tcells\n");
    for ((task, mode, length), (sum, n)) in sums {
        #[allow(clippy::cast_precision_loss)]
        let mean = sum / n as f64;
        text.push_str(&format!(
            "{}\t{mode}\t{length}\t{mean:.2}\t{n}\n",
            task.name()
        ));
    }
    text
}

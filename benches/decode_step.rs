//! One decode step of one layer's Q-LLM memory, against the number of
//! memory blocks, for each retrieval setting: the cost of block scoring as
//! the context grows. SmolLM2-135M's shapes (9 query heads, 3 KV heads, head
//! size 64), f32 activations, random keys, the `1k` preset, a question of
//! one row per head (the question vector) or, with `question_rows =
//! "tokens"`, 16; memory blocks in the model's dtype, bf16 or 8-bit rows
//! (`block_dtype`), and with `mass_candidates`, `answer_mass_candidates`,
//! `answer_refresh` or `answer_pool` (decode steps only) where a row names
//! them. Each cell: the median (and mean) decode step, the median prefill execution block (512 tokens) over the last
//! quarter of the prompt, and the memory's bytes per token at the longest
//! length.
//!
//! `cargo bench --bench decode_step` prints medians of 30 decode steps per cell;
//! `cargo bench --bench decode_step -- NAME [TOKENS [STEPS]]` runs only the
//! settings whose name contains `NAME` (one length, more steps), e.g. under
//! `perf record`, where the steps must outweigh filling the memory.

use std::time::Instant;

use candle_core::{Device, Tensor};
use qllm::attention::{MaskCache, RopeTable};
use qllm::memory::{LayerMemory, StepArgs};
use qllm::{BlockDType, Policy, QuestionRows, Scoring, Selection};

const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const D: usize = 64;
/// Decode steps timed per cell (the median is printed).
const STEPS: usize = 30;

fn random(shape: (usize, usize, usize, usize), device: &Device) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, device).expect("random tensor")
}

/// Question tokens of the `question_rows = "tokens"` rows.
const QUESTION_TOKENS: usize = 16;

/// What one cell measured.
struct Cell {
    /// Median seconds of one prefill execution block over the last quarter
    /// of the prompt (at least one block).
    prefill_block: f64,
    /// Median seconds of one decode step.
    decode_step: f64,
    /// Mean seconds of one decode step: with `answer_refresh` the median is
    /// a step between retrievals.
    mean_decode_step: f64,
    /// The memory's bytes at the end.
    bytes: usize,
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Fills a memory with `tokens` prompt tokens, then runs `steps` decode
/// steps.
fn measure(config: &Policy, tokens: usize, steps: usize) -> Cell {
    let device = Device::Cpu;
    let rope = RopeTable::new(100_000.0, D, 2048, true, &device).unwrap();
    let masks = MaskCache::default();
    let args = StepArgs {
        rope: &rope,
        softmax_scale: 0.125,
        question: None,
        // Steps past the prompt are decode steps (`answer_mass_candidates`).
        prompt_len: tokens,
        masks: &masks,
        votes: None,
        sentence_ends: &[],
    };
    let mut memory = LayerMemory::default();
    let rows = match config.question_rows {
        QuestionRows::Mean => 1,
        QuestionRows::Tokens => QUESTION_TOKENS,
    };
    let question = random((1, HEADS, rows, D), &device);
    memory.set_question(question.flatten_all().unwrap().to_vec1().unwrap());
    let mut done = 0;
    let mut prefill = Vec::new();
    while done < tokens {
        let e = config.exc_block_size.min(tokens - done);
        let q = random((1, HEADS, e, D), &device);
        let k = random((1, KV_HEADS, e, D), &device);
        let v = random((1, KV_HEADS, e, D), &device);
        let start = Instant::now();
        memory.append(config, &args, &q, &k, &v, |_| {}).unwrap();
        if done + e > tokens * 3 / 4 || done + e == tokens {
            prefill.push(start.elapsed().as_secs_f64());
        }
        masks.clear();
        done += e;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let q = random((1, HEADS, 1, D), &device);
        let k = random((1, KV_HEADS, 1, D), &device);
        let v = random((1, KV_HEADS, 1, D), &device);
        let start = Instant::now();
        memory.append(config, &args, &q, &k, &v, |_| {}).unwrap();
        times.push(start.elapsed().as_secs_f64());
    }
    #[allow(clippy::cast_precision_loss)] // a number of steps
    let mean_decode_step = times.iter().sum::<f64>() / times.len() as f64;
    Cell {
        prefill_block: median(prefill),
        decode_step: median(times),
        mean_decode_step,
        bytes: memory.bytes(),
    }
}

fn main() {
    use BlockDType::{Bf16, Q8_0};
    use Scoring::{AttentionMass, Dot, TokenMax};
    use Selection::{PerKvHead, Shared};
    let default = Policy::default();
    let paper = Policy {
        scoring: Dot,
        selection: Shared,
        ..default
    };
    let settings: Vec<(&str, Policy)> = vec![
        ("dot, shared (paper)", paper),
        (
            "dot, shared (paper), q8_0 blocks",
            Policy {
                block_dtype: Q8_0,
                ..paper
            },
        ),
        (
            "dot, per_kv_head",
            Policy {
                selection: PerKvHead,
                ..paper
            },
        ),
        (
            "attention_mass, shared",
            Policy {
                scoring: AttentionMass,
                selection: Shared,
                ..default
            },
        ),
        ("attention_mass, per_kv_head (default)", default),
        (
            "attention_mass, per_kv_head, answer_mass_candidates 64",
            Policy {
                answer_mass_candidates: 64,
                ..default
            },
        ),
        (
            "attention_mass, per_kv_head, answer_refresh 8",
            Policy {
                answer_refresh: 8,
                ..default
            },
        ),
        (
            "attention_mass, per_kv_head, answer_refresh 8, answer_pool 32",
            Policy {
                answer_refresh: 8,
                answer_pool: 32,
                ..default
            },
        ),
        (
            "attention_mass, per_kv_head, mass_candidates 32",
            Policy {
                mass_candidates: 32,
                ..default
            },
        ),
        (
            "attention_mass, per_kv_head, mass_candidates 64",
            Policy {
                mass_candidates: 64,
                ..default
            },
        ),
        (
            "attention_mass, per_kv_head, bf16 blocks",
            Policy {
                block_dtype: Bf16,
                ..default
            },
        ),
        (
            "attention_mass, per_kv_head, q8_0 blocks",
            Policy {
                block_dtype: Q8_0,
                ..default
            },
        ),
        (
            "attention_mass, per_kv_head, q8_0 blocks, mass_candidates 64",
            Policy {
                block_dtype: Q8_0,
                mass_candidates: 64,
                ..default
            },
        ),
        (
            "attention_mass, per_kv_head, question_rows tokens",
            Policy {
                question_rows: QuestionRows::Tokens,
                ..default
            },
        ),
        (
            "token_max, shared",
            Policy {
                scoring: TokenMax,
                selection: Shared,
                ..default
            },
        ),
    ];
    // `cargo bench` passes `--bench` to a harness-less bench: skip flags.
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
    let only = args.next();
    let lengths: Vec<usize> = match args.next() {
        Some(tokens) => vec![tokens.parse().expect("TOKENS: a number of tokens")],
        None => vec![1024, 16_384, 65_536],
    };
    let steps = args
        .next()
        .map_or(STEPS, |s| s.parse().expect("STEPS: a number of steps"));
    let header: Vec<String> = lengths
        .iter()
        .map(|t| format!("{}K tokens", t / 1024))
        .collect();
    println!(
        "| setting | median (mean) decode step at {} | prefill block at {} | bytes/token |",
        header.join(", "),
        header.join(", ")
    );
    println!("|---|---|---|---|");
    for (name, config) in &settings {
        if only
            .as_ref()
            .is_some_and(|only| !name.contains(only.as_str()))
        {
            continue;
        }
        let cells: Vec<(usize, Cell)> = lengths
            .iter()
            .map(|&tokens| (tokens, measure(config, tokens, steps)))
            .collect();
        let ms = |f: &dyn Fn(&Cell) -> f64| {
            cells
                .iter()
                .map(|(_, c)| format!("{:.2}", f(c) * 1e3))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let (tokens, last) = cells.last().expect("a length");
        println!(
            "| {name} | {} ms ({} ms mean) | {} ms | {} |",
            ms(&|c| c.decode_step),
            ms(&|c| c.mean_decode_step),
            ms(&|c| c.prefill_block),
            last.bytes / tokens
        );
    }
}

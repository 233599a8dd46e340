//! The Q-LLM policy driven directly through the attention hook interface with
//! synthetic queries, keys and values (no model).

use candle_core::{DType, Device, Tensor};
use mistralrs_core::attention_hook::{AttentionHook, AttentionHookCtx, StepSequence};
use mistralrs_core::layers::RotaryEmbedding;
use qllm::attention::reference::tensor_max_abs_diff;
use qllm::{BlockDType, LayerStats, Mode, Policy, QllmConfig, QllmHook};

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const DIM: usize = 16;
/// In the interleaved RoPE layout the last pair of dimensions turns slowest:
/// by 0.02 radians at distance 63, so a key planted there is matched by a
/// query along the same direction at the global position.
const SLOW_DIM: usize = DIM - 2;

/// A small policy for the tests: 8 sinks, a 32-token window, execution
/// blocks of 16, 2 blocks of 8 retrieved, the paper's retrieval.
pub(crate) fn small_config(mode: Mode) -> Policy {
    Policy {
        mode,
        n_init: 8,
        n_local: 32,
        block_size: 8,
        exc_block_size: 16,
        topk: 2,
        repr_topk: 2,
        question_weight: 1.0,
        question_rows: qllm::QuestionRows::Mean,
        positions: qllm::Positions::Fixed,
        scoring: qllm::Scoring::Dot,
        selection: qllm::Selection::Shared,
        mass_candidates: 0,
        answer_mass_candidates: 0,
        neighbours: 0,
        consensus: 0,
        question_topk: 0,
        answer_topk: 0,
        answer_refresh: 1,
        answer_pool: 0,
        block_dtype: BlockDType::Model,
        boundaries: qllm::Boundaries::Fixed,
        question_first: false,
        question_vectors: qllm::QuestionVectors::InLine,
    }
}

fn rope() -> RotaryEmbedding {
    RotaryEmbedding::new(10_000.0, DIM, 256, &Device::Cpu, false, DType::F32).unwrap()
}

/// `(1, heads, len, DIM)` of small deterministic noise.
fn noise(heads: usize, len: usize, salt: usize) -> Tensor {
    let values: Vec<f32> = (0..heads * len * DIM)
        .map(|i| {
            let x = ((i * 7919 + salt * 104_729) % 1000) as f32 / 1000.0;
            0.2 * (x - 0.5)
        })
        .collect();
    Tensor::from_vec(values, (1, heads, len, DIM), &Device::Cpu).unwrap()
}

/// `(1, heads, len, DIM)` with every row `scale * e_dim`.
fn along(heads: usize, len: usize, dim: usize, scale: f32) -> Tensor {
    let mut values = vec![0f32; heads * len * DIM];
    for row in values.chunks_exact_mut(DIM) {
        row[dim] = scale;
    }
    Tensor::from_vec(values, (1, heads, len, DIM), &Device::Cpu).unwrap()
}

/// One layer of one sequence fed through the hook.
struct Feed {
    hook: QllmHook,
    rope: RotaryEmbedding,
    seq_id: usize,
    tokens: Vec<u32>,
}

impl Feed {
    fn new(policy: Policy, prompt_len: usize) -> Self {
        Self {
            hook: QllmHook::new(QllmConfig::from(policy).with_prefill_chunk_size(64)),
            rope: rope(),
            seq_id: 7,
            tokens: (0..prompt_len as u32).collect(),
        }
    }

    fn processed(&self) -> usize {
        self.stats().map_or(0, |s| s.processed)
    }

    fn stats(&self) -> Option<LayerStats> {
        self.hook
            .sequence_stats(self.seq_id)
            .map(|layers| layers[0].clone())
    }

    /// Feeds `q`, `k`, `v` as the next tokens; returns the attention output.
    fn step(&self, is_prompt: bool, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let offset = self.processed();
        let len = q.dim(2).unwrap();
        let tokens: Vec<u32> = if is_prompt {
            self.tokens.clone()
        } else {
            (0..(offset + len) as u32).collect()
        };
        self.hook
            .begin_step(&[StepSequence {
                seq_id: self.seq_id,
                tokens: &tokens,
                is_prompt,
            }])
            .unwrap();
        let ctx = AttentionHookCtx {
            layer_idx: 0,
            num_layers: 1,
            seq_ids: &[self.seq_id],
            seqlen_offsets: &[offset],
            rope: &self.rope,
            softmax_scale: 0.25,
        };
        self.hook.attend(&ctx, q, k, v).unwrap()
    }

    /// A prompt of noise, fed in calls of `chunk` tokens.
    fn noise_prompt(&self, len: usize, chunk: usize) {
        let (q, k, v) = (
            noise(HEADS, len, 1),
            noise(KV_HEADS, len, 2),
            noise(KV_HEADS, len, 3),
        );
        let mut at = 0;
        while at < len {
            let n = chunk.min(len - at);
            self.step(
                true,
                &q.narrow(2, at, n).unwrap(),
                &k.narrow(2, at, n).unwrap(),
                &v.narrow(2, at, n).unwrap(),
            );
            at += n;
        }
    }
}

#[test]
fn block_count_follows_the_invariant_at_every_length() {
    let config = small_config(Mode::Qllm);
    let feed = Feed::new(config, 1000);
    // Calls of uneven lengths, then single tokens as in decoding.
    for len in [5, 37, 16, 1, 64, 23]
        .into_iter()
        .chain(std::iter::repeat_n(1, 40))
    {
        let salt = feed.processed();
        feed.step(
            true,
            &noise(HEADS, len, salt),
            &noise(KV_HEADS, len, salt + 1),
            &noise(KV_HEADS, len, salt + 2),
        );
        let s = feed.stats().unwrap();
        let n = s.processed;
        let (n_init, n_local, bs) = (config.n_init, config.n_local, config.block_size);
        assert_eq!(
            s.init,
            n_init.min(n.saturating_sub(n_local)),
            "after {n} tokens"
        );
        assert_eq!(
            s.blocks,
            n.saturating_sub(n_init + n_local) / bs,
            "after {n} tokens"
        );
        assert_eq!(
            s.init + s.blocks * bs + s.recent,
            n,
            "no token lost after {n}"
        );
        if n >= n_init + n_local {
            assert!((n_local..n_local + bs).contains(&s.recent), "{s:?}");
        }
        assert!(s.last_retrieved.len() <= config.topk);
    }
    assert!(feed.processed() > 150);
}

#[test]
fn the_memory_high_water_mark_follows_the_largest_state_and_outlives_it() {
    let feed = Feed::new(small_config(Mode::Qllm), 300);
    assert_eq!(feed.hook.memory_stats().peak_bytes, 0);
    // Storage grows geometrically, so a chunk may fit in what is held.
    let mut held = Vec::new();
    for at in (0..300).step_by(60) {
        feed.step(
            true,
            &noise(HEADS, 60, at),
            &noise(KV_HEADS, 60, at + 1),
            &noise(KV_HEADS, 60, at + 2),
        );
        let stats = feed.hook.memory_stats();
        assert!(
            stats.bytes >= held.last().copied().unwrap_or(1),
            "{stats:?}"
        );
        assert_eq!(stats.peak_bytes, stats.bytes);
        held.push(stats.bytes);
    }
    let last = *held.last().unwrap();
    assert!(last > held[0], "{held:?}");
    feed.hook.end_sequence(feed.seq_id);
    let ended = feed.hook.memory_stats();
    assert_eq!((ended.sequences, ended.bytes), (0, 0));
    assert_eq!(ended.peak_bytes, last);
}

#[test]
fn streaming_keeps_sinks_and_window_only() {
    let config = small_config(Mode::Streaming);
    let feed = Feed::new(config, 300);
    feed.noise_prompt(300, 48);
    let s = feed.stats().unwrap();
    assert_eq!(s.blocks, 0);
    assert_eq!(s.init, config.n_init);
    assert_eq!(s.recent, config.n_local - 1);
    assert_eq!(s.dropped, 300 - config.n_init - (config.n_local - 1));
    assert!(s.last_retrieved.is_empty());
}

/// A prompt of noise with the keys of memory block `planted` along
/// `SLOW_DIM`, and optionally a question span at the end whose queries point
/// along `question_dim`.
fn planted_prompt(
    config: Policy,
    len: usize,
    planted: usize,
    question: Option<(usize, usize)>,
) -> Feed {
    let feed = Feed::new(config, len);
    let mut k = noise(KV_HEADS, len, 2);
    let start = config.n_init + planted * config.block_size;
    k = k
        .slice_assign(
            &[0..1, 0..KV_HEADS, start..start + config.block_size, 0..DIM],
            &along(KV_HEADS, config.block_size, SLOW_DIM, 4.0),
        )
        .unwrap();
    let mut q = noise(HEADS, len, 1);
    if let Some((question_len, question_dim)) = question {
        q = q
            .slice_assign(
                &[0..1, 0..HEADS, len - question_len..len, 0..DIM],
                &along(HEADS, question_len, question_dim, 4.0),
            )
            .unwrap();
        feed.hook
            .set_question(Some(feed.tokens[len - question_len..].to_vec()));
    }
    let v = noise(KV_HEADS, len, 3);
    let mut at = 0;
    while at < len {
        let n = 40.min(len - at);
        feed.step(
            true,
            &q.narrow(2, at, n).unwrap(),
            &k.narrow(2, at, n).unwrap(),
            &v.narrow(2, at, n).unwrap(),
        );
        at += n;
    }
    feed
}

#[test]
fn planted_key_block_is_retrieved_by_the_matching_query() {
    let config = Policy {
        topk: 1,
        ..small_config(Mode::Infllm)
    };
    for planted in [3, 11] {
        let feed = planted_prompt(config, 200, planted, None);
        assert!(feed.stats().unwrap().blocks > 11);
        let v = noise(KV_HEADS, 1, 9);
        feed.step(
            false,
            &along(HEADS, 1, SLOW_DIM, 4.0),
            &noise(KV_HEADS, 1, 8),
            &v,
        );
        assert_eq!(feed.stats().unwrap().last_retrieved, vec![planted]);
        // The opposite query ranks that block last.
        feed.step(
            false,
            &along(HEADS, 1, SLOW_DIM, -4.0),
            &noise(KV_HEADS, 1, 8),
            &v,
        );
        assert_ne!(feed.stats().unwrap().last_retrieved, vec![planted]);
    }
}

#[test]
fn question_steers_qllm_and_infllm_ignores_it() {
    // Block 5 holds keys along SLOW_DIM; the question's queries point there,
    // the decoded token's query points away from it.
    let planted = 5;
    let decode = |mode: Mode, with_question: bool| {
        let config = Policy {
            topk: 1,
            question_weight: 2.0,
            ..small_config(mode)
        };
        let question = with_question.then_some((6, SLOW_DIM));
        let feed = planted_prompt(config, 200, planted, question);
        let out = feed.step(
            false,
            &along(HEADS, 1, SLOW_DIM, -1.0),
            &noise(KV_HEADS, 1, 8),
            &noise(KV_HEADS, 1, 9),
        );
        let stats = feed.stats().unwrap();
        (out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), stats)
    };
    let (qllm_out, qllm) = decode(Mode::Qllm, true);
    assert!(qllm.has_question);
    assert_eq!(qllm.last_retrieved, vec![planted]);

    let (infllm_q_out, infllm_q) = decode(Mode::Infllm, true);
    let (infllm_out, infllm) = decode(Mode::Infllm, false);
    assert!(!infllm_q.has_question);
    assert_ne!(infllm.last_retrieved, vec![planted]);
    assert_eq!(infllm_q.last_retrieved, infllm.last_retrieved);
    assert_eq!(
        infllm_q_out, infllm_out,
        "infllm output depends on the question"
    );
    assert_ne!(qllm_out, infllm_out);

    // Without a question, Q-LLM is InfLLM.
    let (qllm_plain_out, qllm_plain) = decode(Mode::Qllm, false);
    assert_eq!(qllm_plain.last_retrieved, infllm.last_retrieved);
    assert_eq!(qllm_plain_out, infllm_out);
}

#[test]
fn sequences_in_one_batch_do_not_see_each_other() {
    let config = small_config(Mode::Qllm);
    let rope = rope();
    let len = 120;
    let data = |salt: usize| {
        (
            noise(HEADS, len, salt),
            noise(KV_HEADS, len, salt + 1),
            noise(KV_HEADS, len, salt + 2),
        )
    };
    let (a, b) = (data(10), data(20));
    let run =
        |hook: &QllmHook, seq_ids: &[usize], q: &Tensor, k: &Tensor, v: &Tensor, offset: usize| {
            let tokens: Vec<u32> = (0..len as u32).collect();
            let seqs: Vec<StepSequence<'_>> = seq_ids
                .iter()
                .map(|&seq_id| StepSequence {
                    seq_id,
                    tokens: &tokens,
                    is_prompt: true,
                })
                .collect();
            hook.begin_step(&seqs).unwrap();
            let offsets = vec![offset; seq_ids.len()];
            let ctx = AttentionHookCtx {
                layer_idx: 0,
                num_layers: 1,
                seq_ids,
                seqlen_offsets: &offsets,
                rope: &rope,
                softmax_scale: 0.25,
            };
            hook.attend(&ctx, q, k, v).unwrap()
        };
    let chunks = [(0, 64), (64, len - 64)];
    let together = QllmHook::new(config);
    let mut batched = Vec::new();
    for (at, n) in chunks {
        let cat = |x: &Tensor, y: &Tensor| {
            Tensor::cat(
                &[x.narrow(2, at, n).unwrap(), y.narrow(2, at, n).unwrap()],
                0,
            )
            .unwrap()
        };
        batched.push(run(
            &together,
            &[1, 2],
            &cat(&a.0, &b.0),
            &cat(&a.1, &b.1),
            &cat(&a.2, &b.2),
            at,
        ));
    }
    let batched = Tensor::cat(&batched, 2).unwrap();
    for (row, (id, x)) in [(1, &a), (2, &b)].into_iter().enumerate() {
        let alone = QllmHook::new(config);
        let mut outs = Vec::new();
        for (at, n) in chunks {
            outs.push(run(
                &alone,
                &[id],
                &x.0.narrow(2, at, n).unwrap(),
                &x.1.narrow(2, at, n).unwrap(),
                &x.2.narrow(2, at, n).unwrap(),
                at,
            ));
        }
        let alone_out = Tensor::cat(&outs, 2).unwrap();
        let diff = tensor_max_abs_diff(&alone_out, &batched.narrow(0, row, 1).unwrap());
        assert_eq!(diff, 0.0, "row {row}");
        assert_eq!(alone.sequence_stats(id), together.sequence_stats(id));
    }
    assert!(together.sequence_stats(1).unwrap()[0].blocks > 0);
    together.end_sequence(1);
    assert_eq!(together.sequence_ids(), vec![2]);
}

#[test]
fn bf16_and_q8_blocks_cut_block_memory_and_keep_the_output_close() {
    let run = |block_dtype: BlockDType| {
        let feed = Feed::new(
            Policy {
                block_dtype,
                ..small_config(Mode::Qllm)
            },
            200,
        );
        feed.noise_prompt(200, 64);
        let out = feed.step(
            false,
            &noise(HEADS, 1, 4),
            &noise(KV_HEADS, 1, 5),
            &noise(KV_HEADS, 1, 6),
        );
        let stats = feed.stats().unwrap();
        assert!(stats.last_retrieved.len() == 2, "{stats:?}");
        (out, feed.hook.memory_stats().bytes, stats)
    };
    let (f32_out, f32_bytes, f32_stats) = run(BlockDType::Model);
    let (bf16_out, bf16_bytes, bf16_stats) = run(BlockDType::Bf16);
    // At least each block's K and V: 2 x KV_HEADS x block_size x DIM values.
    assert!(f32_stats.block_bytes >= f32_stats.blocks * 2 * KV_HEADS * 8 * DIM * 4);
    assert_eq!(f32_stats.block_bytes, 2 * bf16_stats.block_bytes);
    assert_eq!(f32_bytes - bf16_bytes, bf16_stats.block_bytes);
    assert_eq!(bf16_out.dtype(), DType::F32);
    let diff = tensor_max_abs_diff(&f32_out, &bf16_out);
    assert!(diff > 0.0 && diff < 1e-3, "max abs diff {diff}");
    // 8-bit rows: a byte per value and an f32 scale per row of DIM values.
    let (q8_out, q8_bytes, q8_stats) = run(BlockDType::Q8_0);
    assert_eq!(q8_stats.blocks, f32_stats.blocks);
    assert_eq!(
        q8_stats.block_bytes * 4 * DIM,
        f32_stats.block_bytes * (DIM + 4)
    );
    assert_eq!(
        f32_bytes - q8_bytes,
        f32_stats.block_bytes - q8_stats.block_bytes
    );
    let diff = tensor_max_abs_diff(&f32_out, &q8_out);
    assert!(diff > 0.0 && diff < 2e-2, "q8: max abs diff {diff}");
}

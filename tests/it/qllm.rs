//! The Q-LLM policy inside mistral.rs, on the tiny model in f32: equal to
//! `dense` where the local window covers the whole sequence, and equal to a
//! slow reference when every memory block is retrieved.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};
use mistralrs_core::attention_hook::{
    set_attention_hook, AttentionHook, AttentionHookCtx, HookModel, StepSequence,
};
use mistralrs_core::ModelDType;
use qllm::attention::reference::{reference_attention, MemoryState};
use qllm::{
    Boundaries, LayerStats, Mode, Policy, Positions, QllmConfig, QllmHook, QuestionRows, Scoring,
    Selection,
};

use crate::engine::{engine_lock, generate_tokens, load_gguf, max_abs_diff, runtime};
use crate::tiny::{self, prompt};

const DECODE_STEPS: usize = 16;
const EOS: u32 = 2;

/// Logits of the prompt step and `DECODE_STEPS` decode steps of each prompt,
/// run one after the other with `hook` installed. The hook stays installed
/// until `settled` holds (or 10 s pass): the engine drops a sequence, and
/// tells the hook, just after its response.
fn logits_with(
    file: &Path,
    hook: Arc<dyn AttentionHook>,
    prompts: &[Vec<u32>],
    settled: impl Fn() -> bool,
) -> Vec<Vec<Vec<f32>>> {
    set_attention_hook(Some(hook));
    let rt = runtime();
    let out = rt.block_on(async {
        let mistralrs = load_gguf(file, ModelDType::F32).await;
        let mut out = Vec::new();
        for p in prompts {
            out.push(generate_tokens(&mistralrs, p.clone(), DECODE_STEPS + 1, &[EOS]).await);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !settled() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out
    });
    set_attention_hook(None);
    out
}

/// Delegates to the real hook and keeps each sequence's layer statistics as
/// they were when it ended.
struct Recording {
    inner: QllmHook,
    ended: Mutex<Vec<Vec<LayerStats>>>,
    /// The most attention masks the hook held after any call.
    most_masks: Mutex<usize>,
}

impl Recording {
    fn new(config: QllmConfig) -> Arc<Self> {
        Arc::new(Self {
            inner: QllmHook::new(config),
            ended: Mutex::new(Vec::new()),
            most_masks: Mutex::new(0),
        })
    }

    /// The first layer's statistics of the ended sequence that processed
    /// `tokens` tokens.
    fn first_layer_of(&self, tokens: usize) -> LayerStats {
        self.ended
            .lock()
            .unwrap()
            .iter()
            .map(|layers| layers[0].clone())
            .find(|s| s.processed == tokens)
            .expect("the request's statistics")
    }

    /// Whether every sequence has ended.
    fn settled(&self) -> bool {
        self.inner.sequence_ids().is_empty()
    }
}

impl AttentionHook for Recording {
    fn begin_step(&self, seqs: &[StepSequence<'_>]) -> Result<()> {
        self.inner.begin_step(seqs)
    }
    fn attend(
        &self,
        ctx: &AttentionHookCtx<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let out = self.inner.attend(ctx, q, k, v);
        let mut most = self.most_masks.lock().unwrap();
        *most = (*most).max(self.inner.cached_masks());
        out
    }
    fn end_sequence(&self, seq_id: usize) {
        if let Some(stats) = self.inner.sequence_stats(seq_id) {
            self.ended.lock().unwrap().push(stats);
        }
        self.inner.end_sequence(seq_id)
    }
    fn prefill_chunk_size(&self) -> Option<usize> {
        self.inner.prefill_chunk_size()
    }
    fn model_loaded(&self, model: &HookModel) -> Option<usize> {
        self.inner.model_loaded(model)
    }
}

#[test]
fn qllm_equals_dense_when_the_window_covers_the_sequence() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write(dir.path(), 11, 0.3);
    let prompts = [prompt(45, 1), prompt(46, 2)];
    let dense = QllmConfig::dense().with_prefill_chunk_size(16);
    let reference = logits_with(&file, Arc::new(QllmHook::new(dense)), &prompts, || true);
    let variants = [
        (
            Mode::Qllm,
            Positions::Fixed,
            Scoring::Dot,
            0,
            Selection::Shared,
            QuestionRows::Mean,
            Boundaries::Fixed,
        ),
        (
            Mode::Streaming,
            Positions::Fixed,
            Scoring::Dot,
            0,
            Selection::Shared,
            QuestionRows::Mean,
            Boundaries::Fixed,
        ),
        (
            Mode::Qllm,
            Positions::Ordered,
            Scoring::HeadSoftmax,
            1,
            Selection::Shared,
            QuestionRows::Mean,
            Boundaries::Fixed,
        ),
        (
            Mode::Qllm,
            Positions::Ordered,
            Scoring::TokenMax,
            0,
            Selection::Shared,
            QuestionRows::Mean,
            Boundaries::Fixed,
        ),
        (
            Mode::Qllm,
            Positions::Interpolated,
            Scoring::AttentionMass,
            0,
            Selection::PerKvHead,
            QuestionRows::Mean,
            Boundaries::Fixed,
        ),
        (
            Mode::Qllm,
            Positions::Fixed,
            Scoring::AttentionMass,
            1,
            Selection::PerKvHead,
            QuestionRows::Mean,
            Boundaries::Sentence,
        ),
        (
            Mode::Qllm,
            Positions::Fixed,
            Scoring::AttentionMass,
            0,
            Selection::Shared,
            QuestionRows::Tokens,
            Boundaries::Fixed,
        ),
    ];
    for (mode, positions, scoring, neighbours, selection, question_rows, boundaries) in variants {
        let config = QllmConfig::from(Policy {
            mode,
            boundaries,
            positions,
            scoring,
            neighbours,
            selection,
            question_rows,
            // Cross-layer votes and the question's wider retrieval on:
            // nothing to vote for or retrieve while the window covers the
            // prompt.
            consensus: usize::from(mode == Mode::Qllm),
            question_topk: 4,
            n_init: 4,
            n_local: 64,
            block_size: 8,
            exc_block_size: 16,
            topk: 2,
            repr_topk: 2,
            ..Policy::default()
        })
        .with_prefill_chunk_size(16);
        let hook = Recording::new(config);
        hook.inner.set_sentence_end_tokens(sentence_end_tokens());
        let got = logits_with(&file, hook.clone(), &prompts, || hook.settled());
        let diff = max_abs_diff(&reference, &got);
        assert!(
            diff <= 1e-4,
            "{mode:?} {positions} {scoring} {selection} {question_rows} {boundaries}: max abs logit \
             difference {diff}"
        );
        // The engine's own warm-up request ends too; ours are the long ones.
        let ended = hook.ended.lock().unwrap();
        let ours: Vec<_> = ended.iter().filter(|s| s[0].processed >= 45).collect();
        assert_eq!(ours.len(), 2);
        // 46 + 16 tokens fit the window: nothing was evicted.
        assert!(ours
            .iter()
            .copied()
            .flatten()
            .all(|s| s.blocks == 0 && s.init == 0 && s.dropped == 0));
    }
}

/// Q-LLM's attention with every past token attended, as the crate's
/// written-out reference computes it ([`reference_attention`]): query `i`
/// sees key `j <= i` at its true relative position while `i - j < n_local`,
/// and at distance `n_local - 1` otherwise, all in one softmax.
struct Reference {
    n_local: usize,
    kv: Mutex<HashMap<(usize, usize), RawKv>>,
}

/// Every raw key and value a layer of a sequence has seen, call by call.
type RawKv = (Vec<Tensor>, Vec<Tensor>);

impl AttentionHook for Reference {
    fn attend(
        &self,
        ctx: &AttentionHookCtx<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        assert_eq!(q.dim(0)?, 1, "the reference runs one sequence at a time");
        let offset = ctx.seqlen_offsets[0];
        let mut kv = self.kv.lock().unwrap();
        let (ks, vs) = kv.entry((ctx.seq_ids[0], ctx.layer_idx)).or_default();
        if offset == 0 {
            ks.clear();
            vs.clear();
        }
        ks.push(k.clone());
        vs.push(v.clone());
        let policy = Policy {
            n_local: self.n_local,
            positions: Positions::Fixed,
            ..Policy::default()
        };
        let out = reference_attention(
            &policy,
            ctx.rope,
            q,
            &Tensor::cat(ks, 2)?,
            &Tensor::cat(vs, 2)?,
            &MemoryState::every_token(offset),
            ctx.softmax_scale,
        );
        Tensor::from_vec(out, q.shape(), q.device())?.to_dtype(q.dtype())
    }

    fn model_loaded(&self, _model: &HookModel) -> Option<usize> {
        Some(512)
    }
}

#[test]
fn qllm_retrieving_every_block_equals_the_written_out_reference() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write(dir.path(), 13, 0.3);
    let n_local = 32;
    let prompts = [prompt(150, 3)];
    let reference = logits_with(
        &file,
        Arc::new(Reference {
            n_local,
            kv: Mutex::new(HashMap::new()),
        }),
        &prompts,
        || true,
    );
    let config = QllmConfig::from(Policy {
        mode: Mode::Qllm,
        n_init: 8,
        n_local,
        block_size: 8,
        exc_block_size: 16,
        topk: 1000,
        repr_topk: 2,
        // The written-out reference keeps memory at the fixed distance.
        positions: Positions::Fixed,
        // Three execution blocks per call: the hook cuts them.
        ..Policy::default()
    })
    .with_prefill_chunk_size(48);
    let hook = Recording::new(config);
    let got = logits_with(&file, hook.clone(), &prompts, || hook.settled());
    let diff = max_abs_diff(&reference, &got);
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    let spread = reference[0][0].iter().fold(f32::MIN, |m, &x| m.max(x))
        - reference[0][0].iter().fold(f32::MAX, |m, &x| m.min(x));
    assert!(spread > 1.0, "logit spread {spread}");
    let layer0 = hook.first_layer_of(166);
    // 150 + 16 tokens: (166 - 8 - 32) / 8 = 15 blocks, all retrieved.
    assert_eq!(layer0.blocks, 15, "{layer0:?}");
    assert_eq!(layer0.last_retrieved, (0..15).collect::<Vec<_>>());
    // Masks are kept for the current chunk only (its three execution
    // blocks), not for all ten of the prompt's step.
    let most_masks = *hook.most_masks.lock().unwrap();
    assert!(
        (1..=3).contains(&most_masks),
        "{most_masks} masks held at once"
    );
}

/// Q-LLM with the policy tests' sizes (8 sinks, a 32-token window,
/// execution blocks of 16, 2 blocks of 8 retrieved) and the default
/// retrieval (attention mass, per KV head), prompts fed in chunks of
/// `chunk`.
fn selective_config(boundaries: Boundaries, chunk: usize) -> QllmConfig {
    let defaults = Policy::default();
    QllmConfig::from(Policy {
        scoring: defaults.scoring,
        selection: defaults.selection,
        boundaries,
        ..crate::policy::small_config(Mode::Qllm)
    })
    .with_prefill_chunk_size(chunk)
}

/// With a retrieval set smaller than the memory (2 of 15 blocks), the
/// output does not depend on how the prompt is cut into chunks, as long as
/// chunks end where execution blocks do; other chunk sizes are refused.
#[test]
fn chunking_does_not_change_selective_retrieval() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write(dir.path(), 13, 0.3);
    let prompts = [prompt(150, 5)];
    let config = |chunk| selective_config(Boundaries::Fixed, chunk);
    let err = config(40).validate().unwrap_err().to_string();
    assert!(
        err.contains("`prefill_chunk_size` (40) must be a multiple of `exc_block_size` (16)"),
        "{err}"
    );
    let mut runs = Vec::new();
    for chunk in [16, 48, 160] {
        let hook = Recording::new(config(chunk));
        let logits = logits_with(&file, hook.clone(), &prompts, || hook.settled());
        let layer0 = hook.first_layer_of(166);
        assert_eq!(layer0.blocks, 15, "{layer0:?}");
        // Two per KV head: a union smaller than the memory.
        assert!(
            (2..layer0.blocks).contains(&layer0.last_retrieved.len()),
            "{layer0:?}"
        );
        runs.push((chunk, logits, layer0.last_retrieved.clone()));
    }
    let (_, first, picked) = &runs[0];
    for (chunk, logits, retrieved) in &runs[1..] {
        let diff = max_abs_diff(first, logits);
        assert!(
            diff <= 1e-4,
            "chunk {chunk}: max abs logit difference {diff}"
        );
        assert_eq!(retrieved, picked, "chunk {chunk}");
    }
}

/// Token ids the tiny model's tests treat as sentence ends: those at every
/// sixth place of `prompt(150, 5)`.
fn sentence_end_tokens() -> Vec<u32> {
    prompt(150, 5).into_iter().step_by(6).collect()
}

/// Sentence boundaries inside the engine: blocks begin after sentence-end
/// tokens, so more of them form, overlapping, than fixed boundaries give;
/// the memory still accounts for every token once, and the output does not
/// depend on how the prompt is cut into chunks.
#[test]
fn sentence_boundaries_overlap_blocks_whatever_the_chunks() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write(dir.path(), 13, 0.3);
    let prompts = [prompt(150, 5)];
    let config = |chunk| selective_config(Boundaries::Sentence, chunk);
    let ends = sentence_end_tokens();
    let ends_in_prompt = prompts[0].iter().filter(|t| ends.contains(t)).count();
    assert!(ends_in_prompt > 10, "{ends_in_prompt}");
    let mut runs = Vec::new();
    for chunk in [16, 48] {
        let hook = Recording::new(config(chunk));
        hook.inner.set_sentence_end_tokens(ends.clone());
        let logits = logits_with(&file, hook.clone(), &prompts, || hook.settled());
        let layer0 = hook.first_layer_of(166);
        // Fixed boundaries form 15 blocks of 8 here (chunking test above).
        assert!(layer0.blocks > 15, "{layer0:?}");
        assert!(layer0.blocked < layer0.blocks * 8, "{layer0:?}");
        assert_eq!(
            layer0.init + layer0.blocked + layer0.recent,
            166,
            "{layer0:?}"
        );
        runs.push((logits, layer0.last_retrieved.clone()));
    }
    let diff = max_abs_diff(&runs[0].0, &runs[1].0);
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    assert_eq!(runs[0].1, runs[1].1);
}

//! The adapter between mistral.rs's attention hook and this crate's memory:
//! [`QllmHook`] is a thin [`AttentionHook`] over a sequence registry
//! (`sequences.rs`), a request registry ([`requests`]) and admission
//! (`admission.rs`).

mod admission;
mod prefixes;
pub mod requests;
mod sequences;
pub mod trace;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Result, Tensor};
use mistralrs_core::attention_hook::{
    AttentionHook, AttentionHookCtx, HookModel, HookRequest, StepSequence,
};
use mistralrs_core::layers::RotaryEmbedding;

use crate::attention::{CausalMasks, MaskCache, Rotary};
use crate::config::size::format_bytes;
use crate::config::{Boundaries, Mode, QllmConfig};
use crate::memory::{LayerStats, ModelShape};
use crate::system::release_free_memory;
use admission::{Admission, InUse};
use prefixes::KeptPrefixes;
pub use prefixes::PrefixStats;
use requests::RequestRegistry;
pub use requests::{Needle, RequestPlan, RequestReport};
use sequences::{LayerCall, SeqState};

/// A sequence that ends holding at least this much hands the freed memory
/// back to the operating system (a few milliseconds at most).
const RELEASE_AFTER_BYTES: usize = 1 << 20;

/// Totals over all live sequences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Sequences with state.
    pub sequences: usize,
    /// Bytes of KV and bookkeeping held.
    pub bytes: usize,
    /// Bytes counted against `max_memory`: per sequence, the larger of its
    /// reservation and what it holds.
    pub charged_bytes: usize,
    /// Most `bytes` held at the end of any forward pass since the hook was
    /// made (all sequences together): the hook's high-water mark.
    pub peak_bytes: usize,
}

/// The attention hook: owns every sequence's KV and computes attention
/// according to its [`QllmConfig`].
#[derive(Debug)]
pub struct QllmHook {
    config: QllmConfig,
    seqs: Mutex<HashMap<usize, SeqState>>,
    requests: Mutex<RequestRegistry>,
    admission: Mutex<Admission>,
    /// The question for requests that registered none.
    question_tokens: Mutex<Option<Vec<u32>>>,
    /// The model's sentence-end tokens, sorted, once known (`sentence`
    /// boundaries need them).
    sentence_end_tokens: Mutex<Option<Vec<u32>>>,
    causal_masks: CausalMasks,
    memory_masks: MaskCache,
    /// States kept for follow-up requests (locked after `seqs` where both
    /// are held).
    kept: Mutex<KeptPrefixes>,
    /// [`MemoryStats::peak_bytes`].
    peak_bytes: AtomicUsize,
}

impl QllmHook {
    /// A hook with no sequences yet (a [`crate::Policy`] converts, with the
    /// default engine settings and no caps).
    pub fn new(config: impl Into<QllmConfig>) -> Self {
        Self {
            config: config.into(),
            seqs: Mutex::default(),
            requests: Mutex::default(),
            admission: Mutex::default(),
            question_tokens: Mutex::default(),
            sentence_end_tokens: Mutex::default(),
            causal_masks: CausalMasks::default(),
            memory_masks: MaskCache::default(),
            kept: Mutex::default(),
            peak_bytes: AtomicUsize::new(0),
        }
    }

    /// What the kept prefixes hold.
    pub fn prefix_stats(&self) -> PrefixStats {
        lock(&self.kept).stats()
    }

    /// Drops every kept prefix.
    pub fn clear_prefixes(&self) {
        lock(&self.kept).clear();
        release_free_memory();
    }

    /// Fewest tokens a kept prefix holds: reading fewer again costs little.
    fn min_kept_tokens(&self) -> usize {
        self.config.engine.prefill_chunk_size
    }

    /// Keeps a state for later requests, within the budget.
    fn keep(&self, snapshot: prefixes::Snapshot) {
        let budget = self.config.caps.prefix_cache_memory;
        tracing::debug!(
            "qllm: keeping the state after {} tokens for follow-up requests",
            snapshot.tokens.len()
        );
        if lock(&self.kept).keep(snapshot, budget) {
            release_free_memory();
        }
    }

    /// The settings it runs with.
    pub fn config(&self) -> &QllmConfig {
        &self.config
    }

    /// Sets the question (as tokens) for requests whose prompt is read from
    /// now on and that registered none; `None` clears it. The question is
    /// looked up in each prompt (see [`crate::question::span::resolve`]).
    pub fn set_question(&self, tokens: Option<Vec<u32>>) {
        *lock(&self.question_tokens) = tokens.filter(|t| !t.is_empty());
    }

    /// Sets the model's sentence-end tokens (those whose text ends a
    /// sentence or a line), which `sentence` boundaries cut blocks after;
    /// [`crate::question::probe::prepare`] sets them from the engine's
    /// tokenizer.
    pub fn set_sentence_end_tokens(&self, mut tokens: Vec<u32>) {
        tokens.sort_unstable();
        tokens.dedup();
        *lock(&self.sentence_end_tokens) = Some(tokens);
    }

    /// Whether the sentence-end tokens are known.
    pub fn knows_sentence_ends(&self) -> bool {
        lock(&self.sentence_end_tokens).is_some()
    }

    /// Registers the settings of request `request_id` (the `id` of its
    /// `NormalRequest`); they apply to the sequences the engine creates for
    /// it. Remove them with [`Self::forget_request`] once it is answered.
    pub fn register_request(&self, request_id: usize, plan: RequestPlan) {
        lock(&self.requests).register(request_id, plan);
    }

    /// Drops everything kept for a request: settings, probe vectors, report.
    pub fn forget_request(&self, request_id: usize) {
        lock(&self.requests).forget(request_id);
    }

    /// Whether the engine accepted a registered request and created its
    /// sequences (it refuses requests before that).
    pub fn request_started(&self, request_id: usize) -> bool {
        lock(&self.requests).started(request_id)
    }

    /// What the hook did for a request so far.
    pub fn request_report(&self, request_id: usize) -> Option<RequestReport> {
        lock(&self.requests).report(request_id)
    }

    /// Requests with registered settings, probe vectors or reports; empty
    /// when every request was forgotten.
    pub fn tracked_requests(&self) -> usize {
        lock(&self.requests).tracked()
    }

    /// The loaded model's own prompt length limit, once a model is loaded.
    pub fn model_max_len(&self) -> Option<usize> {
        lock(&self.admission).model().map(|m| m.max_seq_len)
    }

    /// Memory held for all live sequences.
    pub fn memory_stats(&self) -> MemoryStats {
        let seqs = self.lock();
        MemoryStats {
            sequences: seqs.len(),
            bytes: seqs.values().map(SeqState::bytes).sum(),
            charged_bytes: seqs.values().map(SeqState::charged_bytes).sum(),
            peak_bytes: self.peak_bytes.load(Ordering::Relaxed),
        }
    }

    /// Attention masks held for the current forward pass (memory
    /// accounting: they are dropped when the next pass begins).
    pub fn cached_masks(&self) -> usize {
        self.memory_masks.len()
    }

    /// Ids of the sequences with state.
    pub fn sequence_ids(&self) -> Vec<usize> {
        let mut ids: Vec<usize> = self.lock().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// What each layer of a sequence's memory holds (`None` for unknown
    /// sequences; empty in `dense` mode).
    pub fn sequence_stats(&self, seq_id: usize) -> Option<Vec<LayerStats>> {
        self.lock().get(&seq_id).map(SeqState::layer_stats)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, SeqState>> {
        lock(&self.seqs)
    }

    fn new_state(&self) -> SeqState {
        SeqState::new(Arc::new(self.config.policy))
    }

    /// Publishes a probe's question vectors, or the request's report, once
    /// the last layer of a step has run.
    fn after_last_layer(&self, state: &mut SeqState, step_len: usize) -> Result<()> {
        if self.config.caps.prefix_cache_memory > 0 && state.at_keep_point(self.min_kept_tokens()) {
            self.keep(state.snapshot()?);
        }
        if let Some(target) = state.probe_for {
            if let Some(vectors) = state.question_vectors() {
                lock(&self.requests).publish_probe(target, vectors);
            }
            return Ok(());
        }
        let Some(request_id) = state.request_id else {
            return Ok(());
        };
        if !lock(&self.requests).is_registered(request_id) {
            return Ok(());
        }
        let report = state.update_report(step_len).clone();
        lock(&self.requests).publish_report(request_id, report);
        Ok(())
    }
}

/// Locks a mutex even if a panic elsewhere poisoned it: the data are
/// per-request maps that stay consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Rotary for RotaryEmbedding {
    fn cos_sin(&self) -> Result<(Tensor, Tensor)> {
        self.get_cos_sin()
    }
    fn is_neox(&self) -> bool {
        self.is_gpt_neox()
    }
    fn max_positions(&self) -> usize {
        RotaryEmbedding::max_positions(self)
    }
}

impl From<&HookModel> for ModelShape {
    fn from(model: &HookModel) -> Self {
        Self {
            max_seq_len: model.max_seq_len,
            num_layers: model.num_layers,
            num_attention_heads: model.num_attention_heads,
            num_kv_heads: model.num_kv_heads,
            k_head_dim: model.k_head_dim,
            v_head_dim: model.v_head_dim,
            dtype: model.dtype,
        }
    }
}

/// A refusal for [`AttentionHook::admit_request`]: the message alone (the
/// client sees it), without the backtrace candle's `bail!` may attach.
fn refusal(message: String) -> candle_core::Error {
    candle_core::Error::Msg(message)
}

impl AttentionHook for QllmHook {
    fn admit_request(&self, request: &HookRequest<'_>) -> Result<()> {
        let plan = lock(&self.requests).plan(request.id).cloned();
        let policy = plan.as_ref().map_or(self.config.policy, |p| p.policy);
        let question = plan
            .as_ref()
            .and_then(|p| p.question.as_ref())
            .filter(|_| policy.mode.uses_question())
            .map(Vec::len);
        if policy.boundaries == Boundaries::Sentence && !self.knows_sentence_ends() {
            return Err(refusal(
                "qllm: `boundaries = \"sentence\"` needs the model's sentence-end tokens, \
                 which are not set: prepare requests with `qllm::question::probe::prepare` \
                 (as `serve` and `run` do) or call `QllmHook::set_sentence_end_tokens`"
                    .into(),
            ));
        }
        let in_use = || {
            let stats = self.memory_stats();
            InUse {
                charged_bytes: stats.charged_bytes,
                sequences: stats.sequences,
            }
        };
        let kept_room = lock(&self.admission)
            .admit(
                &self.config,
                &policy,
                request,
                question,
                plan.is_some(),
                in_use,
            )
            .map_err(refusal)?;
        if let Some(room) = kept_room {
            if lock(&self.kept).shrink_to(room) {
                release_free_memory();
            }
        }
        Ok(())
    }

    fn begin_sequence(&self, seq_id: usize, request_id: usize) {
        let started = lock(&self.requests).start(request_id);
        let mut state = match started {
            Some((plan, probed)) => SeqState::for_request(plan, probed),
            None => self.new_state(),
        };
        state.request_id = Some(request_id);
        state.reserved_bytes = lock(&self.admission).reservation(request_id);
        tracing::debug!(
            "qllm: sequence {seq_id} of request {request_id} begins, {} reserved",
            format_bytes(state.reserved_bytes)
        );
        self.lock().insert(seq_id, state);
    }

    fn begin_step(&self, seqs: &[StepSequence<'_>]) -> Result<()> {
        // Read by a sequence's first prompt step only: borrowed, not copied.
        let global_question = lock(&self.question_tokens);
        let sentence_ends = lock(&self.sentence_end_tokens);
        let mut states = self.lock();
        for seq in seqs {
            tracing::trace!(
                "qllm: step of sequence {} ({} tokens, prompt {})",
                seq.seq_id,
                seq.tokens.len(),
                seq.is_prompt
            );
            let state = states.entry(seq.seq_id).or_insert_with(|| {
                tracing::debug!("qllm: sequence {} stepped before it began", seq.seq_id);
                self.new_state()
            });
            state.note_tokens(seq.tokens);
            state.begin_prompt(
                seq,
                global_question.as_deref(),
                self.config.engine.prefill_chunk_size,
            );
            if let Some(ends) = sentence_ends.as_deref() {
                state.note_sentence_ends(seq.tokens, ends);
            }
        }
        Ok(())
    }

    fn attend(
        &self,
        ctx: &AttentionHookCtx<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let batch = q.dim(0)?;
        if ctx.seq_ids.len() != batch || ctx.seqlen_offsets.len() != batch {
            candle_core::bail!(
                "qllm: batch of {batch} rows but {} sequence ids and {} offsets",
                ctx.seq_ids.len(),
                ctx.seqlen_offsets.len()
            );
        }
        // A pass begins at layer 0: one step runs every chunk of a prompt, so
        // masks kept for the whole step would pile up with the prompt's length.
        if ctx.layer_idx == 0 {
            self.memory_masks.clear();
        }
        let mut seqs = self.lock();
        let mut rows = Vec::with_capacity(batch);
        for (row, (&seq_id, &offset)) in ctx.seq_ids.iter().zip(ctx.seqlen_offsets).enumerate() {
            let state = seqs.entry(seq_id).or_insert_with(|| self.new_state());
            let call = LayerCall {
                ctx,
                offset,
                causal_masks: &self.causal_masks,
                memory_masks: &self.memory_masks,
            };
            let out = state.attend(
                &call,
                &q.narrow(0, row, 1)?,
                &k.narrow(0, row, 1)?,
                &v.narrow(0, row, 1)?,
            )?;
            if ctx.layer_idx + 1 == ctx.num_layers {
                self.after_last_layer(state, q.dim(2)?)?;
            }
            rows.push(out);
        }
        if ctx.layer_idx + 1 == ctx.num_layers {
            // States only grow within a pass, so its end is where they peak.
            let held = seqs.values().map(SeqState::bytes).sum();
            self.peak_bytes.fetch_max(held, Ordering::Relaxed);
        }
        if rows.len() == 1 {
            return Ok(rows.pop().expect("one row"));
        }
        Tensor::cat(&rows, 0)
    }

    fn held_prompt_tokens(&self, seq_id: usize, prompt: &[u32]) -> usize {
        if self.config.caps.prefix_cache_memory == 0 {
            return 0;
        }
        let global_question = lock(&self.question_tokens).clone();
        let mut seqs = self.lock();
        let Some(state) = seqs.get_mut(&seq_id).filter(|s| s.reuse) else {
            return 0;
        };
        let kept = match lock(&self.kept).resume(prompt, &state.policy) {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!("qllm: sequence {seq_id}: a kept prefix could not be copied: {e}");
                None
            }
        };
        let Some(kept) = kept else {
            return 0;
        };
        let reused = kept.tokens.len();
        tracing::info!(
            "qllm: sequence {seq_id}: resuming from a kept prefix, {reused} of {} prompt tokens",
            prompt.len()
        );
        state.resume(kept, global_question.as_deref());
        reused
    }

    fn end_sequence(&self, seq_id: usize) {
        let Some(state) = self.lock().remove(&seq_id) else {
            return;
        };
        let freed = state.bytes();
        tracing::debug!(
            "qllm: sequence {seq_id} of request {:?} ends, {} freed",
            state.request_id,
            format_bytes(freed)
        );
        drop(state);
        if freed >= RELEASE_AFTER_BYTES {
            release_free_memory();
        }
    }

    fn prefill_chunk_size(&self) -> Option<usize> {
        Some(self.config.engine.prefill_chunk_size)
    }

    fn model_loaded(&self, model: &HookModel) -> Option<usize> {
        // Kept states belong to the model that read them; the same tokens
        // mean something else to another.
        lock(&self.kept).clear();
        lock(&self.admission).model_loaded(&self.config, model.into());
        (self.config.policy.mode != Mode::Dense).then_some(self.config.engine.max_context_len)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{EngineSettings, MemoryCaps, Policy};
    use crate::memory::budget::tests::smollm2;
    use crate::memory::sequence_bytes_bound;

    fn admit(hook: &QllmHook, id: usize, tokens: usize) -> std::result::Result<(), String> {
        let prompt = vec![1; tokens];
        hook.admit_request(&HookRequest {
            id,
            prompt_tokens: &prompt,
            max_new_tokens: Some(16),
            sequences: 1,
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn requests_over_the_memory_caps_are_refused_and_live_ones_count() {
        let config = QllmConfig::default();
        let bound_16k = sequence_bytes_bound(
            &Policy::default(),
            &EngineSettings::default(),
            &smollm2(),
            16 * 1024 + 16,
        );
        let hook = QllmHook::new(QllmConfig {
            caps: MemoryCaps {
                max_request_memory: Some(bound_16k),
                max_memory: Some(bound_16k * 3 / 2),
                ..MemoryCaps::default()
            },
            ..config
        });
        // No model shape yet: nothing to size requests by.
        admit(&hook, 1, 1 << 20).unwrap();
        assert_eq!(
            hook.model_loaded(&hook_model()),
            Some(config.engine.max_context_len)
        );

        let err = admit(&hook, 2, 20 * 1024).unwrap_err();
        assert!(
            err.contains("over the per-request limit `max_request_memory`"),
            "{err}"
        );
        assert!(err.contains("20496 tokens"), "{err}");
        admit(&hook, 3, 16 * 1024).unwrap();
        hook.begin_sequence(30, 3);
        assert_eq!(hook.memory_stats().charged_bytes, bound_16k);
        // A second request of the same size does not fit beside the first.
        let err = admit(&hook, 4, 16 * 1024).unwrap_err();
        assert!(err.contains("the server's limit `max_memory`"), "{err}");
        assert!(err.contains("in use by 1 sequences"), "{err}");
        admit(&hook, 5, 4 * 1024).unwrap();
        // Once the first ends, it does.
        hook.end_sequence(30);
        let stats = hook.memory_stats();
        assert_eq!(
            (stats.sequences, stats.bytes, stats.charged_bytes),
            (0, 0, 0)
        );
        admit(&hook, 6, 16 * 1024).unwrap();
    }

    #[test]
    fn kept_prefixes_give_way_to_a_request_that_would_otherwise_be_refused() {
        use candle_core::{DType, Device};
        let bound_16k = sequence_bytes_bound(
            &Policy::default(),
            &EngineSettings::default(),
            &smollm2(),
            16 * 1024 + 16,
        );
        let caps = MemoryCaps {
            max_memory: Some(bound_16k * 3 / 2),
            ..MemoryCaps::default()
        };
        let hook = QllmHook::new(QllmConfig {
            caps,
            ..QllmConfig::default()
        });
        hook.model_loaded(&hook_model());
        // Two kept prefixes of a third of a 16K request's bound each (one
        // f32 layer), where the cap leaves half a bound beside that request.
        let third = bound_16k / 3;
        for first in [1, 2] {
            let mut layer = crate::memory::KvBuffer::default();
            let tokens = third / 8 / 2;
            let kv = Tensor::zeros((1, 1, tokens, 1), DType::F32, &Device::Cpu).unwrap();
            layer.append(&kv, &kv).unwrap();
            hook.keep(prefixes::Snapshot {
                tokens: vec![first; 600],
                policy: Arc::new(Policy::default()),
                memory: sequences::SeqMemory::Dense(vec![layer]),
                sentence_ends: Vec::new(),
                votes: Default::default(),
                question: None,
            });
        }
        assert_eq!(hook.prefix_stats().entries, 2);
        assert!(hook.prefix_stats().bytes > bound_16k / 2);
        // A 16K request needs the whole room beside them: the older goes.
        admit(&hook, 1, 16 * 1024).unwrap();
        let left = hook.prefix_stats();
        assert_eq!(left.entries, 1);
        assert!(left.bytes <= bound_16k * 3 / 2 - bound_16k, "{left:?}");
        // One that would not fit even without them is refused, and they stay.
        hook.begin_sequence(10, 1);
        let err = admit(&hook, 2, 16 * 1024).unwrap_err();
        assert!(err.contains("`max_memory`"), "{err}");
        assert_eq!(hook.prefix_stats().entries, 1);
    }

    #[test]
    fn a_question_longer_than_the_prompt_is_refused() {
        let hook = QllmHook::new(QllmConfig::default());
        hook.register_request(
            7,
            RequestPlan {
                policy: Policy::default(),
                question: Some(vec![1; 10]),
                probe_for: None,
                needle: None,
                reuse: true,
                question_copied: false,
            },
        );
        let err = admit(&hook, 7, 9).unwrap_err();
        assert!(err.contains("the question (10 tokens) is longer than the prompt (9 tokens)"));
        admit(&hook, 7, 10).unwrap();
        hook.begin_sequence(70, 7);
        assert!(hook.request_started(7));
        hook.end_sequence(70);
        hook.forget_request(7);
        assert_eq!(hook.tracked_requests(), 0);
    }

    /// SmolLM2-135M's shape as the engine reports it.
    pub(crate) fn hook_model() -> HookModel {
        let m = smollm2();
        HookModel {
            max_seq_len: m.max_seq_len,
            num_layers: m.num_layers,
            num_attention_heads: m.num_attention_heads,
            num_kv_heads: m.num_kv_heads,
            k_head_dim: m.k_head_dim,
            v_head_dim: m.v_head_dim,
            dtype: m.dtype,
        }
    }
}

//! The adapter between mistral.rs's attention hook and this crate's policies.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Result, Tensor};
use mistralrs_core::attention_hook::{
    AttentionHook, AttentionHookCtx, HookModel, HookRequest, StepSequence,
};

use crate::attention::{causal_attention, CausalMasks};
use crate::config::{Mode, Positions, QllmConfig};
use crate::kv::KvBuffer;
use crate::limits::{format_bytes, release_free_memory, sequence_bytes_bound};
use crate::memory::{LayerMemory, LayerStats, MaskCache, StepArgs};
use crate::rope::{positions, rotate_f32};
use crate::trace::{NeedleReport, NeedleTrace};

/// Settings of one request, registered by its caller before it is sent
/// (see [`crate::request::prepare`]).
#[derive(Debug, Clone)]
pub struct RequestPlan {
    /// The settings it runs with.
    pub config: QllmConfig,
    /// Tokens of its question (no special tokens), looked up in the prompt.
    pub question: Option<Vec<u32>>,
    /// Set for a probe pass: the request whose question vectors it computes.
    pub probe_for: Option<usize>,
    /// A span to trace (debug): the report then says whether the memory
    /// blocks holding it were retrieved, per layer.
    pub needle: Option<Needle>,
}

/// The span of a prompt to trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needle {
    /// Its tokens (no special tokens), looked up in the prompt.
    Tokens(Vec<u32>),
    /// Its token positions.
    Span(Range<usize>),
}

/// What the hook did for a request, for its response.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RequestReport {
    /// Policy it ran with.
    pub mode: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Token span of the question in the prompt, if found.
    pub question_span: Option<(usize, usize)>,
    /// How the question's vectors were obtained: `probe`, `in line`, or
    /// `none`.
    pub question_vectors: &'static str,
    /// Tokens held in memory blocks (first layer).
    pub tokens_in_memory: usize,
    /// Memory blocks held (first layer).
    pub blocks: usize,
    /// Blocks retrieved by any layer at the first decode step.
    pub retrieved_blocks: Vec<usize>,
    /// Bytes the hook held for the request at its latest step.
    pub memory_bytes: usize,
    /// Whether the blocks holding the traced span were retrieved, when the
    /// request asked for a trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needle: Option<NeedleReport>,
}

/// A sequence that ends holding at least this much hands the freed memory
/// back to the operating system (a few milliseconds at most).
const RELEASE_AFTER_BYTES: usize = 1 << 20;

/// Per-sequence state.
#[derive(Debug)]
struct SeqState {
    config: Arc<QllmConfig>,
    request_id: Option<usize>,
    /// Bytes set aside for it when its request was admitted: its largest
    /// possible state (0 when no model shape was known).
    reserved_bytes: usize,
    /// Question tokens of the sequence's request, if it registered any.
    question_tokens: Option<Vec<u32>>,
    /// Set for a probe pass: the request it computes question vectors for.
    probe_for: Option<usize>,
    /// Question vector of each layer from a probe pass.
    probed: Option<Vec<Option<Vec<f32>>>>,
    report: RequestReport,
    /// `dense` mode: the full KV of each layer.
    dense: Vec<KvBuffer>,
    /// Other modes: the context memory of each layer.
    layers: Vec<LayerMemory>,
    /// Length of the prompt; its last token gets an execution block of its
    /// own, as the reference feeds it alone.
    prompt_len: usize,
    /// Token span of the question within the prompt.
    question: Option<Range<usize>>,
    /// Whether the prompt was searched for the question.
    question_searched: bool,
    /// The span the request asked to trace, until it is looked up.
    needle_asked: Option<Needle>,
    /// The trace, once the span was found in the prompt.
    needle: Option<NeedleTrace>,
}

impl SeqState {
    fn new(config: Arc<QllmConfig>) -> Self {
        Self {
            report: RequestReport {
                mode: config.mode.to_string(),
                question_vectors: "none",
                ..RequestReport::default()
            },
            config,
            request_id: None,
            reserved_bytes: 0,
            question_tokens: None,
            probe_for: None,
            probed: None,
            dense: Vec::new(),
            layers: Vec::new(),
            prompt_len: 0,
            question: None,
            question_searched: false,
            needle_asked: None,
            needle: None,
        }
    }

    fn bytes(&self) -> usize {
        self.dense.iter().map(KvBuffer::bytes).sum::<usize>()
            + self.layers.iter().map(LayerMemory::bytes).sum::<usize>()
    }

    /// What counts against the memory caps: its reservation, or what it
    /// holds if that is more (a request without a generation limit).
    fn charged_bytes(&self) -> usize {
        self.reserved_bytes.max(self.bytes())
    }
}

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
}

/// The attention hook: owns every sequence's KV and computes attention
/// according to its [`QllmConfig`].
#[derive(Debug)]
pub struct QllmHook {
    config: Arc<QllmConfig>,
    seqs: Mutex<HashMap<usize, SeqState>>,
    /// Settings registered per request id.
    requests: Mutex<HashMap<usize, RequestPlan>>,
    /// Per-layer question vectors from probe passes, by request id.
    probes: Mutex<HashMap<usize, Vec<Option<Vec<f32>>>>>,
    /// Reports by request id.
    reports: Mutex<HashMap<usize, RequestReport>>,
    /// Registered requests whose sequences the engine has created.
    started: Mutex<BTreeSet<usize>>,
    /// The shape of the loaded model (the largest per token if several).
    model: Mutex<Option<HookModel>>,
    /// The request admitted last and the bytes reserved per sequence: its
    /// sequences are created right after, on the same thread.
    admitted: Mutex<Option<(usize, usize)>>,
    question_tokens: Mutex<Option<Vec<u32>>>,
    causal_masks: CausalMasks,
    memory_masks: MaskCache,
}

impl QllmHook {
    /// A hook with no sequences yet.
    pub fn new(config: QllmConfig) -> Self {
        Self {
            config: Arc::new(config),
            seqs: Mutex::new(HashMap::new()),
            requests: Mutex::default(),
            probes: Mutex::default(),
            reports: Mutex::default(),
            started: Mutex::default(),
            model: Mutex::new(None),
            admitted: Mutex::new(None),
            question_tokens: Mutex::new(None),
            causal_masks: CausalMasks::default(),
            memory_masks: MaskCache::default(),
        }
    }

    /// The settings it runs with.
    pub fn config(&self) -> &QllmConfig {
        &self.config
    }

    /// Sets the question (as tokens) for requests whose prompt is read from
    /// now on; `None` clears it. The question is looked up in each prompt
    /// (its first occurrence if that ends within `n_init + n_local` tokens,
    /// else its last; tokenisation at its edges may differ, so its inner
    /// tokens are matched when the whole does not). Q-LLM captures the
    /// question vector once the span has been read; a question of more than
    /// `n_local` tokens is cut to its last `n_local`.
    pub fn set_question(&self, tokens: Option<Vec<u32>>) {
        *lock(&self.question_tokens) = tokens.filter(|t| !t.is_empty());
    }

    /// Registers the settings of request `request_id` (the `id` of its
    /// `NormalRequest`); they apply to the sequences the engine creates for
    /// it. Remove them with [`Self::forget_request`] once it is answered.
    pub fn register_request(&self, request_id: usize, plan: RequestPlan) {
        lock(&self.requests).insert(request_id, plan);
    }

    /// Drops everything kept for a request: settings, probe vectors, report.
    pub fn forget_request(&self, request_id: usize) {
        lock(&self.requests).remove(&request_id);
        lock(&self.probes).remove(&request_id);
        lock(&self.reports).remove(&request_id);
        lock(&self.started).remove(&request_id);
    }

    /// Whether the engine accepted a registered request and created its
    /// sequences (it refuses requests before that).
    pub fn request_started(&self, request_id: usize) -> bool {
        lock(&self.started).contains(&request_id)
    }

    /// What the hook did for a request so far.
    pub fn request_report(&self, request_id: usize) -> Option<RequestReport> {
        lock(&self.reports).get(&request_id).cloned()
    }

    /// Requests with registered settings, probe vectors or reports; empty
    /// when every request was forgotten.
    pub fn tracked_requests(&self) -> usize {
        let mut ids: BTreeSet<usize> = lock(&self.requests).keys().copied().collect();
        ids.extend(lock(&self.probes).keys());
        ids.extend(lock(&self.reports).keys());
        ids.extend(lock(&self.started).iter());
        ids.len()
    }

    /// The loaded model's own prompt length limit, once a model is loaded.
    pub fn model_max_len(&self) -> Option<usize> {
        lock(&self.model).map(|m| m.max_seq_len)
    }

    /// The loaded model's shape, once a model is loaded.
    pub fn model(&self) -> Option<HookModel> {
        *lock(&self.model)
    }

    /// Memory held for all live sequences.
    pub fn memory_stats(&self) -> MemoryStats {
        let seqs = self.lock();
        MemoryStats {
            sequences: seqs.len(),
            bytes: seqs.values().map(SeqState::bytes).sum(),
            charged_bytes: seqs.values().map(SeqState::charged_bytes).sum(),
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
        self.lock()
            .get(&seq_id)
            .map(|s| s.layers.iter().map(LayerMemory::stats).collect())
    }

    /// The question span found in a sequence's prompt.
    pub fn question_span(&self, seq_id: usize) -> Option<Range<usize>> {
        self.lock().get(&seq_id).and_then(|s| s.question.clone())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, SeqState>> {
        lock(&self.seqs)
    }

    fn new_state(&self) -> SeqState {
        SeqState::new(self.config.clone())
    }

    fn attend_dense(
        &self,
        state: &mut KvBuffer,
        ctx: &AttentionHookCtx<'_>,
        offset: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        if offset == 0 {
            state.clear();
        } else if offset != state.len() {
            candle_core::bail!(
                "qllm: layer {} got tokens at position {offset} but holds {} tokens",
                ctx.layer_idx,
                state.len()
            );
        }
        let at = positions(offset..offset + q.dim(2)?, q.device())?;
        let q = rotate_f32(ctx.rope, q, &at)?;
        // Stored in the model's dtype, as the built-in cache does.
        let k = rotate_f32(ctx.rope, k, &at)?.to_dtype(v.dtype())?;
        state.append(&k, v)?;
        let (k_all, v_all) = state.get()?.expect("appended above");
        causal_attention(&q, &k_all, &v_all, ctx.softmax_scale, &self.causal_masks)?
            .to_dtype(v.dtype())
    }

    #[allow(clippy::too_many_arguments)]
    fn attend_memory(
        &self,
        memory: &mut LayerMemory,
        config: &QllmConfig,
        ctx: &AttentionHookCtx<'_>,
        offset: usize,
        prompt_len: usize,
        question: Option<Range<usize>>,
        probed_question: Option<&[f32]>,
        mut needle: Option<&mut NeedleTrace>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let needed = config.positions_needed();
        if needed > ctx.rope.max_positions() {
            candle_core::bail!("{}", rope_table_too_small(config, ctx.rope.max_positions()));
        }
        if offset == 0 {
            *memory = LayerMemory::default();
            if let Some(vector) = probed_question {
                memory.set_question(vector.to_vec());
            }
        } else if offset != memory.processed() {
            candle_core::bail!(
                "qllm: layer {} got tokens at position {offset} but holds {} tokens",
                ctx.layer_idx,
                memory.processed()
            );
        }
        let args = StepArgs {
            rope: ctx.rope,
            softmax_scale: ctx.softmax_scale,
            question,
            masks: &self.memory_masks,
        };
        let len = q.dim(2)?;
        let mut outputs = Vec::new();
        let mut start = 0;
        while start < len {
            let pos = offset + start;
            let mut stop = (pos / config.exc_block_size + 1) * config.exc_block_size;
            if prompt_len > 0 && pos < prompt_len - 1 {
                stop = stop.min(prompt_len - 1);
            }
            let n = stop.min(offset + len) - pos;
            let blocks = memory.block_count();
            outputs.push(memory.attend(
                config,
                &args,
                &q.narrow(2, start, n)?,
                &k.narrow(2, start, n)?,
                &v.narrow(2, start, n)?,
            )?);
            if let Some(trace) = needle.as_deref_mut() {
                trace.observe(
                    ctx.layer_idx,
                    pos..pos + n,
                    memory.last_retrieved(),
                    memory.last_scores(),
                    blocks,
                );
            }
            start += n;
        }
        if len == 1 && tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                "qllm: layer {} at position {offset}: retrieved blocks {:?}",
                ctx.layer_idx,
                memory.stats().last_retrieved
            );
        }
        Tensor::cat(&outputs, 2)
    }

    /// The question span of a sequence's prompt, from its request's question
    /// or else the one set with [`Self::set_question`].
    fn find_question(&self, seq: &StepSequence<'_>, state: &SeqState) -> Option<Range<usize>> {
        let Some(question) = state
            .question_tokens
            .clone()
            .or_else(|| lock(&self.question_tokens).clone())
        else {
            tracing::info!(
                "qllm: sequence {}: no question given; retrieval uses the current queries only",
                seq.seq_id
            );
            return None;
        };
        // The paper's layout asks before and after the document: the early
        // copy, read before any retrieval, is captured in line; otherwise
        // the last (question last, the usual layout).
        let n_read_in_time = state.config.n_init + state.config.n_local;
        let span = find_span(seq.tokens, &question, Occurrence::First)
            .filter(|early| early.end <= n_read_in_time)
            .or_else(|| find_question_span(seq.tokens, &question));
        let Some(span) = span else {
            tracing::warn!(
                "qllm: sequence {}: the question ({} tokens) is not in the prompt{}",
                seq.seq_id,
                question.len(),
                if state.probed.is_some() {
                    "; retrieval uses its probed vectors"
                } else {
                    "; retrieval runs without it"
                }
            );
            return None;
        };
        let n_local = state.config.n_local;
        let start = span.start.max(span.end.saturating_sub(n_local));
        if start > span.start {
            tracing::warn!(
                "qllm: sequence {}: question of {} tokens cut to its last {n_local} (`n_local`)",
                seq.seq_id,
                span.len(),
            );
        }
        tracing::info!(
            "qllm: sequence {}: question at tokens {start}..{} of {}",
            seq.seq_id,
            span.end,
            seq.tokens.len()
        );
        Some(start..span.end)
    }

    /// Decides, once per prompt, where the sequence's question vectors come
    /// from: read in line when the question comes before any block could be
    /// retrieved, else from the probe pass when there was one.
    fn settle_question(&self, seq: &StepSequence<'_>, state: &mut SeqState) {
        state.question = self.find_question(seq, state);
        state.report.question_span = state.question.as_ref().map(|s| (s.start, s.end));
        let config = &state.config;
        let read_in_time = state
            .question
            .as_ref()
            .is_some_and(|span| span.end <= config.n_init + config.n_local);
        if (state.probe_for.is_some() || read_in_time) && state.probed.take().is_some() {
            tracing::info!(
                "qllm: sequence {}: question read before any retrieval; captured in line",
                seq.seq_id
            );
        }
        state.report.question_vectors = if state.probed.is_some() {
            "probe"
        } else if state.question.is_some() {
            "in line"
        } else {
            "none"
        };
        if state.probed.is_some() {
            tracing::info!(
                "qllm: sequence {}: retrieval uses the question's probed vectors from the start",
                seq.seq_id
            );
        }
    }

    /// Finds the traced span in the prompt, if the request asked for one.
    fn start_needle_trace(seq: &StepSequence<'_>, state: &mut SeqState) {
        let Some(needle) = state.needle_asked.take() else {
            return;
        };
        let config = &state.config;
        if !config.mode.keeps_blocks() {
            tracing::warn!(
                "qllm: sequence {}: `{}` keeps no memory blocks; the needle is not traced",
                seq.seq_id,
                config.mode
            );
            return;
        }
        let span = match &needle {
            Needle::Tokens(tokens) => find_question_span(seq.tokens, tokens),
            Needle::Span(span) => {
                (span.end <= seq.tokens.len() && !span.is_empty()).then(|| span.clone())
            }
        };
        match span {
            Some(span) => {
                tracing::info!(
                    "qllm: sequence {}: tracing the needle at tokens {}..{}",
                    seq.seq_id,
                    span.start,
                    span.end
                );
                state.needle = Some(NeedleTrace::new(
                    span,
                    state.question.as_ref().map(|q| q.end),
                    seq.tokens.len(),
                    config.n_init,
                    config.block_size,
                ));
            }
            None => tracing::warn!(
                "qllm: sequence {}: the needle {needle:?} is not in the prompt",
                seq.seq_id
            ),
        }
    }

    /// Publishes a probe's question vectors and the request's report once the
    /// last layer of a step has run.
    fn after_last_layer(&self, state: &mut SeqState, step_len: usize) {
        if let Some(target) = state.probe_for {
            let vectors: Vec<Option<Vec<f32>>> = state
                .layers
                .iter()
                .map(|l| l.question_vector().map(<[f32]>::to_vec))
                .collect();
            // Kept only while the request is registered: a late step
            // must not bring back what `forget_request` removed.
            if vectors.iter().all(Option::is_some) && lock(&self.requests).contains_key(&target) {
                lock(&self.probes).insert(target, vectors);
            }
            return;
        }
        // Reports are kept for registered requests only, until they are
        // forgotten; others (mistral.rs's own routes) would pile up.
        let Some(request_id) = state
            .request_id
            .filter(|id| lock(&self.requests).contains_key(id))
        else {
            return;
        };
        let memory_bytes = state.bytes();
        let report = &mut state.report;
        report.prompt_tokens = state.prompt_len;
        report.memory_bytes = memory_bytes;
        if let Some(first) = state.layers.first() {
            let stats = first.stats();
            report.blocks = stats.blocks;
            report.tokens_in_memory = stats.blocks * state.config.block_size;
        }
        if let Some(trace) = &state.needle {
            let needle = trace.report();
            if step_len == 1 && needle.at_decode.len() == 1 {
                tracing::debug!(
                    "qllm: request {request_id}: needle at tokens {}..{} (blocks {:?}) retrieved \
                     by {} of {} layers at the question, {} at the first decode step; per layer \
                     {}",
                    needle.span.0,
                    needle.span.1,
                    needle.blocks,
                    needle.at_question,
                    needle.layers,
                    needle.at_decode[0],
                    needle.per_layer_first_decode
                );
            }
            report.needle = Some(needle);
        }
        if step_len == 1 && report.retrieved_blocks.is_empty() {
            let retrieved: BTreeSet<usize> = state
                .layers
                .iter()
                .flat_map(|l| l.stats().last_retrieved)
                .collect();
            report.retrieved_blocks = retrieved.into_iter().collect();
        }
        lock(&self.reports).insert(request_id, report.clone());
    }
}

/// A refusal for [`AttentionHook::admit_request`]: the message alone (the
/// client sees it), without the backtrace candle's `bail!` may attach.
fn refusal(message: String) -> candle_core::Error {
    candle_core::Error::Msg(message)
}

/// The refusal of a config whose positions the model's RoPE table does not
/// cover, naming the keys that set them.
fn rope_table_too_small(config: &QllmConfig, table: usize) -> String {
    let needed = config.positions_needed();
    match config.positions {
        Positions::Fixed => format!(
            "qllm: `n_local` + `exc_block_size` - 1 = {needed} positions exceed the model's RoPE \
             table ({table} positions); lower `n_local` or `exc_block_size`"
        ),
        Positions::Ordered => format!(
            "qllm: `positions = \"ordered\"` needs `n_init` + (`topk` + 1) x `block_size` + 2 x \
             `exc_block_size` + `n_local` = {needed} positions, more than the model's RoPE table \
             ({table} positions); lower them or use `positions = \"fixed\"`"
        ),
    }
}

/// Locks a mutex even if a panic elsewhere poisoned it: the data are
/// per-request maps that stay consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last occurrence of `question` in `tokens`; when the whole does not
/// occur, the last occurrence of its inner tokens, widened by one token on
/// each side (its first and last tokens may merge with their neighbours).
pub fn find_question_span(tokens: &[u32], question: &[u32]) -> Option<Range<usize>> {
    find_span(tokens, question, Occurrence::Last)
}

/// Which occurrence of a span [`find_span`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    /// The first.
    First,
    /// The last.
    Last,
}

/// `question` in `tokens` as [`find_question_span`] finds it, at the first
/// or the last occurrence.
pub fn find_span(tokens: &[u32], question: &[u32], which: Occurrence) -> Option<Range<usize>> {
    let find = |needle: &[u32]| -> Option<usize> {
        if needle.is_empty() || needle.len() > tokens.len() {
            return None;
        }
        let mut windows = tokens.windows(needle.len());
        match which {
            Occurrence::First => windows.position(|w| w == needle),
            Occurrence::Last => windows.rposition(|w| w == needle),
        }
    };
    if let Some(at) = find(question) {
        return Some(at..at + question.len());
    }
    if question.len() > 2 {
        let inner = &question[1..question.len() - 1];
        if let Some(at) = find(inner) {
            return Some(at.saturating_sub(1)..(at + inner.len() + 1).min(tokens.len()));
        }
    }
    None
}

impl AttentionHook for QllmHook {
    fn admit_request(&self, request: &HookRequest<'_>) -> Result<()> {
        let plan = lock(&self.requests).get(&request.id).cloned();
        let config = plan.as_ref().map_or(*self.config, |p| p.config);
        let prompt_len = request.prompt_tokens.len();
        let model = self.model();
        if let Some(model) = model.filter(|_| config.mode == Mode::Dense) {
            if plan.is_some() && prompt_len > model.max_seq_len {
                // The request runs without Q-LLM: the model's own limit and
                // upstream's message.
                return Err(refusal(format!(
                    "Prompt sequence length is greater than {}, perhaps consider using \
                     `truncate_sequence`?",
                    model.max_seq_len
                )));
            }
        }
        if let Some(question) = plan.as_ref().and_then(|p| p.question.as_ref()) {
            if question.len() > prompt_len {
                return Err(refusal(format!(
                    "qllm: the question ({} tokens) is longer than the prompt ({prompt_len} \
                     tokens); the question must be part of the prompt",
                    question.len()
                )));
            }
        }
        *lock(&self.admitted) = None;
        let Some(model) = model else {
            return Ok(());
        };
        if config.mode != Mode::Dense && config.positions_needed() > model.max_seq_len {
            return Err(refusal(rope_table_too_small(&config, model.max_seq_len)));
        }
        let tokens = prompt_len + request.max_new_tokens.unwrap_or(0);
        let per_sequence = sequence_bytes_bound(&config, &model, tokens);
        let sequences = request.sequences.max(1);
        let request_bytes = per_sequence.saturating_mul(sequences);
        let size = format!(
            "{} of attention state ({tokens} tokens{})",
            format_bytes(request_bytes),
            if sequences > 1 {
                format!(" x {sequences} sequences")
            } else {
                String::new()
            }
        );
        if let Some(cap) = self.config.max_request_memory {
            if request_bytes > cap {
                return Err(refusal(format!(
                    "qllm: the request needs up to {size}, over the per-request limit \
                     `max_request_memory` = {}",
                    format_bytes(cap)
                )));
            }
        }
        if let Some(cap) = self.config.max_memory {
            let in_use = self.memory_stats();
            if in_use.charged_bytes.saturating_add(request_bytes) > cap {
                return Err(refusal(format!(
                    "qllm: the request needs up to {size}, but the server's limit `max_memory` \
                     = {} has {} in use by {} sequences; retry later or send a shorter prompt",
                    format_bytes(cap),
                    format_bytes(in_use.charged_bytes),
                    in_use.sequences
                )));
            }
        }
        *lock(&self.admitted) = Some((request.id, per_sequence));
        Ok(())
    }

    fn begin_sequence(&self, seq_id: usize, request_id: usize) {
        let plan = lock(&self.requests).get(&request_id).cloned();
        let mut state = match &plan {
            Some(plan) => SeqState::new(Arc::new(plan.config)),
            None => self.new_state(),
        };
        state.request_id = Some(request_id);
        if let Some((admitted, bytes)) = *lock(&self.admitted) {
            if admitted == request_id {
                state.reserved_bytes = bytes;
            }
        }
        tracing::debug!(
            "qllm: sequence {seq_id} of request {request_id} begins, {} reserved",
            format_bytes(state.reserved_bytes)
        );
        if let Some(plan) = plan {
            lock(&self.started).insert(request_id);
            state.question_tokens = plan.question;
            state.needle_asked = plan.needle;
            state.probe_for = plan.probe_for;
            if plan.probe_for.is_none() {
                state.probed = lock(&self.probes).get(&request_id).cloned();
            }
        }
        self.lock().insert(seq_id, state);
    }

    fn begin_step(&self, seqs: &[StepSequence<'_>]) -> Result<()> {
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
            // A sequence's prompt is what its first step reads; set once,
            // so that a later prompt step (an engine that re-runs a parked
            // sequence) cannot move it.
            if seq.is_prompt && state.prompt_len == 0 {
                state.prompt_len = seq.tokens.len();
                if !state.question_searched && state.config.mode.uses_question() {
                    state.question_searched = true;
                    self.settle_question(seq, state);
                }
                Self::start_needle_trace(seq, state);
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
            let config = state.config.clone();
            let (q, k, v) = (
                q.narrow(0, row, 1)?,
                k.narrow(0, row, 1)?,
                v.narrow(0, row, 1)?,
            );
            let out = if config.mode == Mode::Dense {
                if state.dense.len() != ctx.num_layers {
                    state.dense.resize_with(ctx.num_layers, KvBuffer::default);
                }
                self.attend_dense(&mut state.dense[ctx.layer_idx], ctx, offset, &q, &k, &v)?
            } else {
                if state.layers.len() != ctx.num_layers {
                    state
                        .layers
                        .resize_with(ctx.num_layers, LayerMemory::default);
                }
                // Only read when the layer starts, at offset 0: borrowed, not copied.
                let probed = state
                    .probed
                    .as_ref()
                    .and_then(|p| p.get(ctx.layer_idx))
                    .and_then(Option::as_deref);
                self.attend_memory(
                    &mut state.layers[ctx.layer_idx],
                    &config,
                    ctx,
                    offset,
                    state.prompt_len,
                    state.question.clone(),
                    probed,
                    state.needle.as_mut(),
                    &q,
                    &k,
                    &v,
                )?
            };
            if ctx.layer_idx + 1 == ctx.num_layers {
                self.after_last_layer(state, q.dim(2)?);
            }
            rows.push(out);
        }
        Tensor::cat(&rows, 0)
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
        Some(self.config.prefill_chunk_size)
    }

    fn model_loaded(&self, model: &HookModel) -> Option<usize> {
        let mut kept = lock(&self.model);
        let per_token = |m: &HookModel| sequence_bytes_bound(&self.config, m, 1 << 16);
        // One hook may serve several models: size requests for the largest.
        if kept.is_none_or(|k| per_token(model) >= per_token(&k)) {
            *kept = Some(*model);
        }
        (self.config.mode != Mode::Dense).then_some(self.config.max_context_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::tests::smollm2;

    #[test]
    fn question_is_found_last_and_with_loose_edges() {
        let prompt = [5, 1, 2, 3, 4, 9, 1, 2, 3, 4, 7];
        assert_eq!(find_question_span(&prompt, &[1, 2, 3, 4]), Some(6..10));
        // Edges tokenised differently in context: matched by the inner tokens.
        assert_eq!(find_question_span(&prompt, &[8, 2, 3, 6]), Some(6..10));
        assert_eq!(find_question_span(&prompt, &[8, 8, 8]), None);
        assert_eq!(
            find_span(&prompt, &[1, 2, 3, 4], Occurrence::First),
            Some(1..5)
        );
        assert_eq!(
            find_span(&prompt, &[8, 2, 3, 6], Occurrence::First),
            Some(1..5)
        );
        assert_eq!(find_question_span(&prompt, &[]), None);
    }

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
        let bound_16k = sequence_bytes_bound(&config, &smollm2(), 16 * 1024 + 16);
        let hook = QllmHook::new(QllmConfig {
            max_request_memory: Some(bound_16k),
            max_memory: Some(bound_16k * 3 / 2),
            ..config
        });
        // No model shape yet: nothing to size requests by.
        admit(&hook, 1, 1 << 20).unwrap();
        assert_eq!(hook.model_loaded(&smollm2()), Some(config.max_context_len));

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
        assert_eq!(hook.memory_stats(), MemoryStats::default());
        admit(&hook, 6, 16 * 1024).unwrap();
    }

    #[test]
    fn a_question_longer_than_the_prompt_is_refused() {
        let hook = QllmHook::new(QllmConfig::default());
        hook.register_request(
            7,
            RequestPlan {
                config: QllmConfig::default(),
                question: Some(vec![1; 10]),
                probe_for: None,
                needle: None,
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
}

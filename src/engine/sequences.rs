//! Per-sequence state: the memory of each layer (or the full KV in `dense`
//! mode), the question's span and vectors, the needle trace and the report.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{Result, Tensor, TensorId};
use mistralrs_core::attention_hook::{AttentionHookCtx, StepSequence};

use super::admission::rope_table_too_small;
use super::prefixes::Snapshot;
use super::requests::{Needle, ProbedVectors, RequestPlan, RequestReport};
use super::trace::NeedleTrace;
use crate::attention::{causal_attention, positions, rotate_f32, CausalMasks, MaskCache};
use crate::config::{Boundaries, Mode, Policy, QuestionVectors};
use crate::memory::{KvBuffer, LayerMemory, LayerStats, StepArgs};
use crate::question::span::{find_question_span, read_in_time, resolve};
use crate::retrieval::LayerVotes;

/// The KV a sequence keeps, one entry per layer.
#[derive(Debug)]
pub(crate) enum SeqMemory {
    /// `dense` mode: every token's keys (rotated) and values.
    Dense(Vec<KvBuffer>),
    /// Other modes: Q-LLM's context memory.
    Blocks(Vec<LayerMemory>),
}

impl SeqMemory {
    /// The same memory for a second owner (block slabs shared).
    pub fn fork(&self) -> Result<Self> {
        Ok(match self {
            SeqMemory::Dense(layers) => {
                SeqMemory::Dense(layers.iter().map(KvBuffer::fork).collect::<Result<_>>()?)
            }
            SeqMemory::Blocks(layers) => SeqMemory::Blocks(
                layers
                    .iter()
                    .map(LayerMemory::fork)
                    .collect::<Result<_>>()?,
            ),
        })
    }

    pub fn bytes(&self) -> usize {
        match self {
            SeqMemory::Dense(layers) => layers.iter().map(KvBuffer::bytes).sum(),
            SeqMemory::Blocks(layers) => layers.iter().map(LayerMemory::bytes).sum(),
        }
    }

    /// Allocations that forks share, by identity, with their bytes.
    pub fn shared_allocations(&self) -> impl Iterator<Item = (TensorId, usize)> + '_ {
        let layers: &[LayerMemory] = match self {
            SeqMemory::Dense(_) => &[],
            SeqMemory::Blocks(layers) => layers,
        };
        layers.iter().flat_map(LayerMemory::shared_allocations)
    }

    /// Tokens every layer has read (0 before the first step).
    fn processed(&self) -> usize {
        match self {
            SeqMemory::Dense(layers) => layers.first().map_or(0, KvBuffer::len),
            SeqMemory::Blocks(layers) => layers.first().map_or(0, LayerMemory::processed),
        }
    }
}

/// Per-sequence state.
#[derive(Debug)]
pub(crate) struct SeqState {
    pub policy: Arc<Policy>,
    pub request_id: Option<usize>,
    /// Bytes set aside for it when its request was admitted: its largest
    /// possible state (0 when no model shape was known).
    pub reserved_bytes: usize,
    /// Question tokens of the sequence's request, if it registered any.
    question_tokens: Option<Vec<u32>>,
    /// Set for a probe pass: the request it computes question vectors for.
    pub probe_for: Option<usize>,
    /// Question vector of each layer from a probe pass.
    probed: Option<ProbedVectors>,
    pub report: RequestReport,
    memory: SeqMemory,
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
    /// What each layer retrieved lately, for `consensus`.
    votes: RefCell<LayerVotes>,
    /// Whether each token read so far ends a sentence (`sentence`
    /// boundaries only; empty otherwise).
    sentence_ends: Vec<bool>,
    /// Every token of the sequence so far, as the engine last showed them.
    tokens: Vec<u32>,
    /// Whether its state may be kept for later requests, and a kept prefix
    /// taken over.
    pub reuse: bool,
    /// Where its state is kept for later requests: the last chunk boundary
    /// before the question (the document, for another question about it)
    /// and the last before the prompt's last token (for a follow-up).
    keep_points: Vec<usize>,
    /// The question its prompt was read with, once looked up.
    asked: Option<Vec<u32>>,
}

/// What one call of the hook needs besides the sequence's own state.
pub(crate) struct LayerCall<'a, 'b> {
    pub ctx: &'a AttentionHookCtx<'b>,
    pub offset: usize,
    pub causal_masks: &'a CausalMasks,
    pub memory_masks: &'a MaskCache,
}

impl SeqState {
    pub fn new(policy: Arc<Policy>) -> Self {
        let memory = if policy.mode == Mode::Dense {
            SeqMemory::Dense(Vec::new())
        } else {
            SeqMemory::Blocks(Vec::new())
        };
        Self {
            report: RequestReport {
                mode: policy.mode.to_string(),
                question_vectors: "none",
                ..RequestReport::default()
            },
            policy,
            request_id: None,
            reserved_bytes: 0,
            question_tokens: None,
            probe_for: None,
            probed: None,
            memory,
            prompt_len: 0,
            question: None,
            question_searched: false,
            needle_asked: None,
            needle: None,
            votes: RefCell::default(),
            sentence_ends: Vec::new(),
            tokens: Vec::new(),
            reuse: true,
            keep_points: Vec::new(),
            asked: None,
        }
    }

    /// The state of a sequence of a registered request.
    pub fn for_request(plan: RequestPlan, probed: Option<ProbedVectors>) -> Self {
        let mut state = Self::new(Arc::new(plan.policy));
        state.question_tokens = plan.question;
        state.needle_asked = plan.needle;
        state.report.question_copied = plan.question_copied;
        state.probe_for = plan.probe_for;
        state.reuse = plan.reuse && plan.probe_for.is_none();
        if plan.probe_for.is_none() {
            state.probed = probed;
        }
        state
    }

    pub fn bytes(&self) -> usize {
        self.memory.bytes() + self.sentence_ends.capacity() + self.tokens.capacity() * 4
    }

    /// Tokens every layer has read.
    pub fn processed(&self) -> usize {
        self.memory.processed()
    }

    /// Takes in the tokens a step shows (all of the sequence's so far).
    /// Only the new ones are copied: a sequence's tokens only grow.
    pub fn note_tokens(&mut self, tokens: &[u32]) {
        self.tokens.truncate(tokens.len());
        let known = self.tokens.len();
        self.tokens.extend_from_slice(&tokens[known..]);
    }

    /// Whether its state after the step just run is to be kept for later
    /// requests: at a keep point, with at least `min_tokens` read.
    pub fn at_keep_point(&self, min_tokens: usize) -> bool {
        let processed = self.processed();
        self.reuse && processed >= min_tokens && self.keep_points.contains(&processed)
    }

    /// Its state after the tokens read so far, for later requests (block
    /// slabs shared).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let processed = self.processed();
        Ok(Snapshot {
            question: self.asked.clone(),
            tokens: self.tokens[..processed.min(self.tokens.len())].to_vec(),
            policy: self.policy.clone(),
            memory: self.memory.fork()?,
            sentence_ends: self.sentence_ends[..processed.min(self.sentence_ends.len())].to_vec(),
            votes: self.votes.borrow().clone(),
        })
    }

    /// Takes over a kept prefix (of this sequence's policy) as the state
    /// after its first tokens. A prefix read with another question forgets
    /// it: this sequence's own is applied (its probed vectors now; one read
    /// in line as it passes).
    pub fn resume(&mut self, kept: Snapshot, global_question: Option<&[u32]>) {
        let reused = kept.tokens.len();
        self.memory = kept.memory;
        self.sentence_ends = kept.sentence_ends;
        *self.votes.get_mut() = kept.votes;
        let asked = self.question_tokens.as_deref().or(global_question);
        let same_question = kept.question.is_some() && kept.question.as_deref() == asked;
        if let (false, SeqMemory::Blocks(layers)) = (same_question, &mut self.memory) {
            for (layer, memory) in layers.iter_mut().enumerate() {
                memory.forget_question();
                if let Some(vector) = probed_for(&self.probed, layer) {
                    memory.set_question(vector.clone());
                }
            }
        }
        self.tokens = kept.tokens;
        self.report.reused_prompt_tokens = reused;
    }

    /// What counts against the memory caps: its reservation, or what it
    /// holds if that is more (a request without a generation limit).
    pub fn charged_bytes(&self) -> usize {
        self.reserved_bytes.max(self.bytes())
    }

    /// What each layer's memory holds (empty in `dense` mode).
    pub fn layer_stats(&self) -> Vec<LayerStats> {
        self.layers().iter().map(LayerMemory::stats).collect()
    }

    fn layers(&self) -> &[LayerMemory] {
        match &self.memory {
            SeqMemory::Dense(_) => &[],
            SeqMemory::Blocks(layers) => layers,
        }
    }

    /// Reads the sequence's first prompt step: its length, its question's
    /// span and where the question's vectors come from, and the needle to
    /// trace. Later prompt steps (an engine that re-runs a parked sequence)
    /// change nothing.
    pub fn begin_prompt(
        &mut self,
        seq: &StepSequence<'_>,
        global_question: Option<&[u32]>,
        chunk_size: usize,
    ) {
        if !seq.is_prompt || self.prompt_len != 0 {
            return;
        }
        self.prompt_len = seq.tokens.len();
        let mut question_start = None;
        if !self.question_searched {
            self.question_searched = true;
            let question = self.question_tokens.take();
            let question = question.as_deref().or(global_question);
            self.asked = question.map(<[u32]>::to_vec);
            if self.policy.mode.uses_question() {
                self.settle_question(seq, question);
                question_start = self.question.as_ref().map(|span| span.start);
            } else {
                // Not used, but where it begins the document ends.
                question_start = question
                    .and_then(|q| resolve(seq.tokens, q, &self.policy))
                    .map(|found| found.span.start);
            }
        }
        // Chunk boundaries, where every layer has read the same tokens. They
        // fall on execution-block boundaries, which do not move when a
        // prompt is extended: a state kept there and resumed reads on as a
        // fresh read of the longer prompt would. The prompt's end does not
        // qualify: its last token is read alone, as a longer prompt's is
        // not.
        let start = self.processed();
        self.keep_points = [question_start, self.prompt_len.checked_sub(1)]
            .into_iter()
            .flatten()
            .filter_map(|end| {
                let point = start + (end - start.min(end)) / chunk_size * chunk_size;
                (point > start).then_some(point)
            })
            .collect();
        self.start_needle_trace(seq);
    }

    /// Marks the sentence ends among the step's tokens not seen before
    /// (`sentence` boundaries: where memory blocks may begin), given the
    /// model's sentence-end tokens, sorted.
    pub fn note_sentence_ends(&mut self, tokens: &[u32], sentence_end_tokens: &[u32]) {
        if self.policy.boundaries != Boundaries::Sentence {
            return;
        }
        let known = self.sentence_ends.len().min(tokens.len());
        self.sentence_ends.truncate(known);
        self.sentence_ends.extend(
            tokens[known..]
                .iter()
                .map(|t| sentence_end_tokens.binary_search(t).is_ok()),
        );
    }

    /// Decides, once per prompt, the question's span and where its vectors
    /// come from: read in line when the question comes before any block
    /// could be retrieved (unless `question_vectors = "probe"`), else from
    /// the probe pass when there was one.
    fn settle_question(&mut self, seq: &StepSequence<'_>, question: Option<&[u32]>) {
        let id = seq.seq_id;
        self.question = match question {
            None => {
                tracing::info!(
                    "qllm: sequence {id}: no question given; retrieval uses the current queries \
                     only"
                );
                None
            }
            Some(question) => match resolve(seq.tokens, question, &self.policy) {
                None => {
                    tracing::warn!(
                        "qllm: sequence {id}: the question ({} tokens) is not in the prompt{}",
                        question.len(),
                        if self.probed.is_some() {
                            "; retrieval uses its probed vectors"
                        } else {
                            "; retrieval runs without it"
                        }
                    );
                    None
                }
                Some(found) => {
                    if found.cut > 0 {
                        tracing::warn!(
                            "qllm: sequence {id}: question of {} tokens cut to its last {} \
                             (`n_local`)",
                            found.span.len() + found.cut,
                            self.policy.n_local
                        );
                    }
                    tracing::info!(
                        "qllm: sequence {id}: question at tokens {}..{} of {}",
                        found.span.start,
                        found.span.end,
                        seq.tokens.len()
                    );
                    Some(found.span)
                }
            },
        };
        self.report.question_span = self.question.as_ref().map(|s| (s.start, s.end));
        let in_time = self
            .question
            .as_ref()
            .is_some_and(|span| span.end <= read_in_time(&self.policy));
        let keep_probed = self.policy.question_vectors == QuestionVectors::Probe;
        if (self.probe_for.is_some() || (in_time && !keep_probed)) && self.probed.take().is_some() {
            tracing::info!(
                "qllm: sequence {id}: question read before any retrieval; captured in line"
            );
        }
        self.report.question_vectors = if self.probed.is_some() {
            tracing::info!(
                "qllm: sequence {id}: retrieval uses the question's probed vectors from the start"
            );
            "probe"
        } else if self.question.is_some() {
            "in line"
        } else {
            "none"
        };
    }

    /// Finds the traced span in the prompt, if the request asked for one.
    fn start_needle_trace(&mut self, seq: &StepSequence<'_>) {
        let Some(needle) = self.needle_asked.take() else {
            return;
        };
        let policy = &self.policy;
        if !policy.mode.keeps_blocks() {
            tracing::warn!(
                "qllm: sequence {}: `{}` keeps no memory blocks; the needle is not traced",
                seq.seq_id,
                policy.mode
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
                self.needle = Some(NeedleTrace::new(
                    span,
                    self.question.as_ref().map(|q| q.end),
                    seq.tokens.len(),
                    policy.block_size,
                ));
            }
            None => tracing::warn!(
                "qllm: sequence {}: the needle {needle:?} is not in the prompt",
                seq.seq_id
            ),
        }
    }

    /// Attention of one layer for this sequence's row of a batch.
    pub fn attend(
        &mut self,
        call: &LayerCall<'_, '_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let ctx = call.ctx;
        let layer = ctx.layer_idx;
        match &mut self.memory {
            SeqMemory::Dense(layers) => {
                if layers.len() != ctx.num_layers {
                    layers.resize_with(ctx.num_layers, KvBuffer::default);
                }
                attend_dense(&mut layers[layer], call, q, k, v)
            }
            SeqMemory::Blocks(layers) => {
                if layers.len() != ctx.num_layers {
                    layers.resize_with(ctx.num_layers, LayerMemory::default);
                    self.votes.get_mut().resize(ctx.num_layers);
                }
                let policy = &self.policy;
                let table = ctx.rope.max_positions();
                if policy.positions_needed() > table {
                    candle_core::bail!("{}", rope_table_too_small(policy, table));
                }
                let memory = &mut layers[layer];
                if call.offset == 0 {
                    *memory = LayerMemory::default();
                    if layer == 0 {
                        self.votes.get_mut().clear();
                    }
                    // Only read when the layer starts: borrowed, not copied.
                    if let Some(vector) = probed_for(&self.probed, layer) {
                        memory.set_question(vector.clone());
                    }
                } else if call.offset != memory.processed() {
                    candle_core::bail!(
                        "qllm: layer {layer} got tokens at position {} but holds {} tokens",
                        call.offset,
                        memory.processed()
                    );
                }
                let args = StepArgs {
                    rope: ctx.rope,
                    softmax_scale: ctx.softmax_scale,
                    question: self.question.clone(),
                    prompt_len: self.prompt_len,
                    masks: call.memory_masks,
                    votes: Some((layer, &self.votes)),
                    sentence_ends: &self.sentence_ends,
                };
                let needle = &mut self.needle;
                let out = memory.append(policy, &args, q, k, v, |read| {
                    if let Some(trace) = needle.as_mut() {
                        trace.observe(layer, &read);
                    }
                })?;
                if q.dim(2)? == 1 && tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::debug!(
                        "qllm: layer {layer} at position {}: retrieved blocks {:?}",
                        call.offset,
                        memory.last_retrieved()
                    );
                }
                Ok(out)
            }
        }
    }

    /// The question vectors of every layer, once each has one (a probe's
    /// result).
    pub fn question_vectors(&self) -> Option<ProbedVectors> {
        let vectors: ProbedVectors = self
            .layers()
            .iter()
            .map(|l| l.question_vector().map(<[f32]>::to_vec))
            .collect();
        (!vectors.is_empty() && vectors.iter().all(Option::is_some)).then_some(vectors)
    }

    /// Brings the report up to date after the last layer of a step of
    /// `step_len` tokens.
    pub fn update_report(&mut self, step_len: usize) -> &RequestReport {
        let memory_bytes = self.bytes();
        let first = self.layers().first().map(LayerMemory::stats);
        let retrieved: Option<BTreeSet<usize>> =
            (step_len == 1 && self.report.retrieved_blocks.is_empty()).then(|| {
                self.layers()
                    .iter()
                    .flat_map(|l| l.last_retrieved().iter().copied())
                    .collect()
            });
        let report = &mut self.report;
        report.prompt_tokens = self.prompt_len;
        report.memory_bytes = memory_bytes;
        if let Some(stats) = first {
            report.blocks = stats.blocks;
            report.tokens_in_memory = stats.blocked;
        }
        if let Some(trace) = &self.needle {
            let needle = trace.report();
            if step_len == 1 && needle.at_decode.len() == 1 {
                tracing::debug!(
                    "qllm: request {:?}: needle at tokens {}..{} (blocks {:?}) retrieved by {} \
                     of {} layers at the question, {} at the first decode step; per layer {}",
                    self.request_id,
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
        if let Some(retrieved) = retrieved {
            report.retrieved_blocks = retrieved.into_iter().collect();
        }
        &self.report
    }
}

/// Layer `layer`'s question vector from a probe pass, if there is one.
fn probed_for(probed: &Option<ProbedVectors>, layer: usize) -> Option<&Vec<f32>> {
    probed.as_ref()?.get(layer)?.as_ref()
}

/// `dense` mode: full causal attention over the layer's own KV store.
fn attend_dense(
    state: &mut KvBuffer,
    call: &LayerCall<'_, '_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    let (ctx, offset) = (call.ctx, call.offset);
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
    causal_attention(&q, &k_all, &v_all, ctx.softmax_scale, call.causal_masks)?.to_dtype(v.dtype())
}

//! The adapter between mistral.rs's attention hook and this crate's policies.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use candle_core::{Result, Tensor};
use mistralrs_core::attention_hook::{AttentionHook, AttentionHookCtx, StepSequence};

use crate::attention::{causal_attention, CausalMasks};
use crate::config::{Mode, QllmConfig};
use crate::kv::KvBuffer;
use crate::memory::{LayerMemory, LayerStats, MaskCache, StepArgs};

/// Per-sequence state.
#[derive(Debug, Default)]
struct SeqState {
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
}

/// Totals over all live sequences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Sequences with state.
    pub sequences: usize,
    /// Bytes of KV and bookkeeping held.
    pub bytes: usize,
}

/// The attention hook: owns every sequence's KV and computes attention
/// according to its [`QllmConfig`].
#[derive(Debug)]
pub struct QllmHook {
    config: QllmConfig,
    seqs: Mutex<HashMap<usize, SeqState>>,
    question_tokens: Mutex<Option<Vec<u32>>>,
    causal_masks: CausalMasks,
    memory_masks: MaskCache,
}

impl QllmHook {
    /// A hook with no sequences yet.
    pub fn new(config: QllmConfig) -> Self {
        Self {
            config,
            seqs: Mutex::new(HashMap::new()),
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
    /// (last occurrence; tokenisation at its edges may differ, so its inner
    /// tokens are matched when the whole does not). Q-LLM captures the
    /// question vector once the span has been read; a question of more than
    /// `n_local` tokens is cut to its last `n_local`.
    pub fn set_question(&self, tokens: Option<Vec<u32>>) {
        *self
            .question_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = tokens.filter(|t| !t.is_empty());
    }

    /// Memory held for all live sequences.
    pub fn memory_stats(&self) -> MemoryStats {
        let seqs = self.lock();
        MemoryStats {
            sequences: seqs.len(),
            bytes: seqs
                .values()
                .map(|s| {
                    s.dense.iter().map(KvBuffer::bytes).sum::<usize>()
                        + s.layers.iter().map(LayerMemory::bytes).sum::<usize>()
                })
                .sum(),
        }
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
        // A panic elsewhere must not wedge the server; the state is per-sequence.
        self.seqs.lock().unwrap_or_else(|e| e.into_inner())
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
        let (q, k) = ctx.rope.forward(q, k, &[offset])?;
        state.append(&k, v)?;
        let (k, v) = state.get()?.expect("appended above");
        causal_attention(&q, &k, &v, ctx.softmax_scale, &self.causal_masks)
    }

    #[allow(clippy::too_many_arguments)]
    fn attend_memory(
        &self,
        memory: &mut LayerMemory,
        ctx: &AttentionHookCtx<'_>,
        offset: usize,
        prompt_len: usize,
        question: Option<Range<usize>>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let config = &self.config;
        let needed = config.n_local + config.exc_block_size - 1;
        if needed > ctx.rope.max_positions() {
            candle_core::bail!(
                "qllm: `n_local` + `exc_block_size` - 1 = {needed} positions exceed the model's \
                 RoPE table ({} positions); lower `n_local` or `exc_block_size`",
                ctx.rope.max_positions()
            );
        }
        if offset == 0 {
            *memory = LayerMemory::default();
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
            outputs.push(memory.attend(
                config,
                &args,
                &q.narrow(2, start, n)?,
                &k.narrow(2, start, n)?,
                &v.narrow(2, start, n)?,
            )?);
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

    fn find_question(&self, seq: &StepSequence<'_>) -> Option<Range<usize>> {
        let Some(question) = self
            .question_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            tracing::info!(
                "qllm: sequence {}: no question given; retrieval uses the current queries only",
                seq.seq_id
            );
            return None;
        };
        let Some(span) = find_question_span(seq.tokens, &question) else {
            tracing::warn!(
                "qllm: sequence {}: the question ({} tokens) is not in the prompt; \
                 retrieval runs without it",
                seq.seq_id,
                question.len()
            );
            return None;
        };
        let start = span.start.max(span.end.saturating_sub(self.config.n_local));
        if start > span.start {
            tracing::warn!(
                "qllm: sequence {}: question of {} tokens cut to its last {} (`n_local`)",
                seq.seq_id,
                span.len(),
                self.config.n_local
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
}

/// The last occurrence of `question` in `tokens`; when the whole does not
/// occur, the last occurrence of its inner tokens, widened by one token on
/// each side (its first and last tokens may merge with their neighbours).
pub fn find_question_span(tokens: &[u32], question: &[u32]) -> Option<Range<usize>> {
    let last = |needle: &[u32]| -> Option<usize> {
        if needle.is_empty() || needle.len() > tokens.len() {
            return None;
        }
        tokens.windows(needle.len()).rposition(|w| w == needle)
    };
    if let Some(at) = last(question) {
        return Some(at..at + question.len());
    }
    if question.len() > 2 {
        let inner = &question[1..question.len() - 1];
        if let Some(at) = last(inner) {
            return Some(at.saturating_sub(1)..(at + inner.len() + 1).min(tokens.len()));
        }
    }
    None
}

impl AttentionHook for QllmHook {
    fn begin_step(&self, seqs: &[StepSequence<'_>]) -> Result<()> {
        self.memory_masks.clear();
        let mut states = self.lock();
        for seq in seqs {
            let state = states.entry(seq.seq_id).or_default();
            if seq.is_prompt {
                state.prompt_len = seq.tokens.len();
                if !state.question_searched && self.config.mode.uses_question() {
                    state.question_searched = true;
                    state.question = self.find_question(seq);
                }
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
        let mut seqs = self.lock();
        let mut rows = Vec::with_capacity(batch);
        for (row, (&seq_id, &offset)) in ctx.seq_ids.iter().zip(ctx.seqlen_offsets).enumerate() {
            let state = seqs.entry(seq_id).or_default();
            let (q, k, v) = (
                q.narrow(0, row, 1)?,
                k.narrow(0, row, 1)?,
                v.narrow(0, row, 1)?,
            );
            let out = if self.config.mode == Mode::Dense {
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
                let (prompt_len, question) = (state.prompt_len, state.question.clone());
                self.attend_memory(
                    &mut state.layers[ctx.layer_idx],
                    ctx,
                    offset,
                    prompt_len,
                    question,
                    &q,
                    &k,
                    &v,
                )?
            };
            rows.push(out);
        }
        Tensor::cat(&rows, 0)
    }

    fn end_sequence(&self, seq_id: usize) {
        self.lock().remove(&seq_id);
    }

    fn prefill_chunk_size(&self) -> Option<usize> {
        Some(self.config.prefill_chunk_size)
    }

    fn max_context_len(&self) -> Option<usize> {
        (self.config.mode != Mode::Dense).then_some(self.config.max_context_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_is_found_last_and_with_loose_edges() {
        let prompt = [5, 1, 2, 3, 4, 9, 1, 2, 3, 4, 7];
        assert_eq!(find_question_span(&prompt, &[1, 2, 3, 4]), Some(6..10));
        // Edges tokenised differently in context: matched by the inner tokens.
        assert_eq!(find_question_span(&prompt, &[8, 2, 3, 6]), Some(6..10));
        assert_eq!(find_question_span(&prompt, &[8, 8, 8]), None);
        assert_eq!(find_question_span(&prompt, &[]), None);
    }
}

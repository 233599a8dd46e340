//! The adapter between mistral.rs's attention hook and this crate's policies.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use candle_core::{Result, Tensor};
use mistralrs_core::attention_hook::{AttentionHook, AttentionHookCtx};

use crate::attention::{causal_attention, CausalMasks};
use crate::config::{Mode, QllmConfig};
use crate::kv::KvBuffer;

/// Per-sequence state: one KV store per layer.
#[derive(Debug, Default)]
struct SeqState {
    layers: Vec<KvBuffer>,
}

/// Totals over all live sequences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Sequences with state.
    pub sequences: usize,
    /// Bytes of KV held.
    pub bytes: usize,
}

/// The attention hook: owns every sequence's KV and computes attention
/// according to its [`QllmConfig`].
#[derive(Debug)]
pub struct QllmHook {
    config: QllmConfig,
    seqs: Mutex<HashMap<usize, SeqState>>,
    masks: CausalMasks,
}

impl QllmHook {
    /// A hook with no sequences yet.
    pub fn new(config: QllmConfig) -> Self {
        Self {
            config,
            seqs: Mutex::new(HashMap::new()),
            masks: CausalMasks::default(),
        }
    }

    /// The settings it runs with.
    pub fn config(&self) -> &QllmConfig {
        &self.config
    }

    /// Memory held for all live sequences.
    pub fn memory_stats(&self) -> MemoryStats {
        let seqs = self.lock();
        MemoryStats {
            sequences: seqs.len(),
            bytes: seqs
                .values()
                .flat_map(|s| &s.layers)
                .map(KvBuffer::bytes)
                .sum(),
        }
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
        causal_attention(&q, &k, &v, ctx.softmax_scale, &self.masks)
    }
}

impl AttentionHook for QllmHook {
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
            if state.layers.len() != ctx.num_layers {
                state.layers.resize_with(ctx.num_layers, KvBuffer::default);
            }
            let layer = &mut state.layers[ctx.layer_idx];
            let (q, k, v) = (
                q.narrow(0, row, 1)?,
                k.narrow(0, row, 1)?,
                v.narrow(0, row, 1)?,
            );
            let out = match self.config.mode {
                Mode::Dense => self.attend_dense(layer, ctx, offset, &q, &k, &v)?,
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
}

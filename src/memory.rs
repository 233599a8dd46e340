//! Q-LLM's per-layer context memory and its two-stage attention.
//!
//! One [`LayerMemory`] holds one layer of one sequence:
//! - `init`: the first `n_init` tokens (attention sinks);
//! - `recent`: every token not yet in `init` or a block, the newest ones
//!   forming the local window, with the attention each has received from
//!   local queries so far (per query head);
//! - memory blocks of `block_size` evicted tokens, each with a
//!   representative key for retrieval; with `streaming` evicted tokens are
//!   dropped instead.
//!
//! Keys are stored pre-RoPE. A query attends its last `n_local` tokens with
//! exact relative positions (rotated within the window, so positions stay
//! below `n_local + exc_block_size`) and, in the same softmax, the sinks,
//! the retrieved blocks and older not-yet-blocked tokens: with `positions =
//! fixed` (the paper's) all at one distance `n_local - 1` (the query is
//! rotated once to position `n_local - 1`, the keys stay unrotated); with
//! `ordered` at consecutive positions in document order, the window right
//! after them. Blocks are ranked by `scoring` (see [`Scoring`]). Every past
//! token is attended at most once.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use candle_core::{DType, Device, DeviceLocation, Result, Tensor};
use mistralrs_core::layers::RotaryEmbedding;

use crate::config::{
    Mode, Positions, QllmConfig, QuestionRows, Scoring, Selection, MAX_QUESTION_ROWS,
};
use crate::kv::KvBuffer;
use crate::rope::{positions, rotate_f32};

/// Blocks per slab of a [`BlockStore`].
pub(crate) const SLAB_BLOCKS: usize = 16;

/// The memory blocks of one layer: `block_size` consecutive evicted tokens
/// each, pre-RoPE, in slabs of [`SLAB_BLOCKS`] blocks. One allocation per
/// slab rather than per block: thousands of small long-lived buffers
/// interleaved with transient ones fragment the heap.
#[derive(Debug, Default)]
struct BlockStore {
    /// `(1, kv_heads, SLAB_BLOCKS * block_size, d)` keys and values.
    slabs: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl BlockStore {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a block, `(1, kv_heads, block_size, d)` keys and values.
    fn push(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, heads, block_size, d) = k.dims4()?;
        let slot = self.len % SLAB_BLOCKS;
        if slot == 0 {
            let shape = (b, heads, SLAB_BLOCKS * block_size, d);
            self.slabs.push((
                Tensor::zeros(shape, k.dtype(), k.device())?,
                Tensor::zeros(shape, v.dtype(), v.device())?,
            ));
        }
        let (ks, vs) = self.slabs.last().expect("a slab with room");
        ks.slice_set(&k.contiguous()?, 2, slot * block_size)?;
        vs.slice_set(&v.contiguous()?, 2, slot * block_size)?;
        self.len += 1;
        Ok(())
    }

    /// Views of block `i`'s keys and values.
    fn get(&self, i: usize) -> Result<(Tensor, Tensor)> {
        let (ks, vs) = &self.slabs[i / SLAB_BLOCKS];
        let block_size = ks.dim(2)? / SLAB_BLOCKS;
        let at = (i % SLAB_BLOCKS) * block_size;
        Ok((ks.narrow(2, at, block_size)?, vs.narrow(2, at, block_size)?))
    }

    /// `q · k` with every stored key: `q` is `(kv_heads, m, d)` f32, the
    /// result `(kv_heads, m, len * block_size)` f32, in block order.
    fn token_logits(&self, q: &Tensor) -> Result<Tensor> {
        let mut logits = Vec::with_capacity(self.slabs.len());
        for (i, (keys, _)) in self.slabs.iter().enumerate() {
            let filled = (self.len - i * SLAB_BLOCKS).min(SLAB_BLOCKS);
            let block_size = keys.dim(2)? / SLAB_BLOCKS;
            let keys = keys
                .narrow(2, 0, filled * block_size)?
                .squeeze(0)?
                .to_dtype(DType::F32)?;
            logits.push(q.matmul(&keys.t()?)?);
        }
        Tensor::cat(&logits, 2)
    }

    /// Per block, the highest `q · k` over its tokens, where `q` is
    /// `(kv_heads, d)` f32 (each KV head's query heads summed). One row per
    /// KV head, or with `summed` one row of the dot products summed over KV
    /// heads before the maximum is taken.
    fn token_max_scores(&self, q: &Tensor, summed: bool) -> Result<Vec<Vec<f32>>> {
        let mut logits = self.token_logits(&q.unsqueeze(1)?)?.squeeze(1)?;
        if summed {
            logits = logits.sum_keepdim(0)?;
        }
        let rows = logits.dim(0)?;
        logits
            .reshape((rows, self.len, ()))?
            .max(2)?
            .to_vec2::<f32>()
    }

    /// Per KV head and block, the attention the block would receive: `q` is
    /// `(kv_heads, m, d)` f32, the `m` query rows of each KV head's query
    /// heads; each row is softmax-normalised over every stored key (logits
    /// times `scale`), its probabilities summed per block and weighted by
    /// `weights[r % weights.len()]` (one weight per distinct query row),
    /// then summed over the rows.
    fn attention_mass_scores(
        &self,
        q: &Tensor,
        weights: &[f32],
        scale: f32,
    ) -> Result<Vec<Vec<f32>>> {
        let (kv_heads, m, _) = q.dims3()?;
        // Per slab, `(kv_heads, m, slab tokens)` logits on the host; the
        // softmax and the sums run in one pass over them (as tensor ops they
        // took six full-size temporaries per layer and step).
        let mut slabs = Vec::with_capacity(self.slabs.len());
        let mut block_size = 0;
        for (i, (keys, _)) in self.slabs.iter().enumerate() {
            let filled = (self.len - i * SLAB_BLOCKS).min(SLAB_BLOCKS);
            block_size = keys.dim(2)? / SLAB_BLOCKS;
            let keys = keys
                .narrow(2, 0, filled * block_size)?
                .squeeze(0)?
                .to_dtype(DType::F32)?;
            let logits = q.matmul(&keys.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            slabs.push((filled, logits));
        }
        let mut scores = vec![vec![0f32; self.len]; kv_heads];
        let mut row_blocks = vec![0f32; self.len];
        for (g, head_scores) in scores.iter_mut().enumerate() {
            for r in 0..m {
                let at = g * m + r;
                fn row(slab: &(usize, Vec<f32>), at: usize, block_size: usize) -> &[f32] {
                    let n = slab.0 * block_size;
                    &slab.1[at * n..(at + 1) * n]
                }
                let max = slabs
                    .iter()
                    .flat_map(|slab| row(slab, at, block_size).iter().copied())
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0f32;
                let mut b = 0;
                for slab in &slabs {
                    for block in row(slab, at, block_size).chunks_exact(block_size) {
                        let mass: f32 = block.iter().map(|x| ((x - max) * scale).exp()).sum();
                        row_blocks[b] = mass;
                        total += mass;
                        b += 1;
                    }
                }
                let weight = weights[r % weights.len()] / total;
                for (s, mass) in head_scores.iter_mut().zip(&row_blocks) {
                    *s += weight * mass;
                }
            }
        }
        Ok(scores)
    }

    /// Keys of blocks `from..self.len()` as f32, one `(kv_heads, tokens, d)`
    /// piece per slab they fall in, in block order.
    fn keys_f32(&self, from: usize) -> Result<Vec<Tensor>> {
        let mut pieces = Vec::new();
        for (i, (keys, _)) in self.slabs.iter().enumerate().skip(from / SLAB_BLOCKS) {
            let block_size = keys.dim(2)? / SLAB_BLOCKS;
            let first = from.max(i * SLAB_BLOCKS) - i * SLAB_BLOCKS;
            let filled = (self.len - i * SLAB_BLOCKS).min(SLAB_BLOCKS);
            if filled == first {
                continue;
            }
            pieces.push(
                keys.narrow(2, first * block_size, (filled - first) * block_size)?
                    .squeeze(0)?
                    .to_dtype(DType::F32)?,
            );
        }
        Ok(pieces)
    }

    /// Bytes allocated, including the free slots of the last slab.
    fn bytes(&self) -> usize {
        self.slabs
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// The question's share of `attention_mass` scores, kept up to date as
/// blocks form. The question's rows and the memory keys never move
/// (queries at the fixed distance, keys unrotated), so each block's logits
/// against them are computed once: per block and row, the largest logit and
/// the sum of `exp(scale * (logit - largest))`, which combine into the
/// softmax over all blocks without reading a key again.
#[derive(Debug)]
struct QuestionMass {
    /// `(kv_heads, rows, d)` f32: each KV head's query heads' question rows.
    rows: Tensor,
    /// Per block, per KV head and row: the largest logit, then the sum.
    partials: Vec<f32>,
    /// Blocks covered by `partials`.
    blocks: usize,
}

impl QuestionMass {
    /// `question` is `(heads, r, d)` flattened: `r` rows per query head.
    fn new(question: &[f32], kv_heads: usize, d: usize, device: &Device) -> Result<Self> {
        let rows = question.len() / (kv_heads * d);
        Ok(Self {
            rows: Tensor::from_slice(question, (kv_heads, rows, d), device)?,
            partials: Vec::new(),
            blocks: 0,
        })
    }

    /// Adds the partials of the blocks formed since the last call.
    fn extend(&mut self, store: &BlockStore, block_size: usize, scale: f32) -> Result<()> {
        let (kv_heads, rows, _) = self.rows.dims3()?;
        for keys in store.keys_f32(self.blocks)? {
            let tokens = keys.dim(1)?;
            let logits = self
                .rows
                .matmul(&keys.t()?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let blocks = tokens / block_size;
            let first = self.partials.len();
            self.partials
                .resize(first + blocks * kv_heads * rows * 2, 0.0);
            for (row, logits) in logits.chunks_exact(tokens).enumerate() {
                for (b, block) in logits.chunks_exact(block_size).enumerate() {
                    let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = block.iter().map(|x| ((x - max) * scale).exp()).sum();
                    let at = first + (b * kv_heads * rows + row) * 2;
                    self.partials[at] = max;
                    self.partials[at + 1] = sum;
                }
            }
            self.blocks += blocks;
        }
        Ok(())
    }

    /// Per KV head and block, the attention the question rows give the
    /// block, each row's softmax over all blocks' keys weighted by
    /// `row_weight`, summed over the KV head's rows.
    fn scores(&self, row_weight: f32, scale: f32) -> Result<Vec<Vec<f32>>> {
        let (kv_heads, rows, _) = self.rows.dims3()?;
        let stride = kv_heads * rows * 2;
        let mut scores = vec![vec![0f32; self.blocks]; kv_heads];
        for (g, head_scores) in scores.iter_mut().enumerate() {
            for r in 0..rows {
                let at = (g * rows + r) * 2;
                let partial = |b: usize| {
                    (
                        self.partials[b * stride + at],
                        self.partials[b * stride + at + 1],
                    )
                };
                let max = (0..self.blocks)
                    .map(|b| partial(b).0)
                    .fold(f32::NEG_INFINITY, f32::max);
                let masses: Vec<f32> = (0..self.blocks)
                    .map(|b| {
                        let (m, sum) = partial(b);
                        sum * ((m - max) * scale).exp()
                    })
                    .collect();
                let weight = row_weight / masses.iter().sum::<f32>();
                for (s, mass) in head_scores.iter_mut().zip(&masses) {
                    *s += weight * mass;
                }
            }
        }
        Ok(scores)
    }

    fn bytes(&self) -> usize {
        (self.partials.capacity() + self.rows.elem_count()) * 4
    }
}

/// What a layer's memory holds, for statistics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Tokens processed so far.
    pub processed: usize,
    /// Sink tokens held.
    pub init: usize,
    /// Tokens not yet in a block: the local window and the tokens just past it.
    pub recent: usize,
    /// Memory blocks held.
    pub blocks: usize,
    /// Bytes allocated for memory blocks.
    pub block_bytes: usize,
    /// Evicted tokens that were dropped (`streaming` only).
    pub dropped: usize,
    /// Block indices retrieved for the latest execution block, ascending.
    pub last_retrieved: Vec<usize>,
    /// Whether the question vector has been captured.
    pub has_question: bool,
}

/// The per-layer state of one sequence.
#[derive(Debug, Default)]
pub struct LayerMemory {
    processed: usize,
    init: KvBuffer,
    recent: KvBuffer,
    /// Absolute position of `recent`'s oldest token.
    recent_start: usize,
    /// Local attention received by each `recent` token, `heads` per token.
    local_score: Vec<f32>,
    blocks: BlockStore,
    /// One representative key per block, `heads * d` values each.
    representatives: Vec<f32>,
    dropped: usize,
    /// The question's rows, `(heads, r, d)` flattened: `r` is 1 (the
    /// question vector) or, with `question_rows = "tokens"`, one per token.
    question: Option<Vec<f32>>,
    /// The question's `attention_mass` partials, built at the first
    /// retrieval that uses them.
    question_mass: Option<QuestionMass>,
    /// Globally rotated queries of the question tokens seen so far,
    /// `(heads, t, d)` f32 pieces.
    question_queries: Vec<Tensor>,
    /// Blocks retrieved at the latest execution block: one list, or one
    /// per KV head with `per_kv_head` selection.
    last_picks: Vec<Vec<usize>>,
    /// Blocks retrieved by some head at the latest execution block.
    last_retrieved: Vec<usize>,
    /// Retrieval score of every block at the latest execution block: one
    /// row, or one per KV head with `per_kv_head` selection.
    last_scores: Vec<Vec<f32>>,
}

/// Per-step inputs shared by all layers.
pub struct StepArgs<'a> {
    /// The model's rotary embedding.
    pub rope: &'a RotaryEmbedding,
    /// Scale of `q k^T`.
    pub softmax_scale: f32,
    /// Token span of the question within the sequence, if known.
    pub question: Option<Range<usize>>,
    /// Masks shared by the layers of a step.
    pub masks: &'a MaskCache,
}

impl LayerMemory {
    /// Tokens processed so far.
    pub fn processed(&self) -> usize {
        self.processed
    }

    /// What the memory holds.
    pub fn stats(&self) -> LayerStats {
        LayerStats {
            processed: self.processed,
            init: self.init.len(),
            recent: self.recent.len(),
            blocks: self.blocks.len(),
            block_bytes: self.blocks.bytes(),
            dropped: self.dropped,
            last_retrieved: self.last_retrieved.clone(),
            has_question: self.question.is_some(),
        }
    }

    /// Block indices retrieved for the latest execution block, ascending;
    /// with `per_kv_head` selection, those some KV head retrieved.
    pub fn last_retrieved(&self) -> &[usize] {
        &self.last_retrieved
    }

    /// Retrieval score of every block at the latest execution block: one
    /// row, or one per KV head with `per_kv_head` selection (empty when
    /// nothing was retrieved).
    pub fn last_scores(&self) -> &[Vec<f32>] {
        &self.last_scores
    }

    /// Memory blocks held.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The question's rows, once captured or set: `heads * d` values (the
    /// question vector), or `heads * r * d` with `question_rows = "tokens"`.
    pub fn question_vector(&self) -> Option<&[f32]> {
        self.question.as_deref()
    }

    /// Sets the question's rows, computed elsewhere (a probe pass with the
    /// same settings), so retrieval uses them from the first block on.
    pub fn set_question(&mut self, vector: Vec<f32>) {
        self.question = Some(vector);
        self.question_mass = None;
    }

    /// Bytes held: KV in the model's dtype plus f32 bookkeeping.
    pub fn bytes(&self) -> usize {
        let blocks = self.blocks.bytes();
        let f32s = self.local_score.capacity()
            + self.representatives.capacity()
            + self.question.as_ref().map_or(0, Vec::capacity);
        let question_mass = self.question_mass.as_ref().map_or(0, QuestionMass::bytes);
        self.init.bytes() + self.recent.bytes() + blocks + f32s * 4 + question_mass
    }

    /// Attention for one execution block of `e` new tokens at positions
    /// `processed..processed + e`: `q` is `(1, heads, e, d)`, `k` and `v` are
    /// `(1, kv_heads, e, d)`, pre-RoPE. Returns `(1, heads, e, d)` in `q`'s
    /// dtype and then files the tokens into the memory.
    pub fn attend(
        &mut self,
        config: &QllmConfig,
        args: &StepArgs<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let (_, heads, e, d) = q.dims4()?;
        let kv_heads = k.dim(1)?;
        if kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("qllm: {heads} query heads do not group over {kv_heads} KV heads");
        }
        let group = heads / kv_heads;
        let n_local = config.n_local;
        let p0 = self.processed;
        let end = p0 + e;
        self.recent.append(k, v)?;
        self.local_score
            .resize(self.local_score.len() + e * heads, 0.0);
        self.processed = end;

        let device = q.device();
        let at_global = positions(std::iter::repeat_n(n_local - 1, e), device)?;
        let q_global = rotate_f32(args.rope, q, &at_global)?;

        self.retrieve(config, &q_global, group)?;
        let retrieved = std::mem::take(&mut self.last_picks);

        // Keys in the window of some query of this block.
        let local_start = self.recent_start.max((p0 + 1).saturating_sub(n_local));
        let local_len = end - local_start;
        let (k_local, v_local) = self
            .recent
            .range(local_start - self.recent_start, local_len)?;

        // Keys past the window of some query: sinks, retrieved blocks and the
        // oldest recent tokens, in that (the original) order.
        let global_recent_end = self.recent_start.max(end.saturating_sub(n_local));
        let global_recent = global_recent_end - self.recent_start;
        // Gathered in f32: blocks may be stored in another dtype than the
        // model computes in.
        let mut global_k = Vec::new();
        let mut global_v = Vec::new();
        let mut gather = |k: &Tensor, v: &Tensor| -> Result<()> {
            global_k.push(k.to_dtype(DType::F32)?);
            global_v.push(v.to_dtype(DType::F32)?);
            Ok(())
        };
        if let Some((k, v)) = self.init.get()? {
            gather(&k, &v)?;
        }
        let per_head_count = retrieved.first().map_or(0, Vec::len);
        match retrieved.as_slice() {
            [shared] => {
                for &b in shared {
                    let (k, v) = self.blocks.get(b)?;
                    gather(&k, &v)?;
                }
            }
            per_head if per_head_count > 0 => {
                // Each KV head's own blocks, side by side along the head axis.
                let (mut heads_k, mut heads_v) = (Vec::new(), Vec::new());
                for (h, picks) in per_head.iter().enumerate() {
                    if picks.len() != per_head_count {
                        candle_core::bail!("qllm: KV heads retrieved unequal block counts");
                    }
                    let (mut ks, mut vs) = (Vec::new(), Vec::new());
                    for &b in picks {
                        let (k, v) = self.blocks.get(b)?;
                        ks.push(k.narrow(1, h, 1)?);
                        vs.push(v.narrow(1, h, 1)?);
                    }
                    heads_k.push(Tensor::cat(&ks, 2)?);
                    heads_v.push(Tensor::cat(&vs, 2)?);
                }
                gather(&Tensor::cat(&heads_k, 1)?, &Tensor::cat(&heads_v, 1)?)?;
            }
            _ => {}
        }
        if global_recent > 0 {
            let (k, v) = self.recent.range(0, global_recent)?;
            gather(&k, &v)?;
        }
        let n_global = self.init.len() + per_head_count * config.block_size + global_recent;
        self.last_picks = retrieved;

        // Positions. Fixed (the paper's): the window at `0..local_len`,
        // queries at their place in it; memory keys unrotated and queries at
        // `n_local - 1`, so every memory token sits at that distance.
        // Ordered: memory keys at `0..n_global`, the window right after them.
        let window_base = match config.positions {
            Positions::Fixed => 0,
            Positions::Ordered => n_global,
        };
        let k_local = rotate_f32(
            args.rope,
            &k_local,
            &positions(window_base..window_base + local_len, device)?,
        )?;
        let q_local = rotate_f32(
            args.rope,
            q,
            &positions(
                window_base + p0 - local_start..window_base + end - local_start,
                device,
            )?,
        )?;
        let q_memory = match config.positions {
            Positions::Fixed => &q_global,
            Positions::Ordered => &q_local,
        };

        let q_local = q_local.reshape((kv_heads, group * e, d))?;
        let k_local = k_local.squeeze(0)?;
        let local_scores = q_local.matmul(&k_local.t()?)?;
        let (scores, values) = if n_global > 0 {
            let mut k_global = Tensor::cat(&global_k, 2)?;
            if config.positions == Positions::Ordered {
                k_global = rotate_f32(args.rope, &k_global, &positions(0..n_global, device)?)?;
            }
            let k_global = k_global.squeeze(0)?;
            let q_memory = q_memory.reshape((kv_heads, group * e, d))?;
            let global_scores = q_memory.matmul(&k_global.t()?)?;
            global_v.push(v_local.to_dtype(DType::F32)?);
            (
                Tensor::cat(&[global_scores, local_scores], 2)?,
                Tensor::cat(&global_v, 2)?,
            )
        } else {
            (local_scores, v_local)
        };
        let cols = n_global + local_len;
        let mut scores = (scores * f64::from(args.softmax_scale))?;
        if e > 1 {
            let geometry = MaskGeometry {
                first_query: p0,
                queries: e,
                fixed: n_global - global_recent,
                global_recent_start: self.recent_start,
                global_recent,
                local_start,
                local_len,
                n_local,
            };
            let mask = args.masks.get(&geometry, device)?;
            scores = scores
                .reshape((kv_heads, group, e, cols))?
                .broadcast_add(&mask)?
                .reshape((kv_heads, group * e, cols))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let values = values.to_dtype(DType::F32)?.squeeze(0)?;
        let out = probs
            .matmul(&values)?
            .reshape((1, heads, e, d))?
            .to_dtype(q.dtype())?;

        // Attention received by each window token from this block's queries,
        // the measure a block's representative tokens are chosen by.
        let local_probs: Vec<Vec<f32>> = probs
            .narrow(2, n_global, local_len)?
            .contiguous()?
            .reshape((heads, e, local_len))?
            .sum(1)?
            .to_vec2()?;
        let first = (local_start - self.recent_start) * heads;
        for (h, row) in local_probs.iter().enumerate() {
            for (t, p) in row.iter().enumerate() {
                self.local_score[first + t * heads + h] += p;
            }
        }

        if config.mode.uses_question() && config.question_weight > 0.0 {
            if let Some(span) = &args.question {
                self.observe_question(config, span, p0, end, &q_global)?;
            }
        }
        self.evict(config, heads)?;
        Ok(out)
    }

    /// Picks the blocks for the execution block whose globally rotated
    /// queries are `q_global` (`(1, heads, e, d)` f32) into `last_picks`:
    /// one list for all heads (`shared` selection) or one per KV head
    /// (`per_kv_head`), all of the same length, each ascending.
    fn retrieve(&mut self, config: &QllmConfig, q_global: &Tensor, group: usize) -> Result<()> {
        self.last_retrieved.clear();
        self.last_scores.clear();
        self.last_picks.clear();
        if !config.mode.keeps_blocks() || self.blocks.is_empty() || config.topk == 0 {
            return Ok(());
        }
        let per_head = config.selection == Selection::PerKvHead;
        let (heads, d) = (q_global.dim(1)?, q_global.dim(3)?);
        let question = match (config.mode.uses_question(), &self.question) {
            (true, Some(question)) if config.question_weight > 0.0 => Some(question),
            _ => None,
        };
        let question_rows = question.map_or(1, |q| q.len() / (heads * d));
        #[allow(clippy::cast_precision_loss)] // a head size
        let scale = 1.0 / (d as f32).sqrt();
        if config.scoring == Scoring::AttentionMass {
            let q = q_global
                .mean(2)?
                .squeeze(0)?
                .reshape((heads / group, group, d))?;
            let mut scores = self.blocks.attention_mass_scores(&q, &[1.0], scale)?;
            if question.is_some() {
                self.add_question_mass(
                    config,
                    heads / group,
                    d,
                    scale,
                    question_rows,
                    &mut scores,
                )?;
            }
            self.last_scores = if per_head {
                scores
            } else {
                vec![sum_rows(&scores)]
            };
        } else {
            if question_rows != 1 {
                candle_core::bail!(
                    "qllm: {question_rows} question rows per head need `attention_mass` scoring"
                );
            }
            let mut query = q_global.mean(2)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(question) = question {
                for (q, x) in query.iter_mut().zip(question) {
                    *q += config.question_weight * x;
                }
            }
            self.last_scores = match config.scoring {
                // Per head, the softmax over blocks keeps the dot product's order.
                Scoring::Dot | Scoring::HeadSoftmax if per_head => {
                    kv_head_block_scores(&self.representatives, &query, d * group)
                }
                Scoring::Dot => vec![block_scores(&self.representatives, &query)],
                Scoring::HeadSoftmax => vec![head_softmax_block_scores(
                    &self.representatives,
                    &query,
                    d * group,
                    scale,
                )],
                Scoring::TokenMax => {
                    let q =
                        Tensor::from_slice(&query, (heads / group, group, d), q_global.device())?
                            .sum(1)?;
                    self.blocks.token_max_scores(&q, !per_head)?
                }
                Scoring::AttentionMass => unreachable!("handled above"),
            };
        }
        let picks: Vec<Vec<usize>> = self
            .last_scores
            .iter()
            .map(|scores| top_k_with_neighbours(scores, config.topk, config.neighbours))
            .collect();
        self.last_retrieved = picks.concat();
        self.last_retrieved.sort_unstable();
        self.last_retrieved.dedup();
        self.last_picks = picks;
        Ok(())
    }

    /// Adds the question rows' attention mass to `scores` (per KV head),
    /// `question_weight` shared by the `rows` rows of each query head.
    fn add_question_mass(
        &mut self,
        config: &QllmConfig,
        kv_heads: usize,
        d: usize,
        scale: f32,
        rows: usize,
        scores: &mut [Vec<f32>],
    ) -> Result<()> {
        let Some(question) = &self.question else {
            return Ok(());
        };
        if self.question_mass.is_none() {
            let device = self.blocks.slabs[0].0.device().clone();
            self.question_mass = Some(QuestionMass::new(question, kv_heads, d, &device)?);
        }
        let mass = self.question_mass.as_mut().expect("just set");
        mass.extend(&self.blocks, config.block_size, scale)?;
        #[allow(clippy::cast_precision_loss)] // at most `MAX_QUESTION_ROWS`
        let row_weight = config.question_weight / rows as f32;
        for (head, question) in scores.iter_mut().zip(mass.scores(row_weight, scale)?) {
            head.iter_mut().zip(question).for_each(|(s, q)| *s += q);
        }
        Ok(())
    }

    /// Collects the question's queries as they pass and, once the whole
    /// span has been read, turns them into the question vector.
    fn observe_question(
        &mut self,
        config: &QllmConfig,
        span: &Range<usize>,
        p0: usize,
        end: usize,
        q_global: &Tensor,
    ) -> Result<()> {
        if self.question.is_some() || span.end <= p0 || span.start >= end {
            return Ok(());
        }
        let from = span.start.max(p0);
        let to = span.end.min(end);
        self.question_queries
            .push(q_global.narrow(2, from - p0, to - from)?.squeeze(0)?);
        if span.end > end {
            return Ok(());
        }
        let queries = Tensor::cat(&self.question_queries, 1)?;
        self.question_queries.clear();
        let (heads, len, d) = queries.dims3()?;
        // The hook keeps spans within the local window, so every question
        // token is still in `recent`, with the attention it received so far.
        let first = span.start.checked_sub(self.recent_start).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "qllm: question span {span:?} starts before the recent tokens ({})",
                self.recent_start
            ))
        })?;
        let scores = &self.local_score[first * heads..(first + len) * heads];
        let queries = queries.flatten_all()?.to_vec1::<f32>()?;
        self.question = Some(match config.question_rows {
            QuestionRows::Mean => head_means(
                &most_attended_rows(&queries, 1, len, d, scores, heads, config.repr_topk),
                heads,
                d,
            ),
            QuestionRows::Tokens => {
                most_attended_rows(&queries, 1, len, d, scores, heads, MAX_QUESTION_ROWS)
            }
        });
        self.question_mass = None;
        Ok(())
    }

    /// Moves tokens that have left every future window out of `recent`:
    /// into the sinks until they are full, then into blocks (or nowhere, for
    /// `streaming`).
    fn evict(&mut self, config: &QllmConfig, heads: usize) -> Result<()> {
        let n_local = config.n_local;
        while self.init.len() < config.n_init && self.recent.len() > n_local {
            let n = (config.n_init - self.init.len()).min(self.recent.len() - n_local);
            let (k, v) = self.recent.range(0, n)?;
            self.init.append(&k, &v)?;
            self.drop_recent(n, heads);
        }
        let sinks_full = self.init.len() >= config.n_init;
        match config.mode {
            Mode::Qllm | Mode::Infllm => {
                while sinks_full && self.recent.len() >= n_local + config.block_size {
                    self.form_block(config, heads)?;
                }
            }
            Mode::Streaming => {
                // Keep exactly the next query's window minus itself.
                if sinks_full && self.recent.len() >= n_local {
                    let n = self.recent.len() + 1 - n_local;
                    self.dropped += n;
                    self.drop_recent(n, heads);
                }
            }
            Mode::Dense => candle_core::bail!("qllm: dense mode has no block memory"),
        }
        Ok(())
    }

    fn form_block(&mut self, config: &QllmConfig, heads: usize) -> Result<()> {
        let (bs, repr_topk) = (config.block_size, config.repr_topk);
        let (k, v) = self.recent.range(0, bs)?;
        let dtype = config.block_dtype.resolve(k.dtype());
        let (_, kv_heads, _, d) = k.dims4()?;
        let keys = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let scores = &self.local_score[..bs * heads];
        let representative = head_means(
            &most_attended_rows(&keys, heads / kv_heads, bs, d, scores, heads, repr_topk),
            heads,
            d,
        );
        self.representatives.extend_from_slice(&representative);
        self.blocks.push(&k.to_dtype(dtype)?, &v.to_dtype(dtype)?)?;
        self.drop_recent(bs, heads);
        Ok(())
    }

    fn drop_recent(&mut self, n: usize, heads: usize) {
        self.recent.drop_front(n);
        self.local_score.drain(..n * heads);
        self.recent_start += n;
    }
}

/// For every query head `h`, the rows of the `top` tokens that received the
/// most attention from head `h` (`scores`: `len` tokens x `heads`), most
/// attended first. `rows` is `(heads / group, len, d)`: head `h` reads row
/// group `h / group` (keys are shared by a group of query heads, queries are
/// not). Returns `(heads, min(top, len), d)` flattened.
fn most_attended_rows(
    rows: &[f32],
    group: usize,
    len: usize,
    d: usize,
    scores: &[f32],
    heads: usize,
    top: usize,
) -> Vec<f32> {
    let top = top.min(len);
    let mut out = Vec::with_capacity(heads * top * d);
    let mut order: Vec<usize> = (0..len).collect();
    for h in 0..heads {
        order.sort_by(|&a, &b| scores[b * heads + h].total_cmp(&scores[a * heads + h]));
        let base = (h / group) * len * d;
        for &t in &order[..top] {
            out.extend_from_slice(&rows[base + t * d..base + (t + 1) * d]);
        }
    }
    out
}

/// Per head, the mean of its rows: `rows` is `(heads, r, d)` flattened (as
/// [`most_attended_rows`] returns them); zeros where `r` is 0. Returns
/// `heads * d` values.
fn head_means(rows: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let per_head = rows.len() / (heads * d);
    if per_head == 0 {
        return vec![0f32; heads * d];
    }
    #[allow(clippy::cast_precision_loss)] // at most a block's tokens
    let inv = 1.0 / per_head as f32;
    rows.chunks_exact(per_head * d)
        .flat_map(|head| {
            let mut mean = vec![0f32; d];
            for row in head.chunks_exact(d) {
                mean.iter_mut().zip(row).for_each(|(m, x)| *m += x * inv);
            }
            mean
        })
        .collect()
}

/// Relevance of each block: the dot product of its representative (a row of
/// `representatives`) with `query`, i.e. summed over heads.
pub fn block_scores(representatives: &[f32], query: &[f32]) -> Vec<f32> {
    representatives
        .chunks_exact(query.len())
        .map(|row| dot(row, query))
        .collect()
}

/// Per KV head (a `width` slice of `heads * d`: its query heads together),
/// the dot product of each block's representative with `query`.
pub fn kv_head_block_scores(representatives: &[f32], query: &[f32], width: usize) -> Vec<Vec<f32>> {
    query
        .chunks_exact(width)
        .enumerate()
        .map(|(g, q)| {
            representatives
                .chunks_exact(query.len())
                .map(|row| dot(&row[g * width..(g + 1) * width], q))
                .collect()
        })
        .collect()
}

/// Element-wise sum of equally long rows.
fn sum_rows(rows: &[Vec<f32>]) -> Vec<f32> {
    let mut total = vec![0f32; rows.first().map_or(0, Vec::len)];
    for row in rows {
        total.iter_mut().zip(row).for_each(|(t, x)| *t += x);
    }
    total
}

/// Relevance of each block by TokenSelect's rule: per KV head (a `width`
/// slice of `heads * d`: its query heads together), the dot product of the
/// block's representative with `query`, times `scale`, softmax-normalised
/// over the blocks; then summed over KV heads.
pub fn head_softmax_block_scores(
    representatives: &[f32],
    query: &[f32],
    width: usize,
    scale: f32,
) -> Vec<f32> {
    let blocks = representatives.len() / query.len();
    let mut total = vec![0f32; blocks];
    let mut logits = vec![0f32; blocks];
    for (g, q) in query.chunks_exact(width).enumerate() {
        for (b, logit) in logits.iter_mut().enumerate() {
            let at = b * query.len() + g * width;
            *logit = dot(&representatives[at..at + width], q) * scale;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        for (t, l) in total.iter_mut().zip(&logits) {
            *t += (l - max).exp() / sum;
        }
    }
    total
}

/// Indices of the `k` highest scores, ascending (ties go to the older block).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    if k < order.len() {
        order.select_nth_unstable_by(k, |&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

/// `k` blocks: the best-scoring ones, each followed by its next
/// `neighbours` blocks (those that exist), in score order until `k` are
/// chosen; ascending. With `neighbours = 0`, [`top_k`].
pub fn top_k_with_neighbours(scores: &[f32], k: usize, neighbours: usize) -> Vec<usize> {
    if neighbours == 0 || k >= scores.len() {
        return top_k(scores, k);
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut chosen = std::collections::BTreeSet::new();
    for hit in order {
        for b in hit..=(hit + neighbours).min(scores.len() - 1) {
            if chosen.len() == k {
                return chosen.into_iter().collect();
            }
            chosen.insert(b);
        }
    }
    chosen.into_iter().collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums so the compiler can vectorise.
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Everything that shapes an execution block's mask. All layers of a step
/// share it, so the mask is built once per step and sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MaskGeometry {
    first_query: usize,
    queries: usize,
    /// Columns always visible: sinks and retrieved blocks.
    fixed: usize,
    global_recent_start: usize,
    global_recent: usize,
    local_start: usize,
    local_len: usize,
    n_local: usize,
}

impl MaskGeometry {
    /// `(queries, columns)`: 0 where query `i` sees the column, `-inf` where
    /// not. A recent token is seen globally once it is `n_local` or more
    /// tokens back, locally while it is fewer, and never from the future.
    fn build(&self, device: &Device) -> Result<Tensor> {
        let cols = self.fixed + self.global_recent + self.local_len;
        let mut mask = vec![0f32; self.queries * cols];
        for i in 0..self.queries {
            let pos = self.first_query + i;
            let row = &mut mask[i * cols..(i + 1) * cols];
            for (c, m) in row[self.fixed..self.fixed + self.global_recent]
                .iter_mut()
                .enumerate()
            {
                if pos - (self.global_recent_start + c) < self.n_local {
                    *m = f32::NEG_INFINITY;
                }
            }
            for (c, m) in row[self.fixed + self.global_recent..]
                .iter_mut()
                .enumerate()
            {
                let key = self.local_start + c;
                if key > pos || pos - key >= self.n_local {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(mask, (self.queries, cols), device)
    }
}

/// Masks of the current forward pass (one prompt chunk or decode step of
/// every sequence in it), one per geometry and device: the layers of a pass
/// share them, and layers may sit on different devices.
#[derive(Debug, Default)]
pub struct MaskCache(Mutex<HashMap<(MaskGeometry, DeviceLocation), Tensor>>);

impl MaskCache {
    fn get(&self, geometry: &MaskGeometry, device: &Device) -> Result<Tensor> {
        let mut masks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (*geometry, device.location());
        if let Some(mask) = masks.get(&key) {
            return Ok(mask.clone());
        }
        let mask = geometry.build(device)?;
        masks.insert(key, mask.clone());
        Ok(mask)
    }

    /// Forgets the masks of the previous pass.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Masks held.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no mask is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_the_highest_scores_in_block_order() {
        assert_eq!(top_k(&[0.1, 3.0, -2.0, 2.5, 2.5], 3), vec![1, 3, 4]);
        assert_eq!(top_k(&[0.1, 3.0], 5), vec![0, 1]);
        assert_eq!(top_k(&[1.0, 1.0, 1.0], 1), vec![0]);
        assert!(top_k(&[1.0], 0).is_empty());
    }

    #[test]
    fn neighbours_follow_their_hits_within_the_budget() {
        let scores = [0.0, 5.0, 0.1, 0.2, 4.0, 0.3];
        assert_eq!(top_k_with_neighbours(&scores, 4, 1), vec![1, 2, 4, 5]);
        // The budget runs out after the best hit and its neighbour.
        assert_eq!(top_k_with_neighbours(&scores, 2, 1), vec![1, 2]);
        assert_eq!(top_k_with_neighbours(&scores, 3, 1), vec![1, 2, 4]);
        // The last block has no successor; a neighbour already chosen is
        // not counted twice.
        assert_eq!(
            top_k_with_neighbours(&[1.0, 2.0, 3.0, 0.0], 3, 1),
            vec![1, 2, 3]
        );
        assert_eq!(top_k_with_neighbours(&scores, 2, 0), top_k(&scores, 2));
        assert_eq!(
            top_k_with_neighbours(&scores, 9, 1),
            (0..6).collect::<Vec<_>>()
        );
    }

    #[test]
    fn head_softmax_gives_every_kv_head_one_vote() {
        // Three KV heads of width 1, three blocks. Head 0 favours block 0 by
        // a wide margin; heads 1 and 2 favour block 2 by less. Summed dot
        // products follow head 0; normalised, each head has one vote.
        let representatives = [10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0];
        let query = [1.0, 1.0, 1.0];
        assert_eq!(top_k(&block_scores(&representatives, &query), 1), vec![0]);
        let scores = head_softmax_block_scores(&representatives, &query, 1, 1.0);
        assert!(
            (scores.iter().sum::<f32>() - 3.0).abs() < 1e-5,
            "{scores:?}"
        );
        assert_eq!(top_k(&scores, 1), vec![2]);
        // Written out for block 1.
        let e = |x: f32| x.exp();
        let expected = 1.0 / (e(10.0) + 2.0) + 2.0 / (2.0 + e(3.0));
        assert!((scores[1] - expected).abs() < 1e-6, "{scores:?}");
    }

    #[test]
    fn token_max_scores_take_each_blocks_best_token() {
        // 20 blocks of 3 tokens (two slabs), 2 KV heads of size 4.
        let (blocks, bs, kv_heads, d) = (20, 3, 2, 4);
        let keys = random((1, kv_heads, blocks * bs, d), 5, 1.0);
        let mut store = BlockStore::default();
        for b in 0..blocks {
            let k = keys.narrow(2, b * bs, bs).unwrap();
            store.push(&k, &k).unwrap();
        }
        let q = random((1, 1, kv_heads, d), 6, 1.0)
            .reshape((kv_heads, d))
            .unwrap();
        let summed = store.token_max_scores(&q, true).unwrap();
        let per_head = store.token_max_scores(&q, false).unwrap();
        let k = keys.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        let q = q.to_vec2::<f32>().unwrap();
        let best = |b: usize, score: &dyn Fn(usize) -> f32| {
            (b * bs..(b + 1) * bs)
                .map(score)
                .fold(f32::NEG_INFINITY, f32::max)
        };
        let expected_summed: Vec<f32> = (0..blocks)
            .map(|b| best(b, &|t| (0..kv_heads).map(|g| dot(&q[g], &k[g][t])).sum()))
            .collect();
        assert_eq!((summed.len(), summed[0].len()), (1, blocks));
        assert_close(&summed[0], &expected_summed, 1e-5);
        assert_eq!(per_head.len(), kv_heads);
        for (g, row) in per_head.iter().enumerate() {
            let expected: Vec<f32> = (0..blocks)
                .map(|b| best(b, &|t| dot(&q[g], &k[g][t])))
                .collect();
            assert_close(row, &expected, 1e-5);
        }
    }

    fn assert_close(got: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(got.len(), expected.len());
        for (a, b) in got.iter().zip(expected) {
            assert!((a - b).abs() < tolerance, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn attention_mass_is_each_rows_softmax_over_all_keys_summed_per_block() {
        // 20 blocks of 3 tokens (two slabs), 2 KV heads of size 4, 4 query
        // rows per KV head alternating between two weights.
        let (blocks, bs, kv_heads, d, m) = (20, 3, 2, 4, 4);
        let keys = random((1, kv_heads, blocks * bs, d), 7, 1.0);
        let mut store = BlockStore::default();
        for b in 0..blocks {
            let k = keys.narrow(2, b * bs, bs).unwrap();
            store.push(&k, &k).unwrap();
        }
        let q = random((1, kv_heads, m, d), 8, 2.0).squeeze(0).unwrap();
        let (weights, scale) = ([1.0, 3.0], 0.5);
        let got = store.attention_mass_scores(&q, &weights, scale).unwrap();
        let k = keys.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        let q = q.to_vec3::<f32>().unwrap();
        assert_eq!(got.len(), kv_heads);
        for g in 0..kv_heads {
            let mut expected = vec![0f32; blocks];
            for r in 0..m {
                let logits: Vec<f32> = (0..blocks * bs)
                    .map(|t| dot(&q[g][r], &k[g][t]) * scale)
                    .collect();
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
                for (t, l) in logits.iter().enumerate() {
                    expected[t / bs] += weights[r % 2] * (l - max).exp() / sum;
                }
            }
            assert_close(&got[g], &expected, 1e-5);
            // Each row spends its weight once: 2 rows of weight 1, 2 of 3.
            let total: f32 = got[g].iter().sum();
            assert!((total - 8.0).abs() < 1e-4, "{total}");
        }
    }

    #[test]
    fn question_mass_partials_combine_into_the_softmax_over_all_blocks() {
        // 20 blocks of 3 tokens over two slabs, covered in steps (7, then 13
        // more across the slab boundary), against the one-pass softmax.
        let (blocks, bs, kv_heads, d, rows) = (20, 3, 2, 4, 6);
        let keys = random((1, kv_heads, blocks * bs, d), 9, 1.5);
        let question = random((1, kv_heads, rows, d), 10, 2.0).squeeze(0).unwrap();
        let flat = question.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (weight, scale) = (0.25, 0.5);
        let mut store = BlockStore::default();
        let mut mass = QuestionMass::new(&flat, kv_heads, d, &Device::Cpu).unwrap();
        // The third step adds no block: nothing changes.
        for (from, to) in [(0, 7), (7, blocks), (blocks, blocks)] {
            for b in from..to {
                let k = keys.narrow(2, b * bs, bs).unwrap();
                store.push(&k, &k).unwrap();
            }
            mass.extend(&store, bs, scale).unwrap();
            let got = mass.scores(weight, scale).unwrap();
            let expected = store
                .attention_mass_scores(&question, &[weight], scale)
                .unwrap();
            assert_eq!(got.len(), kv_heads);
            for (g, e) in got.iter().zip(&expected) {
                assert_eq!(g.len(), to);
                assert_close(g, e, 1e-5);
            }
        }
    }

    #[test]
    fn question_token_rows_add_their_attention_mass_and_find_their_block() {
        // Memory of 25 blocks; one question row per head points at a key of
        // block 9, the others are random: retrieval must equal the written-out
        // mass of all rows (the execution block's mean query with weight 1,
        // each question row with `question_weight / rows`) and rank block 9
        // first for every KV head.
        let (heads, kv_heads, d, rows) = (4, 2, 16, 3);
        let config = QllmConfig {
            scoring: Scoring::AttentionMass,
            selection: Selection::PerKvHead,
            question_rows: QuestionRows::Tokens,
            question_weight: 3.0,
            ..selective_config(Positions::Fixed, 0)
        };
        config.validate().unwrap();
        let rope = RotaryEmbedding::new(10000.0, d, 256, &Device::Cpu, true, DType::F32).unwrap();
        let masks = MaskCache::default();
        let args = StepArgs {
            rope: &rope,
            softmax_scale: 0.25,
            question: None,
            masks: &masks,
        };
        let (total, planted, bs) = (120, 9, config.block_size);
        let token = config.n_init + planted * bs + 1;
        let q_all = random((1, heads, total, d), 11, 1.0);
        // The planted token's key stands out: four times the others' size.
        let k_all = random((1, kv_heads, total, d), 12, 1.0);
        let k_all = Tensor::cat(
            &[
                k_all.narrow(2, 0, token).unwrap(),
                (k_all.narrow(2, token, 1).unwrap() * 4.0).unwrap(),
                k_all.narrow(2, token + 1, total - token - 1).unwrap(),
            ],
            2,
        )
        .unwrap();
        let v_all = random((1, kv_heads, total, d), 13, 1.0);
        let mut memory = LayerMemory::default();
        for p0 in (0..total).step_by(8) {
            let at = |t: &Tensor| t.narrow(2, p0, 8).unwrap();
            memory
                .attend(&config, &args, &at(&q_all), &at(&k_all), &at(&v_all))
                .unwrap();
            masks.clear();
        }
        let blocks = memory.block_count();
        assert!(blocks > 20, "{blocks}");
        let mut question = random((1, heads, rows, d), 14, 1.0);
        let key =
            |g: usize| (k_all.narrow(1, g, 1).unwrap().narrow(2, token, 1).unwrap() * 2.0).unwrap();
        let planted_rows: Vec<Tensor> = (0..heads).map(|h| key(h / (heads / kv_heads))).collect();
        let planted_rows = Tensor::cat(&planted_rows, 1).unwrap();
        question =
            Tensor::cat(&[planted_rows, question.narrow(2, 1, rows - 1).unwrap()], 2).unwrap();
        memory.set_question(question.flatten_all().unwrap().to_vec1::<f32>().unwrap());

        let q_global = random((1, heads, 8, d), 15, 1.0);
        memory
            .retrieve(&config, &q_global, heads / kv_heads)
            .unwrap();

        let group = heads / kv_heads;
        let mean = q_global
            .mean(2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let all_rows = Tensor::cat(&[mean, question.squeeze(0).unwrap()], 1)
            .unwrap()
            .reshape((kv_heads, group * (rows + 1), d))
            .unwrap();
        let mut weights = vec![1.0];
        weights.extend([config.question_weight / 3.0; 3]);
        let scale = 0.25; // 1 / sqrt(d)
        let expected = memory
            .blocks
            .attention_mass_scores(&all_rows, &weights, scale)
            .unwrap();
        assert_eq!(memory.last_scores.len(), kv_heads);
        for (g, (got, e)) in memory.last_scores.iter().zip(&expected).enumerate() {
            assert_close(got, e, 1e-4);
            assert_eq!(top_k(got, 1), vec![planted], "KV head {g}: {got:?}");
            assert!(memory.last_picks[g].contains(&planted));
        }
    }

    #[test]
    fn block_scores_sum_over_heads() {
        let representatives = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0];
        assert_eq!(
            block_scores(&representatives, &[3.0, 4.0]),
            vec![3.0, 4.0, 14.0]
        );
        let long: Vec<f32> = (0u8..37).map(f32::from).collect();
        let expected: f32 = long.iter().map(|x| x * x).sum();
        assert_eq!(block_scores(&long, &long), vec![expected]);
    }

    #[test]
    fn representatives_average_the_most_attended_tokens_per_head() {
        // 2 query heads sharing 1 key head, 3 tokens of dim 2.
        let keys = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0];
        // Head 0 attended tokens 0 and 2 most, head 1 tokens 1 and 2.
        let scores = [0.9, 0.1, 0.2, 0.8, 0.5, 0.5];
        let repr = head_means(&most_attended_rows(&keys, 2, 3, 2, &scores, 2, 2), 2, 2);
        assert_eq!(repr, vec![3.0, 2.5, 2.5, 3.0]);
    }

    /// Q-LLM's attention for one execution block, written out from the
    /// method's definition given the blocks retrieved (`retrieved`: one list
    /// for every head, or one per KV head; out of `blocks` formed, `init`
    /// sinks held): query `pos` of KV head `g` sees key `j <= pos` exactly
    /// when `pos - j < n_local` (the window, at window positions), or `j` is
    /// a sink, in a block `g` retrieved, or not yet in any block. Memory
    /// keys sit at distance `n_local - 1` (`Fixed`) or at their rank among
    /// the execution block's memory keys of `g` (`Ordered`), with the window
    /// right after them.
    #[allow(clippy::too_many_arguments)]
    fn reference_attention(
        config: &QllmConfig,
        rope: &RotaryEmbedding,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        p0: usize,
        init: usize,
        blocks: usize,
        retrieved: &[Vec<usize>],
        softmax_scale: f32,
    ) -> Vec<f32> {
        let (_, heads, e, d) = q.dims4().unwrap();
        let kv_heads = keys.dim(1).unwrap();
        let group = heads / kv_heads;
        let end = p0 + e;
        let (n_local, bs) = (config.n_local, config.block_size);
        let recent_start = init + blocks * bs;
        let picks_of = |g: usize| -> &[usize] {
            match retrieved {
                [] => &[],
                [shared] => shared,
                per_head => &per_head[g],
            }
        };
        let in_memory = |g: usize, j: usize| {
            j < init || j >= recent_start || picks_of(g).contains(&((j - init) / bs))
        };
        // Each KV head's memory keys: older than every query's window.
        let memory: Vec<Vec<usize>> = (0..kv_heads)
            .map(|g| {
                (0..end.saturating_sub(n_local))
                    .filter(|&j| in_memory(g, j))
                    .collect()
            })
            .collect();
        let local_start = recent_start.max((p0 + 1).saturating_sub(n_local));
        let base = match config.positions {
            Positions::Fixed => 0,
            Positions::Ordered => memory[0].len(),
        };
        let rows = |t: &Tensor| -> Vec<Vec<Vec<f32>>> {
            t.squeeze(0)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec3()
                .unwrap()
        };
        let at = |p: Vec<usize>| positions(p.into_iter(), &Device::Cpu).unwrap();
        let n = keys.dim(2).unwrap();
        let raw = rows(keys);
        let vals = rows(values);
        let key_at = |p: Vec<usize>| rows(&rotate_f32(rope, keys, &at(p)).unwrap());
        // Window keys at window positions, memory keys at their rank.
        let k_window = key_at(
            (0..n)
                .map(|j| base + j.saturating_sub(local_start))
                .collect(),
        );
        let k_ranked: Vec<Vec<Vec<f32>>> = (0..kv_heads)
            .map(|g| {
                key_at(
                    (0..n)
                        .map(|j| memory[g].iter().position(|&m| m == j).unwrap_or(0))
                        .collect(),
                )
                .swap_remove(g)
            })
            .collect();
        let q_window = rows(
            &rotate_f32(
                rope,
                q,
                &at((p0..end).map(|p| base + p - local_start).collect()),
            )
            .unwrap(),
        );
        let q_far = rows(&rotate_f32(rope, q, &at(vec![n_local - 1; e])).unwrap());
        let mut out = vec![0f32; heads * e * d];
        for h in 0..heads {
            let g = h / group;
            for i in 0..e {
                let pos = p0 + i;
                let mut seen = Vec::new();
                for j in 0..=pos {
                    let score = if pos - j < n_local {
                        dot(&q_window[h][i], &k_window[g][j])
                    } else if in_memory(g, j) {
                        match config.positions {
                            Positions::Fixed => dot(&q_far[h][i], &raw[g][j]),
                            Positions::Ordered => dot(&q_window[h][i], &k_ranked[g][j]),
                        }
                    } else {
                        continue;
                    };
                    seen.push((j, score * softmax_scale));
                }
                let max = seen.iter().fold(f32::MIN, |m, &(_, s)| m.max(s));
                let total: f32 = seen.iter().map(|(_, s)| (s - max).exp()).sum();
                let row = &mut out[(h * e + i) * d..(h * e + i + 1) * d];
                for &(j, s) in &seen {
                    let w = (s - max).exp() / total;
                    for (o, x) in row.iter_mut().zip(&vals[g][j]) {
                        *o += w * x;
                    }
                }
            }
        }
        out
    }

    fn random(shape: (usize, usize, usize, usize), seed: u64, scale: f64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                #[allow(clippy::cast_precision_loss)]
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                u * 2.0 - 1.0
            })
            .collect();
        (Tensor::from_vec(data, shape, &Device::Cpu).unwrap() * scale).unwrap()
    }

    /// Runs 120 prompt tokens in execution blocks of 8, then 12 decode
    /// steps, through `LayerMemory` and the written-out reference, with
    /// `topk` 2 of up to 23 blocks; returns the largest difference and
    /// whether retrieval was selective and whether KV heads ever retrieved
    /// different blocks.
    fn compare_with_reference(config: &QllmConfig) -> (f32, bool, bool) {
        let (heads, kv_heads, d) = (4, 2, 16);
        let rope = RotaryEmbedding::new(10000.0, d, 256, &Device::Cpu, true, DType::F32).unwrap();
        let masks = MaskCache::default();
        let args = StepArgs {
            rope: &rope,
            softmax_scale: 0.25,
            question: None,
            masks: &masks,
        };
        let total = 132;
        // Peaky queries and keys so retrieval has clear winners.
        let q_all = random((1, heads, total, d), 1, 2.0);
        let k_all = random((1, kv_heads, total, d), 2, 2.0);
        let v_all = random((1, kv_heads, total, d), 3, 1.0);
        let mut memory = LayerMemory::default();
        let (mut worst, mut selective, mut heads_differ) = (0f32, false, false);
        let mut p0 = 0;
        while p0 < total {
            let e = if p0 < 120 { 8 } else { 1 };
            let (init, blocks) = (memory.stats().init, memory.block_count());
            let q = q_all.narrow(2, p0, e).unwrap();
            let out = memory
                .attend(
                    config,
                    &args,
                    &q,
                    &k_all.narrow(2, p0, e).unwrap(),
                    &v_all.narrow(2, p0, e).unwrap(),
                )
                .unwrap();
            let retrieved = memory.last_picks.clone();
            selective |= retrieved
                .first()
                .is_some_and(|p| blocks > p.len() && !p.is_empty());
            heads_differ |= retrieved.windows(2).any(|w| w[0] != w[1]);
            let expected = reference_attention(
                config,
                &rope,
                &q,
                &k_all.narrow(2, 0, p0 + e).unwrap(),
                &v_all.narrow(2, 0, p0 + e).unwrap(),
                p0,
                init,
                blocks,
                &retrieved,
                args.softmax_scale,
            );
            let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&expected) {
                worst = worst.max((a - b).abs());
            }
            masks.clear();
            p0 += e;
        }
        (worst, selective, heads_differ)
    }

    fn selective_config(positions: Positions, neighbours: usize) -> QllmConfig {
        QllmConfig {
            n_init: 4,
            n_local: 16,
            block_size: 4,
            exc_block_size: 8,
            topk: 2,
            repr_topk: 2,
            positions,
            neighbours,
            ..QllmConfig::default()
        }
    }

    #[test]
    fn selective_retrieval_matches_the_written_out_reference() {
        use Selection::{PerKvHead, Shared};
        for (positions, neighbours, scoring, selection) in [
            (Positions::Fixed, 0, Scoring::Dot, Shared),
            (Positions::Ordered, 0, Scoring::Dot, Shared),
            (Positions::Fixed, 1, Scoring::Dot, Shared),
            (Positions::Ordered, 1, Scoring::HeadSoftmax, Shared),
            (Positions::Fixed, 0, Scoring::TokenMax, Shared),
            (Positions::Fixed, 0, Scoring::AttentionMass, Shared),
            (Positions::Fixed, 0, Scoring::Dot, PerKvHead),
            (Positions::Ordered, 1, Scoring::AttentionMass, PerKvHead),
            (Positions::Fixed, 0, Scoring::TokenMax, PerKvHead),
        ] {
            let config = QllmConfig {
                scoring,
                selection,
                ..selective_config(positions, neighbours)
            };
            let name = format!("{positions} {neighbours} {scoring} {selection}");
            let (diff, selective, heads_differ) = compare_with_reference(&config);
            assert!(selective, "{name}: every block was retrieved");
            // Otherwise the per-head gather would go untested.
            assert_eq!(
                heads_differ,
                selection == PerKvHead,
                "{name}: KV heads retrieved different blocks"
            );
            assert!(diff <= 1e-4, "{name}: max abs difference {diff}");
        }
    }

    #[test]
    fn ordered_positions_change_what_memory_tokens_contribute() {
        // The reference would pass for both position schemes if they gave the
        // same numbers; they must not.
        let fixed = selective_config(Positions::Fixed, 0);
        let ordered = selective_config(Positions::Ordered, 0);
        let rope = RotaryEmbedding::new(10000.0, 16, 256, &Device::Cpu, true, DType::F32).unwrap();
        let q = random((1, 4, 8, 16), 1, 2.0);
        let k = random((1, 2, 40, 16), 2, 2.0);
        let v = random((1, 2, 40, 16), 3, 1.0);
        let a = reference_attention(&fixed, &rope, &q, &k, &v, 32, 4, 2, &[vec![0]], 0.25);
        let b = reference_attention(&ordered, &rope, &q, &k, &v, 32, 4, 2, &[vec![0]], 0.25);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff > 1e-3, "{diff}");
    }
}

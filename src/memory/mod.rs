//! Q-LLM's per-layer context memory.
//!
//! One [`LayerMemory`] holds one layer of one sequence, composed of:
//! - a [`Ledger`]: where every token is (sinks, blocks, recent), plain
//!   counts whose invariants are property-tested;
//! - the tensors: the sinks and the recent tokens ([`KvBuffer`]s), the
//!   memory blocks ([`BlockStore`]), and the local attention each recent
//!   token has received (per query head);
//! - the [`Retrieval`] state: representatives, question, latest picks.
//!
//! Keys are stored pre-RoPE. A query attends its last `n_local` tokens with
//! exact relative positions (rotated within the window, so positions stay
//! below `n_local + exc_block_size`) and, in the same softmax, the sinks,
//! the retrieved blocks and older not-yet-blocked tokens: with `positions =
//! fixed` (the paper's) all at one distance `n_local - 1` (the query is
//! rotated once to position `n_local - 1`, the keys stay unrotated); with
//! `ordered` at consecutive positions in document order, the window right
//! after them; with `interpolated` likewise, squeezed evenly into the
//! table's room where they would need more positions. Every past token is
//! attended at most once.
//! [`LayerMemory::append`] cuts a call into execution blocks.

pub mod block_store;
pub mod boundaries;
pub mod budget;
pub mod kv_buffer;
pub mod ledger;
pub mod window;

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{DType, Result, Tensor};

pub use block_store::{BlockStore, Half};
pub use boundaries::{block_advance, SENTENCE_END_TEXTS};
pub use budget::{sequence_bytes_bound, ModelShape};
pub use kv_buffer::KvBuffer;
pub use ledger::{Eviction, Ledger, ReadPlan};
pub use window::RotatedWindow;

use crate::attention::mask::MaskGeometry;
use crate::attention::{
    grouped_attention, positions, received, rotate_f32, rotate_f32_fractional, MaskCache, Rotary,
};
use crate::config::{Mode, Policy, Positions, Read};
use crate::retrieval::{LayerVotes, Retrieval};

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
    /// Tokens behind the memory blocks, each counted once (blocks overlap
    /// with sentence boundaries).
    pub blocked: usize,
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
    ledger: Ledger,
    init: KvBuffer,
    recent: KvBuffer,
    /// The window's keys, rotated once (`positions = "fixed"`).
    window: RotatedWindow,
    /// Local attention received by each recent token, `heads` per token.
    local_score: Vec<f32>,
    blocks: BlockStore,
    /// Position of each block's first token.
    block_starts: Vec<usize>,
    retrieval: Retrieval,
}

/// Per-step inputs shared by all layers.
pub struct StepArgs<'a> {
    /// The model's rotary embedding.
    pub rope: &'a dyn Rotary,
    /// Scale of `q k^T`.
    pub softmax_scale: f32,
    /// Token span of the question within the sequence, if known.
    pub question: Option<Range<usize>>,
    /// Length of the prompt, once known (0 otherwise): its last token gets
    /// an execution block of its own, as the reference feeds it alone.
    pub prompt_len: usize,
    /// Masks shared by the layers of a step.
    pub masks: &'a MaskCache,
    /// The layer this memory is, and the sequence's cross-layer votes
    /// (`consensus`; `None` when the layer runs alone).
    pub votes: Option<(usize, &'a RefCell<LayerVotes>)>,
    /// Whether each token of the sequence ends a sentence, as far as known
    /// (`sentence` boundaries; later tokens count as not).
    pub sentence_ends: &'a [bool],
}

/// What one execution block read and retrieved, for instruments.
#[derive(Debug, Clone, Copy)]
pub struct BlockRead<'a> {
    /// Positions of its queries.
    pub positions: &'a Range<usize>,
    /// Blocks some head retrieved, ascending.
    pub retrieved: &'a [usize],
    /// Every block's retrieval score, per list (one, or one per KV head).
    pub scores: &'a [Vec<f32>],
    /// Blocks that existed when it was read.
    pub blocks: usize,
    /// Position of each of those blocks' first token (a block holds
    /// `block_size` tokens).
    pub block_starts: &'a [usize],
    /// Position of the oldest token not yet behind a block.
    pub recent_start: usize,
}

impl LayerMemory {
    /// Tokens processed so far.
    pub fn processed(&self) -> usize {
        self.ledger.processed()
    }

    /// What the memory holds.
    pub fn stats(&self) -> LayerStats {
        LayerStats {
            processed: self.ledger.processed(),
            init: self.init.len(),
            recent: self.recent.len(),
            blocks: self.blocks.len(),
            blocked: self.ledger.blocked(),
            block_bytes: self.blocks.bytes(),
            dropped: self.ledger.dropped(),
            last_retrieved: self.retrieval.retrieved().to_vec(),
            has_question: self.retrieval.question_rows().is_some(),
        }
    }

    /// Block indices retrieved for the latest execution block, ascending;
    /// with `per_kv_head` selection, those some KV head retrieved.
    pub fn last_retrieved(&self) -> &[usize] {
        self.retrieval.retrieved()
    }

    /// Retrieval score of every block at the latest execution block: one
    /// row, or one per KV head with `per_kv_head` selection (empty when
    /// nothing was retrieved).
    pub fn last_scores(&self) -> &[Vec<f32>] {
        self.retrieval.scores()
    }

    /// Memory blocks held.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Position of each block's first token.
    pub fn block_starts(&self) -> &[usize] {
        &self.block_starts
    }

    /// Position of the oldest token not yet behind a block (or a sink).
    pub fn recent_start(&self) -> usize {
        self.ledger.recent_start()
    }

    /// The question's rows, once captured or set: `heads * d` values (the
    /// question vector), or `heads * r * d` with `question_rows = "tokens"`.
    pub fn question_vector(&self) -> Option<&[f32]> {
        self.retrieval.question_rows()
    }

    /// Sets the question's rows, computed elsewhere (a probe pass with the
    /// same settings), so retrieval uses them from the first block on.
    pub fn set_question(&mut self, vector: Vec<f32>) {
        self.retrieval.question.set(vector);
    }

    /// The same memory for a second owner, which goes on from where this
    /// one is: full block slabs are shared (blocks never change once
    /// formed), the rest is copied, so either owner's appends leave the
    /// other as it was.
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            ledger: self.ledger,
            init: self.init.fork()?,
            recent: self.recent.fork()?,
            // Rotated again on the next read.
            window: RotatedWindow::default(),
            local_score: self.local_score.clone(),
            blocks: self.blocks.fork()?,
            block_starts: self.block_starts.clone(),
            retrieval: self.retrieval.clone(),
        })
    }

    /// Forgets the question (its rows, the queries gathered for them and
    /// their cached scores), for a second owner that asks another one.
    pub fn forget_question(&mut self) {
        self.retrieval.question = Default::default();
    }

    /// Allocations shared with forks, by identity, with their bytes.
    pub fn shared_allocations(&self) -> impl Iterator<Item = (candle_core::TensorId, usize)> + '_ {
        self.blocks.shared_slabs()
    }

    /// Bytes held: KV in the model's dtype plus f32 bookkeeping.
    pub fn bytes(&self) -> usize {
        self.init.bytes()
            + self.recent.bytes()
            + self.window.bytes()
            + self.blocks.bytes()
            + self.local_score.capacity() * 4
            + self.block_starts.capacity() * std::mem::size_of::<usize>()
            + self.retrieval.bytes()
    }

    /// Attention for a call of `t` new tokens at positions `processed..`:
    /// `q` is `(1, heads, t, d)`, `k` and `v` are `(1, kv_heads, t, d)`,
    /// pre-RoPE. The call is cut into execution blocks at multiples of
    /// `exc_block_size` (and before the prompt's last token); `observe`
    /// sees what each one retrieved. Returns `(1, heads, t, d)` in `q`'s
    /// dtype.
    pub fn append(
        &mut self,
        policy: &Policy,
        args: &StepArgs<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mut observe: impl FnMut(BlockRead<'_>),
    ) -> Result<Tensor> {
        let len = q.dim(2)?;
        let offset = self.processed();
        let mut outputs = Vec::new();
        let mut start = 0;
        while start < len {
            let pos = offset + start;
            let mut stop = (pos / policy.exc_block_size + 1) * policy.exc_block_size;
            if args.prompt_len > 0 && pos < args.prompt_len - 1 {
                stop = stop.min(args.prompt_len - 1);
            }
            let n = stop.min(offset + len) - pos;
            let blocks = self.blocks.len();
            let recent_start = self.ledger.recent_start();
            outputs.push(self.read_block(
                policy,
                args,
                &q.narrow(2, start, n)?,
                &k.narrow(2, start, n)?,
                &v.narrow(2, start, n)?,
            )?);
            observe(BlockRead {
                positions: &(pos..pos + n),
                retrieved: self.retrieval.retrieved(),
                scores: self.retrieval.scores(),
                blocks,
                block_starts: &self.block_starts[..blocks],
                recent_start,
            });
            start += n;
        }
        if outputs.len() == 1 {
            return Ok(outputs.pop().expect("one output"));
        }
        Tensor::cat(&outputs, 2)
    }

    /// Attention for one execution block of `e` new tokens, then files the
    /// tokens into the memory.
    fn read_block(
        &mut self,
        policy: &Policy,
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
        let n_local = policy.n_local;
        let recent_start = self.ledger.recent_start();
        let plan = self.ledger.read(e, n_local);
        self.recent.append(k, v)?;
        self.local_score
            .resize(self.local_score.len() + e * heads, 0.0);

        let device = q.device();
        let at_global = positions(std::iter::repeat_n(n_local - 1, e), device)?;
        let q_global = rotate_f32(args.rope, q, &at_global)?;

        let votes = args.votes.filter(|_| policy.consensus > 0);
        let voted = votes.map_or_else(Vec::new, |(layer, votes)| {
            votes
                .borrow()
                .ranking(layer, plan.queries.start, self.blocks.len())
        });
        // The execution blocks whose queries read the question or give the
        // answer's first token may retrieve more (`question_topk`), and so
        // may decode steps (`answer_topk`).
        let queries = &plan.queries;
        let read = if args.prompt_len == 0 {
            Read::Prompt
        } else if queries.start >= args.prompt_len {
            Read::Answer
        } else if queries.contains(&(args.prompt_len - 1))
            || args
                .question
                .as_ref()
                .is_some_and(|q| q.start < queries.end && queries.start < q.end)
        {
            Read::Question
        } else {
            Read::Prompt
        };
        self.retrieval
            .retrieve(policy, &self.blocks, &q_global, (group, read), &voted)?;
        if let Some((layer, votes)) = votes {
            votes
                .borrow_mut()
                .record(layer, plan.queries.start, self.retrieval.own_picks());
        }
        let retrieved = self.retrieval.picks();

        let local_len = plan.local.len();
        let (k_local, v_local) = self
            .recent
            .range(plan.local.start - recent_start, local_len)?;

        // Keys past the window of some query: sinks, retrieved blocks and the
        // oldest recent tokens, in that (the original) order, gathered in
        // f32 (blocks may be stored in another dtype than the model computes
        // in) in one pass; the values then go on with the window's.
        let global_recent = plan.global_recent.len();
        let init = self.init.get()?;
        let older = if global_recent > 0 {
            Some(self.recent.range(0, global_recent)?)
        } else {
            None
        };
        let per_head_count = retrieved.first().map_or(0, Vec::len);
        let n_global = self.init.len() + per_head_count * policy.block_size + global_recent;

        // Positions (`window_base`: where the window's first key sits).
        // Fixed (the paper's): window token `t` at `t - base`, kept rotated
        // from one decode step to the next (`RotatedWindow`; only distances
        // matter there), queries at their place in it; memory keys unrotated
        // and queries at `n_local - 1`, so every memory token sits at that
        // distance. Ordered: memory keys at `0..n_global`, the window right
        // after them. Interpolated: the same, or, where the table leaves less
        // room beside the window, memory keys evenly over `0..room`.
        let room = args.rope.max_positions().saturating_sub(local_len);
        let squeeze = policy.positions == Positions::Interpolated && n_global > room;
        let (k_local, window_base) = match policy.positions {
            Positions::Fixed => {
                let (keys, base) = self.window.keys(
                    args.rope,
                    &k_local,
                    plan.local.clone(),
                    e,
                    policy.positions_needed(),
                )?;
                (keys, plan.local.start - base)
            }
            Positions::Ordered | Positions::Interpolated => {
                let base = if squeeze { room } else { n_global };
                let at = positions(base..base + local_len, device)?;
                (rotate_f32(args.rope, &k_local, &at)?, base)
            }
        };
        let k_local = k_local.squeeze(0)?;
        let query_at = plan.queries.start - plan.local.start;
        let q_local = rotate_f32(
            args.rope,
            q,
            &positions(window_base + query_at..window_base + query_at + e, device)?,
        )?;
        let q_memory = match policy.positions {
            Positions::Fixed => &q_global,
            Positions::Ordered | Positions::Interpolated => &q_local,
        }
        .reshape((kv_heads, group * e, d))?;
        let q_local = q_local.reshape((kv_heads, group * e, d))?;

        let mask = if e > 1 {
            let geometry = MaskGeometry {
                first_query: plan.queries.start,
                queries: e,
                fixed: n_global - global_recent,
                global_recent_start: recent_start,
                global_recent,
                local_start: plan.local.start,
                local_len,
                n_local,
            };
            Some(args.masks.get(&geometry, device)?)
        } else {
            None
        };
        let (k_global, values) = if n_global > 0 {
            let keys_before: Vec<&Tensor> = init.iter().map(|(k, _)| k).collect();
            let values_before: Vec<&Tensor> = init.iter().map(|(_, v)| v).collect();
            let keys_after: Vec<&Tensor> = older.iter().map(|(k, _)| k).collect();
            let values_after: Vec<&Tensor> =
                older.iter().map(|(_, v)| v).chain([&v_local]).collect();
            let mut k_global =
                self.blocks
                    .gather_around(retrieved, Half::Keys, &keys_before, &keys_after)?;
            let values = self.blocks.gather_around(
                retrieved,
                Half::Values,
                &values_before,
                &values_after,
            )?;
            if squeeze {
                #[allow(clippy::cast_precision_loss)] // positions of a RoPE table
                let step = room as f32 / n_global as f32;
                #[allow(clippy::cast_precision_loss)]
                let at: Vec<f32> = (0..n_global).map(|i| i as f32 * step).collect();
                k_global = rotate_f32_fractional(args.rope, &k_global, &at)?;
            } else if policy.positions != Positions::Fixed {
                k_global = rotate_f32(args.rope, &k_global, &positions(0..n_global, device)?)?;
            }
            (Some(k_global.squeeze(0)?), values)
        } else {
            (None, v_local.to_dtype(DType::F32)?)
        };
        // Memory keys first, then the window: the mask's column order.
        let mut parts = Vec::with_capacity(2);
        if let Some(k_global) = &k_global {
            parts.push((&q_memory, k_global));
        }
        parts.push((&q_local, &k_local));
        let (out, probs) = grouped_attention(
            &parts,
            &values.squeeze(0)?,
            mask.as_ref(),
            args.softmax_scale,
        )?;
        let out = out.reshape((1, heads, e, d))?.to_dtype(q.dtype())?;

        // Attention received by each window token from this block's queries,
        // the measure a block's representative tokens are chosen by.
        let local_probs = received(&probs, e, n_global..n_global + local_len)?;
        let first = (plan.local.start - recent_start) * heads;
        for (h, row) in local_probs.iter().enumerate() {
            for (t, p) in row.iter().enumerate() {
                self.local_score[first + t * heads + h] += p;
            }
        }

        if policy.mode.uses_question() && policy.question_weight > 0.0 {
            if let Some(span) = &args.question {
                let local_score = &self.local_score;
                // The hook keeps spans within the local window, so every
                // question token is still recent, with the attention it
                // received so far.
                let received = |span: Range<usize>| -> Result<Vec<f32>> {
                    let first = span.start.checked_sub(recent_start).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "qllm: question span {span:?} starts before the recent tokens \
                             ({recent_start})"
                        ))
                    })?;
                    Ok(local_score[first * heads..(first + span.len()) * heads].to_vec())
                };
                self.retrieval.question.observe(
                    policy,
                    span,
                    plan.queries.clone(),
                    &q_global,
                    received,
                )?;
            }
        }
        self.evict(policy, heads, args.sentence_ends)?;
        Ok(out)
    }

    /// Moves tokens that have left every future window out of the recent
    /// ones, as the ledger plans: into the sinks until they are full, then
    /// into blocks (or nowhere, for `streaming`).
    fn evict(&mut self, policy: &Policy, heads: usize, sentence_ends: &[bool]) -> Result<()> {
        if policy.mode == Mode::Dense {
            candle_core::bail!("qllm: dense mode has no block memory");
        }
        let plan = self
            .ledger
            .plan_eviction(policy, |start| block_advance(policy, sentence_ends, start));
        if plan.to_sinks > 0 {
            let (k, v) = self.recent.range(0, plan.to_sinks)?;
            self.init.append(&k, &v)?;
            self.drop_recent(plan.to_sinks, heads);
        }
        let mut start = self.ledger.recent_start() + plan.to_sinks;
        for &advance in &plan.block_advances {
            self.block_starts.push(start);
            self.form_block(policy, heads, advance)?;
            start += advance;
        }
        if plan.dropped > 0 {
            self.drop_recent(plan.dropped, heads);
        }
        self.ledger.evict(&plan);
        Ok(())
    }

    /// Files the oldest `block_size` recent tokens as a block and moves past
    /// the first `advance` of them; the rest stay recent (and begin the next
    /// block).
    fn form_block(&mut self, policy: &Policy, heads: usize, advance: usize) -> Result<()> {
        let bs = policy.block_size;
        let (k, v) = self.recent.range(0, bs)?;
        let storage = policy.block_dtype.resolve(k.dtype());
        if policy.scoring.uses_representatives() {
            let kv_heads = k.dim(1)?;
            let keys = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            self.retrieval.add_block(
                policy,
                &keys,
                kv_heads,
                &self.local_score[..bs * heads],
                heads,
            );
        }
        if policy.keeps_key_moments() {
            self.retrieval.add_key_moments(&k)?;
        }
        self.blocks.push(&k, &v, storage)?;
        self.drop_recent(advance, heads);
        Ok(())
    }

    fn drop_recent(&mut self, n: usize, heads: usize) {
        self.recent.drop_front(n);
        self.local_score.drain(..n * heads);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::attention::reference::{
        assert_close, candidate_attention_mass_slow, random, reference_attention,
        tensor_max_abs_diff, MemoryState,
    };
    use crate::attention::Q8Rows;
    use crate::attention::RopeTable;
    use crate::config::{BlockDType, Boundaries, QuestionRows, Scoring, Selection};
    use crate::retrieval::scores::attention_mass_scores;
    use crate::retrieval::{top_k, BlockKeys};

    /// Step inputs with no question, prompt length or votes, scale 0.25.
    fn plain_args<'a>(rope: &'a RopeTable, masks: &'a MaskCache) -> StepArgs<'a> {
        StepArgs {
            rope,
            softmax_scale: 0.25,
            question: None,
            prompt_len: 0,
            masks,
            votes: None,
            sentence_ends: &[],
        }
    }

    /// Random keys (seed 12) in which the key of `token` stands out: four
    /// times the others' size.
    fn keys_with_planted_token(shape: (usize, usize, usize, usize), token: usize) -> Tensor {
        let k = random(shape, 12, 1.0);
        let total = shape.2;
        Tensor::cat(
            &[
                k.narrow(2, 0, token).unwrap(),
                (k.narrow(2, token, 1).unwrap() * 4.0).unwrap(),
                k.narrow(2, token + 1, total - token - 1).unwrap(),
            ],
            2,
        )
        .unwrap()
    }

    #[test]
    fn question_token_rows_add_their_attention_mass_and_find_their_block() {
        // Memory of 25 blocks; one question row per head points at a key of
        // block 9, the others are random: retrieval must equal the written-out
        // mass of all rows (the execution block's mean query with weight 1,
        // each question row with `question_weight / rows`) and rank block 9
        // first for every KV head.
        let (heads, kv_heads, d, rows) = (4, 2, 16, 3);
        let config = Policy {
            scoring: Scoring::AttentionMass,
            selection: Selection::PerKvHead,
            question_rows: QuestionRows::Tokens,
            question_weight: 3.0,
            ..selective_config(Positions::Fixed, 0)
        };
        config.validate().unwrap();
        let rope = RopeTable::new(10000.0, d, 256, true, &Device::Cpu).unwrap();
        let masks = MaskCache::default();
        let args = plain_args(&rope, &masks);
        let (total, planted, bs) = (120, 9, config.block_size);
        let token = config.n_init + planted * bs + 1;
        let q_all = random((1, heads, total, d), 11, 1.0);
        let k_all = keys_with_planted_token((1, kv_heads, total, d), token);
        let v_all = random((1, kv_heads, total, d), 13, 1.0);
        let mut memory = LayerMemory::default();
        for p0 in (0..total).step_by(8) {
            let at = |t: &Tensor| t.narrow(2, p0, 8).unwrap();
            memory
                .append(
                    &config,
                    &args,
                    &at(&q_all),
                    &at(&k_all),
                    &at(&v_all),
                    |_| {},
                )
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
            .retrieval
            .retrieve(
                &config,
                &memory.blocks,
                &q_global,
                (heads / kv_heads, Read::Prompt),
                &[],
            )
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
        let expected = attention_mass_scores(
            &memory.blocks,
            config.block_size,
            &all_rows,
            &weights,
            scale,
        )
        .unwrap();
        assert_eq!(memory.retrieval.scores().len(), kv_heads);
        for (g, (got, e)) in memory.retrieval.scores().iter().zip(&expected).enumerate() {
            assert_close(got, e, 1e-4);
            assert_eq!(top_k(got, 1), vec![planted], "KV head {g}: {got:?}");
            assert!(memory.retrieval.picks()[g].contains(&planted));
        }
    }

    #[test]
    fn bounded_attention_mass_reads_the_candidates_as_written_out_and_finds_the_planted_block() {
        // 25 blocks; each KV head's queries point at a planted key in block
        // 9. With `mass_candidates` 4, retrieval must score as the written-out
        // reference does (candidates by the key moments' estimate, softmax
        // over their keys only) and still rank block 9 first.
        let (heads, kv_heads, d) = (4, 2, 16);
        let config = Policy {
            scoring: Scoring::AttentionMass,
            selection: Selection::PerKvHead,
            mass_candidates: 4,
            ..selective_config(Positions::Fixed, 0)
        };
        config.validate().unwrap();
        let rope = RopeTable::new(10000.0, d, 256, true, &Device::Cpu).unwrap();
        let masks = MaskCache::default();
        let args = plain_args(&rope, &masks);
        let (total, planted) = (120, 9);
        let token = config.n_init + planted * config.block_size + 1;
        let k_all = keys_with_planted_token((1, kv_heads, total, d), token);
        let mut memory = LayerMemory::default();
        for p0 in (0..total).step_by(8) {
            let at = |t: &Tensor| t.narrow(2, p0, 8).unwrap();
            let q = random((1, heads, 8, d), 11 + p0 as u64, 1.0);
            let v = random((1, kv_heads, 8, d), 13 + p0 as u64, 1.0);
            memory
                .append(&config, &args, &q, &at(&k_all), &v, |_| {})
                .unwrap();
            masks.clear();
        }
        let blocks = memory.block_count();
        assert!(blocks > 20, "{blocks}");
        let group = heads / kv_heads;
        // Per query head, its KV head's key at `at`: `(1, heads, 1, d)`.
        let key_per_head = |at: usize| {
            let keys: Vec<Tensor> = (0..heads)
                .map(|h| {
                    k_all
                        .narrow(1, h / group, 1)
                        .unwrap()
                        .narrow(2, at, 1)
                        .unwrap()
                })
                .collect();
            Tensor::cat(&keys, 1).unwrap()
        };
        let retrieve = |memory: &mut LayerMemory, q_global: &Tensor| {
            memory
                .retrieval
                .retrieve(
                    &config,
                    &memory.blocks,
                    q_global,
                    (group, Read::Prompt),
                    &[],
                )
                .unwrap();
        };
        let q_global = (key_per_head(token).broadcast_as((1, heads, 8, d)).unwrap()
            + random((1, heads, 8, d), 15, 1.0))
        .unwrap();
        retrieve(&mut memory, &q_global);

        let rows = q_global
            .mean(2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .reshape((kv_heads, group, d))
            .unwrap();
        let stored = Tensor::cat(&BlockKeys::keys_f32(&memory.blocks, 0).unwrap(), 1)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (candidates, expected) = candidate_attention_mass_slow(
            &stored,
            &rows,
            (config.block_size, 0.25),
            (None, &[]),
            4,
        );
        let full =
            attention_mass_scores(&memory.blocks, config.block_size, &rows, &[1.0], 0.25).unwrap();
        for (g, got) in memory.retrieval.scores().iter().enumerate() {
            assert_close(got, &expected[g], 1e-4);
            assert_eq!(candidates[g].len(), 4);
            assert!(
                candidates[g].contains(&planted),
                "KV head {g}: {candidates:?}"
            );
            assert_eq!(top_k(got, 1), vec![planted], "KV head {g}: {got:?}");
            assert!(memory.retrieval.picks()[g].contains(&planted));
            // The other blocks' keys were not read: they score 0, where full
            // attention mass gives each some share.
            let unread = (0..blocks).find(|b| !candidates[g].contains(b)).unwrap();
            assert_eq!(got[unread], 0.0);
            assert!(full[g][unread] > 0.0);
        }

        // `answer_mass_candidates` alone bounds a decode step's reads and
        // leaves the prompt's exact; a decode step also reads the blocks the
        // previous retrieval picked.
        let decode_only = Policy {
            mass_candidates: 0,
            answer_mass_candidates: 4,
            ..config
        };
        let read_as = |memory: &mut LayerMemory, q: &Tensor, read| {
            memory
                .retrieval
                .retrieve(&decode_only, &memory.blocks, q, (group, read), &[])
                .unwrap();
        };
        read_as(&mut memory, &q_global, Read::Prompt);
        for (got, e) in memory.retrieval.scores().iter().zip(&full) {
            assert_close(got, e, 1e-4);
        }
        let previous = memory.retrieval.picks().to_vec();
        assert!(previous.iter().all(|picks| picks.contains(&planted)));
        // A decode query unrelated to the planted key: by the estimate alone
        // some head would not read block 9; the pin makes every head read it.
        let q_step = random((1, heads, 1, d), 17, 1.0);
        read_as(&mut memory, &q_step, Read::Answer);
        let step_rows = q_step
            .squeeze(0)
            .unwrap()
            .reshape((kv_heads, group, d))
            .unwrap();
        let (unpinned, _) = candidate_attention_mass_slow(
            &stored,
            &step_rows,
            (config.block_size, 0.25),
            (None, &[]),
            4,
        );
        assert!(
            unpinned.iter().any(|c| !c.contains(&planted)),
            "{unpinned:?}"
        );
        let (pinned, expected_step) = candidate_attention_mass_slow(
            &stored,
            &step_rows,
            (config.block_size, 0.25),
            (None, &previous),
            4,
        );
        for (g, got) in memory.retrieval.scores().iter().enumerate() {
            assert_close(got, &expected_step[g], 1e-4);
            assert!(pinned[g].contains(&planted), "{pinned:?}");
            assert!(got[planted] > 0.0, "KV head {g}: {got:?}");
        }
        // A prompt read after it pins nothing: as `mass_candidates` alone.
        retrieve(&mut memory, &q_global);
        for (got, e) in memory.retrieval.scores().iter().zip(&expected) {
            assert_close(got, e, 1e-4);
        }

        // A question pointing at a key of block 20: its exact share is
        // added, and joins the ranking that chooses the candidates, so the
        // queries read block 20's keys too.
        let other = config.n_init + 20 * config.block_size + 2;
        let question = (key_per_head(other) * 8.0).unwrap();
        memory.set_question(question.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        retrieve(&mut memory, &q_global);
        let question_rows = question
            .squeeze(0)
            .unwrap()
            .reshape((kv_heads, group, d))
            .unwrap();
        let question_scores = attention_mass_scores(
            &memory.blocks,
            config.block_size,
            &question_rows,
            &[config.question_weight],
            0.25,
        )
        .unwrap();
        let (candidates, expected) = candidate_attention_mass_slow(
            &stored,
            &rows,
            (config.block_size, 0.25),
            (Some(&question_scores), &[]),
            4,
        );
        for (g, got) in memory.retrieval.scores().iter().enumerate() {
            assert!(candidates[g].contains(&20), "KV head {g}: {candidates:?}");
            assert!(
                candidates[g].contains(&planted),
                "KV head {g}: {candidates:?}"
            );
            let expected: Vec<f32> = expected[g]
                .iter()
                .zip(&question_scores[g])
                .map(|(a, b)| a + b)
                .collect();
            assert_close(got, &expected, 1e-4);
            assert!(got[20] > 0.0 && expected[20] > question_scores[g][20]);
        }
    }

    #[test]
    fn consensus_brings_a_block_another_layer_found_into_a_layer_that_missed_it() {
        // Three layers of one sequence. The question of layers 0 and 1
        // points at a planted key of block 9, so their own scores rank that
        // block first; layer 2's queries and keys are unrelated noise. With
        // `consensus = 1` layer 2 attends block 9 anyway, from the others'
        // votes, and one block of its own per KV head.
        let (heads, kv_heads, d) = (4, 2, 16);
        let config = Policy {
            scoring: Scoring::AttentionMass,
            selection: Selection::PerKvHead,
            question_weight: 3.0,
            consensus: 1,
            ..selective_config(Positions::Fixed, 0)
        };
        config.validate().unwrap();
        let rope = RopeTable::new(10000.0, d, 256, true, &Device::Cpu).unwrap();
        let masks = MaskCache::default();
        let votes = RefCell::new(LayerVotes::default());
        let (total, planted) = (120, 9);
        let token = config.n_init + planted * config.block_size + 1;
        let k0 = keys_with_planted_token((1, kv_heads, total, d), token);
        // Layers 0 and 1 see the planted key, layer 2 noise.
        let inputs = [
            (random((1, heads, total, d), 11, 1.0), k0.clone()),
            (random((1, heads, total, d), 31, 1.0), k0.clone()),
            (
                random((1, heads, total, d), 21, 1.0),
                random((1, kv_heads, total, d), 22, 1.0),
            ),
        ];
        let v = random((1, kv_heads, total, d), 13, 1.0);
        let mut layers: [LayerMemory; 3] = Default::default();
        let question: Vec<Tensor> = (0..heads)
            .map(|h| {
                (k0.narrow(1, h / (heads / kv_heads), 1)
                    .unwrap()
                    .narrow(2, token, 1)
                    .unwrap()
                    * 2.0)
                    .unwrap()
            })
            .collect();
        let question = Tensor::cat(&question, 1).unwrap();
        let question = question.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        layers[0].set_question(question.clone());
        layers[1].set_question(question);
        let mut brought = 0;
        for p0 in (0..total).step_by(8) {
            for (layer, memory) in layers.iter_mut().enumerate() {
                let args = StepArgs {
                    votes: Some((layer, &votes)),
                    ..plain_args(&rope, &masks)
                };
                let (q, k) = &inputs[layer];
                let at = |t: &Tensor| t.narrow(2, p0, 8).unwrap();
                memory
                    .append(&config, &args, &at(q), &at(k), &at(&v), |_| {})
                    .unwrap();
                masks.clear();
            }
            // Blocks when this execution block retrieved.
            let blocks = layers[0].retrieval.scores().first().map_or(0, Vec::len);
            if blocks <= planted {
                continue;
            }
            for found_it in &layers[..2] {
                assert!(found_it.retrieval.own_picks().contains(&(planted, 0)));
            }
            let noise = &layers[2].retrieval;
            for picks in noise.picks() {
                assert!(picks.contains(&planted), "{picks:?}");
                assert_eq!(picks.len(), config.topk);
            }
            // Steps where its own scores alone would have missed the block.
            if noise.own_picks().iter().all(|&(b, _)| b != planted) {
                brought += 1;
            }
        }
        assert!(brought >= 3, "{brought}");
    }

    /// What [`compare_with_reference`] saw.
    struct Compared {
        /// Largest difference from the reference.
        worst: f32,
        /// Whether retrieval ever left blocks out.
        selective: bool,
        /// Whether KV heads ever retrieved different blocks.
        heads_differ: bool,
        /// Whether consecutive blocks ever overlapped.
        overlapped: bool,
        /// Per call: its first position and the blocks per retrieval list.
        picked: Vec<(usize, usize)>,
        /// Per call: the blocks it attended, per retrieval list.
        picks: Vec<Vec<Vec<usize>>>,
        /// Every call's output, one after another.
        outputs: Vec<f32>,
        /// Per call: the `answer_pool` it left, and the blocks held when
        /// that pool was chosen.
        pools: Vec<Option<(Vec<Vec<usize>>, usize)>>,
        /// Bytes of the memory blocks at the end.
        block_bytes: usize,
    }

    /// Runs 120 prompt tokens in execution blocks of 8, then 12 decode
    /// steps, through `LayerMemory` and the written-out reference, with
    /// `topk` 2 of up to 23 blocks. With `question_topk` set, the prompt is
    /// 121 tokens (its last one fed alone) and its question at 96..100.
    fn compare_with_reference(config: &Policy) -> Compared {
        compare_with_reference_in_table(config, 256)
    }

    /// [`compare_with_reference`] with a RoPE table of `table` positions.
    fn compare_with_reference_in_table(config: &Policy, table: usize) -> Compared {
        let (heads, kv_heads, d) = (4, 2, 16);
        let rope = RopeTable::new(10000.0, d, table, true, &Device::Cpu).unwrap();
        let masks = MaskCache::default();
        // Votes of another layer, so `consensus` brings blocks this layer's
        // own scores did not pick: block 3, then 9.
        let votes = RefCell::new(LayerVotes::default());
        votes.borrow_mut().record(1, 0, &[(3, 0), (9, 1)]);
        votes.borrow_mut().record(2, 0, &[(3, 0)]);
        let with_question = config.question_topk > 0;
        // Sentence ends at irregular places, for `sentence` boundaries.
        let sentence_ends: Vec<bool> = (0..132).map(|p| (p * 5 + 3) % 7 < 2).collect();
        let args = StepArgs {
            rope: &rope,
            softmax_scale: 0.25,
            question: with_question.then_some(96..100),
            prompt_len: if with_question { 121 } else { 0 },
            masks: &masks,
            votes: Some((0, &votes)),
            sentence_ends: &sentence_ends,
        };
        let total = 132;
        // Peaky queries and keys so retrieval has clear winners.
        let q_all = random((1, heads, total, d), 1, 2.0);
        let k_all = random((1, kv_heads, total, d), 2, 2.0);
        let v_all = random((1, kv_heads, total, d), 3, 1.0);
        // With 8-bit blocks the reference reads each blocked token's rows as
        // they come back from 8 bits (a row's rounding does not depend on
        // the block it is in).
        let round_trip = |x: &Tensor| Q8Rows::quantize(x).unwrap().dequantize().unwrap();
        let (k_q8, v_q8) = (round_trip(&k_all), round_trip(&v_all));
        let q8 = config.block_dtype == BlockDType::Q8_0;
        let mut memory = LayerMemory::default();
        let (mut worst, mut selective, mut heads_differ) = (0f32, false, false);
        let (mut picked, mut picks, mut outputs) = (Vec::new(), Vec::new(), Vec::new());
        let mut pools = Vec::new();
        let mut p0 = 0;
        while p0 < total {
            let e = if p0 < 120 { 8 } else { 1 };
            let init = memory.stats().init;
            let (block_starts, recent_start) =
                (memory.block_starts().to_vec(), memory.recent_start());
            let q = q_all.narrow(2, p0, e).unwrap();
            let out = memory
                .append(
                    config,
                    &args,
                    &q,
                    &k_all.narrow(2, p0, e).unwrap(),
                    &v_all.narrow(2, p0, e).unwrap(),
                    |_| {},
                )
                .unwrap();
            let retrieved = memory.retrieval.picks().to_vec();
            pools.push(
                memory
                    .retrieval
                    .answer_pool()
                    .map(|(pool, filed)| (pool.to_vec(), filed)),
            );
            picked.push((p0, retrieved.first().map_or(0, Vec::len)));
            picks.push(retrieved.clone());
            selective |= retrieved
                .first()
                .is_some_and(|p| block_starts.len() > p.len() && !p.is_empty());
            heads_differ |= retrieved.windows(2).any(|w| w[0] != w[1]);
            let (k_ref, v_ref) = if q8 {
                let blocked: Vec<u8> = (0..total)
                    .map(|p| {
                        u8::from(
                            block_starts
                                .iter()
                                .any(|&s| (s..s + config.block_size).contains(&p)),
                        )
                    })
                    .collect();
                let blocked = Tensor::new(blocked, &Device::Cpu)
                    .unwrap()
                    .reshape((1, 1, total, 1))
                    .unwrap();
                let pick = |rounded: &Tensor, raw: &Tensor| {
                    blocked
                        .broadcast_as(raw.shape())
                        .unwrap()
                        .where_cond(rounded, raw)
                        .unwrap()
                };
                (pick(&k_q8, &k_all), pick(&v_q8, &v_all))
            } else {
                (k_all.clone(), v_all.clone())
            };
            let expected = reference_attention(
                config,
                &rope,
                &q,
                &k_ref.narrow(2, 0, p0 + e).unwrap(),
                &v_ref.narrow(2, 0, p0 + e).unwrap(),
                &MemoryState {
                    p0,
                    init,
                    block_starts: &block_starts,
                    recent_start,
                    retrieved: &retrieved,
                },
                args.softmax_scale,
            );
            let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&expected) {
                worst = worst.max((a - b).abs());
            }
            outputs.extend(got);
            masks.clear();
            p0 += e;
        }
        let overlapped = memory
            .block_starts()
            .windows(2)
            .any(|w| w[1] - w[0] < config.block_size);
        Compared {
            worst,
            selective,
            heads_differ,
            overlapped,
            picked,
            picks,
            outputs,
            pools,
            block_bytes: memory.stats().block_bytes,
        }
    }

    fn selective_config(positions: Positions, neighbours: usize) -> Policy {
        Policy {
            n_init: 4,
            n_local: 16,
            block_size: 4,
            exc_block_size: 8,
            topk: 2,
            repr_topk: 2,
            positions,
            neighbours,
            ..Policy::default()
        }
    }

    #[test]
    fn selective_retrieval_matches_the_written_out_reference() {
        // With sentence boundaries blocks begin after sentence ends and
        // overlap; the reference reads each retrieved block's tokens from
        // where it begins.
        use Boundaries::{Fixed, Sentence};
        use Scoring::{AttentionMass, Dot, HeadSoftmax, TokenMax};
        use Selection::{PerKvHead, Shared};
        for (positions, neighbours, scoring, selection, boundaries) in [
            (Positions::Fixed, 0, Dot, Shared, Fixed),
            (Positions::Ordered, 0, Dot, Shared, Fixed),
            (Positions::Fixed, 1, Dot, Shared, Fixed),
            (Positions::Ordered, 1, HeadSoftmax, Shared, Fixed),
            (Positions::Fixed, 0, TokenMax, Shared, Fixed),
            (Positions::Fixed, 0, AttentionMass, Shared, Fixed),
            (Positions::Fixed, 0, Dot, PerKvHead, Fixed),
            (Positions::Ordered, 1, AttentionMass, PerKvHead, Fixed),
            (Positions::Fixed, 0, TokenMax, PerKvHead, Fixed),
            (Positions::Fixed, 0, Dot, Shared, Sentence),
            (Positions::Ordered, 1, AttentionMass, PerKvHead, Sentence),
            (Positions::Fixed, 0, AttentionMass, PerKvHead, Sentence),
            (Positions::Interpolated, 0, TokenMax, Shared, Sentence),
        ] {
            for consensus in [0, 1] {
                let config = Policy {
                    scoring,
                    selection,
                    consensus,
                    boundaries,
                    ..selective_config(positions, neighbours)
                };
                let name = format!(
                    "{positions} {neighbours} {scoring} {selection} {consensus} {boundaries}"
                );
                let compared = compare_with_reference(&config);
                assert!(compared.selective, "{name}: every block was retrieved");
                // Otherwise the per-head gather would go untested.
                assert_eq!(
                    compared.heads_differ,
                    selection == PerKvHead,
                    "{name}: KV heads retrieved different blocks"
                );
                assert_eq!(
                    compared.overlapped,
                    boundaries == Sentence,
                    "{name}: blocks began early"
                );
                let diff = compared.worst;
                assert!(diff <= 1e-4, "{name}: max abs difference {diff}");
                if boundaries == Sentence {
                    let fixed = compare_with_reference(&Policy {
                        boundaries: Fixed,
                        ..config
                    });
                    assert_ne!(fixed.outputs, compared.outputs, "{name}: nothing changed");
                }
            }
        }
    }

    #[test]
    fn bounded_attention_mass_retrieval_attends_as_the_written_out_reference() {
        // `mass_candidates` 4 of up to 23 blocks per KV head: the attention
        // over what it retrieves matches the reference, and the picks differ
        // from those of unbounded attention mass somewhere.
        for (selection, boundaries) in [
            (Selection::PerKvHead, Boundaries::Fixed),
            (Selection::Shared, Boundaries::Sentence),
        ] {
            let config = Policy {
                scoring: Scoring::AttentionMass,
                selection,
                boundaries,
                mass_candidates: 4,
                ..selective_config(Positions::Fixed, 0)
            };
            config.validate().unwrap();
            let bounded = compare_with_reference(&config);
            assert!(bounded.selective, "{selection}: every block was retrieved");
            assert!(bounded.worst <= 1e-4, "{selection}: {}", bounded.worst);
            let unbounded = compare_with_reference(&Policy {
                mass_candidates: 0,
                ..config
            });
            assert_ne!(
                bounded.outputs, unbounded.outputs,
                "{selection}: nothing changed"
            );
        }
    }

    #[test]
    fn decode_steps_with_candidate_blocks_attend_as_the_reference_and_leave_the_prompt_exact() {
        // `answer_mass_candidates` 2 of up to 25 blocks: every step attends
        // as the written-out reference over its picks, the prompt's tokens
        // (to 120, its last) exactly as with unbounded attention mass, and
        // the decode steps not always so.
        let config = Policy {
            scoring: Scoring::AttentionMass,
            selection: Selection::PerKvHead,
            question_topk: 2,
            mass_candidates: 0,
            answer_mass_candidates: 2,
            ..selective_config(Positions::Fixed, 0)
        };
        config.validate().unwrap();
        let bounded = compare_with_reference(&config);
        assert!(bounded.selective, "every block was retrieved");
        assert!(bounded.worst <= 1e-4, "{}", bounded.worst);
        let exact = compare_with_reference(&Policy {
            answer_mass_candidates: 0,
            ..config
        });
        // The prompt's 121 tokens' outputs: 4 heads of 16 values each.
        let prompt = 121 * 4 * 16;
        assert_eq!(bounded.outputs[..prompt], exact.outputs[..prompt]);
        assert_ne!(bounded.outputs[prompt..], exact.outputs[prompt..]);
    }

    #[test]
    fn decode_steps_between_refreshes_attend_the_latest_picks() {
        // `answer_refresh` 3: decode steps 1, 4, 7, ... (positions 121, 124,
        // ...) retrieve as every step does without it, and the steps
        // between attend the latest picks; every step attends as the
        // written-out reference over what it attends, and the prompt's
        // outputs do not change.
        for (scoring, selection) in [
            (Scoring::AttentionMass, Selection::PerKvHead),
            (Scoring::Dot, Selection::Shared),
        ] {
            let every_step = Policy {
                scoring,
                selection,
                question_topk: 2,
                ..selective_config(Positions::Fixed, 0)
            };
            let config = Policy {
                answer_refresh: 3,
                ..every_step
            };
            config.validate().unwrap();
            let refreshed = compare_with_reference(&config);
            let exact = compare_with_reference(&every_step);
            assert!(refreshed.worst <= 1e-4, "{scoring}: {}", refreshed.worst);
            let prompt_calls = refreshed.picked.iter().filter(|(p0, _)| *p0 < 121).count();
            let prompt = 121 * 4 * 16;
            assert_eq!(refreshed.outputs[..prompt], exact.outputs[..prompt]);
            let mut kept_where_every_step_changed = false;
            for call in prompt_calls..refreshed.picks.len() {
                let step = refreshed.picked[call].0 - 120;
                if (step - 1).is_multiple_of(3) {
                    assert_eq!(
                        refreshed.picks[call], exact.picks[call],
                        "{scoring} step {step}"
                    );
                } else {
                    assert_eq!(
                        refreshed.picks[call],
                        refreshed.picks[call - 1],
                        "{scoring} step {step}"
                    );
                    kept_where_every_step_changed |= exact.picks[call] != exact.picks[call - 1];
                }
            }
            assert!(kept_where_every_step_changed, "{scoring}: nothing changed");
        }
    }

    #[test]
    fn decode_steps_between_refreshes_rank_the_pool_again() {
        // `answer_refresh` 3 with `answer_pool`: decode steps 1, 4, 7, ...
        // retrieve over every block; the steps between rank the pool that
        // retrieval chose (plus blocks filed since) by their own queries.
        let every_step = Policy {
            scoring: Scoring::AttentionMass,
            selection: Selection::PerKvHead,
            question_topk: 2,
            ..selective_config(Positions::Fixed, 0)
        };
        let exact = compare_with_reference(&every_step);
        let prompt = 121 * 4 * 16;
        let decode_calls = exact.picked.iter().filter(|(p0, _)| *p0 >= 121).count();
        let first_decode = exact.picked.len() - decode_calls;

        // A pool of every block: the steps between read every key, as
        // every-step retrieval does, and pick and attend the same.
        let whole = Policy {
            answer_refresh: 3,
            answer_pool: 64,
            ..every_step
        };
        whole.validate().unwrap();
        let got = compare_with_reference(&whole);
        assert!(got.worst <= 1e-4, "{}", got.worst);
        assert_eq!(got.picks, exact.picks);
        assert_eq!(got.outputs.len(), exact.outputs.len());
        for (a, b) in got.outputs.iter().zip(&exact.outputs) {
            assert!((a - b).abs() <= 1e-5, "{a} against {b}");
        }

        // A pool of 3 of about 25 blocks, 2 retrieved.
        let small = Policy {
            answer_pool: 3,
            ..whole
        };
        small.validate().unwrap();
        let got = compare_with_reference(&small);
        assert!(got.worst <= 1e-4, "{}", got.worst);
        assert_eq!(got.outputs[..prompt], exact.outputs[..prompt]);
        let mut reranked = false;
        for call in first_decode..got.picks.len() {
            let step = call - first_decode + 1;
            if (step - 1).is_multiple_of(3) {
                assert_eq!(got.picks[call], exact.picks[call], "step {step}");
                continue;
            }
            // The pool of the latest retrieval, and the blocks filed since.
            let (pool, filed) = got.pools[call - 1]
                .as_ref()
                .expect("a decode retrieval leaves a pool");
            assert!(*filed > 3 + 2, "{filed} blocks: the pool leaves some out");
            for (head, picks) in got.picks[call].iter().enumerate() {
                assert_eq!(pool[head].len(), 3);
                for b in picks {
                    assert!(pool[head].contains(b) || *b >= *filed, "step {step}: {b}");
                }
            }
            reranked |= got.picks[call] != got.picks[call - 1];
        }
        assert!(reranked, "the steps between never changed the picks");
        // The prompt's retrievals leave no pool.
        assert!(got.pools[..first_decode].iter().all(Option::is_none));
    }

    #[test]
    fn a_layers_bytes_stay_within_the_admission_bound() {
        let (heads, kv_heads, d) = (4, 2, 16);
        let rope = RopeTable::new(10000.0, d, 256, true, &Device::Cpu).unwrap();
        let masks = MaskCache::default();
        let args = plain_args(&rope, &masks);
        let model = ModelShape {
            max_seq_len: 256,
            num_layers: 1,
            num_attention_heads: heads,
            num_kv_heads: kv_heads,
            k_head_dim: d,
            v_head_dim: d,
            dtype: DType::F32,
        };
        let engine = crate::config::EngineSettings {
            prefill_chunk_size: 8,
            ..Default::default()
        };
        let base = selective_config(Positions::Fixed, 0);
        for config in [
            base,
            Policy {
                scoring: Scoring::AttentionMass,
                mass_candidates: 4,
                ..base
            },
            Policy {
                block_dtype: BlockDType::Q8_0,
                scoring: Scoring::AttentionMass,
                mass_candidates: 4,
                ..base
            },
            Policy {
                scoring: Scoring::AttentionMass,
                answer_mass_candidates: 4,
                ..base
            },
        ] {
            let mut memory = LayerMemory::default();
            for p0 in (0..200).step_by(8) {
                let x = |seed, h| random((1, h, 8, d), seed + p0 as u64, 1.0);
                memory
                    .append(
                        &config,
                        &args,
                        &x(1, heads),
                        &x(2, kv_heads),
                        &x(3, kv_heads),
                        |_| {},
                    )
                    .unwrap();
                masks.clear();
                let bound = sequence_bytes_bound(&config, &engine, &model, p0 + 8);
                assert!(
                    memory.bytes() <= bound,
                    "{config:?} at {}: {} > {bound}",
                    p0 + 8,
                    memory.bytes()
                );
            }
        }
    }

    #[test]
    fn only_the_scorings_that_read_representatives_keep_them() {
        let (heads, kv_heads, d) = (4, 2, 16);
        let rope = RopeTable::new(10000.0, d, 256, true, &Device::Cpu).unwrap();
        let masks = MaskCache::default();
        let args = plain_args(&rope, &masks);
        let run = |scoring| {
            let config = Policy {
                scoring,
                ..selective_config(Positions::Fixed, 0)
            };
            let mut memory = LayerMemory::default();
            for p0 in (0..96).step_by(8) {
                let x = |seed, h| random((1, h, 8, d), seed + p0 as u64, 1.0);
                memory
                    .append(
                        &config,
                        &args,
                        &x(1, heads),
                        &x(2, kv_heads),
                        &x(3, kv_heads),
                        |_| {},
                    )
                    .unwrap();
                masks.clear();
            }
            (memory.block_count(), memory.retrieval.bytes())
        };
        let (blocks, with_reps) = run(Scoring::Dot);
        assert!(blocks > 10);
        // One f32 key per block and query head.
        assert!(with_reps >= blocks * heads * d * 4, "{with_reps}");
        for scoring in [Scoring::AttentionMass, Scoring::TokenMax] {
            assert_eq!(run(scoring), (blocks, 0), "{scoring}");
        }
    }

    #[test]
    fn a_window_rotated_once_per_execution_block_attends_as_one_rotated_every_token() {
        // A prompt of 160 tokens, then 60 decode steps. Each step also runs on
        // a fork taken just before it, which rotates its whole window afresh
        // (as every step did before the window was kept rotated): the same
        // outputs within 1e-5, while the original rotated only the new key in
        // most steps.
        let (heads, kv_heads, d) = (4, 2, 16);
        let rope = RopeTable::new(10000.0, d, 256, true, &Device::Cpu).unwrap();
        let masks = MaskCache::default();
        let args = plain_args(&rope, &masks);
        let config = Policy {
            exc_block_size: 16,
            ..selective_config(Positions::Fixed, 0)
        };
        config.validate().unwrap();
        let step = |memory: &mut LayerMemory, at: usize, n: usize| {
            let x = |seed: u64, h| random((1, h, n, d), seed + 100 * at as u64, 1.0);
            let out = memory
                .append(
                    &config,
                    &args,
                    &x(1, heads),
                    &x(2, kv_heads),
                    &x(3, kv_heads),
                    |_| {},
                )
                .unwrap();
            masks.clear();
            out
        };
        let mut memory = LayerMemory::default();
        for at in (0..160).step_by(16) {
            step(&mut memory, at, 16);
        }
        assert!(memory.block_count() > 20, "{}", memory.block_count());
        let mut went_on = 0;
        for at in 160..220 {
            let mut afresh = memory.fork().unwrap();
            let base = memory.window.base();
            let kept = step(&mut memory, at, 1);
            went_on += usize::from(memory.window.base() == base);
            let diff = tensor_max_abs_diff(&kept, &step(&mut afresh, at, 1));
            assert!(diff < 1e-5, "step {at}: {diff}");
        }
        assert!(
            went_on >= 45,
            "{went_on} of 60 steps kept the rotated window"
        );
    }

    #[test]
    fn a_fork_goes_on_as_the_original_and_neither_changes_the_other() {
        // 160 tokens in calls of 8: 37 blocks of 4 (one full slab of 16 and
        // a partial one), `topk` 2. The original and a fork taken then read
        // the same 32 more tokens: the same outputs, bit for bit. A second
        // fork first reads other tokens, then a third fork of the same
        // snapshot reads the 32: still the same, so no write of one reached
        // another's blocks or window.
        let (heads, kv_heads, d) = (4, 2, 16);
        let rope = RopeTable::new(10000.0, d, 256, true, &Device::Cpu).unwrap();
        let masks = MaskCache::default();
        let args = plain_args(&rope, &masks);
        for (scoring, block_dtype) in [
            (Scoring::AttentionMass, BlockDType::F32),
            (Scoring::Dot, BlockDType::Q8_0),
        ] {
            let config = Policy {
                scoring,
                block_dtype,
                ..selective_config(Positions::Fixed, 0)
            };
            let read = |memory: &mut LayerMemory, from: usize, to: usize, salt: u64| {
                let mut outputs = Vec::new();
                for p0 in (from..to).step_by(8) {
                    let x = |seed: u64, h| random((1, h, 8, d), seed + salt + p0 as u64, 1.0);
                    let out = memory
                        .append(
                            &config,
                            &args,
                            &x(1, heads),
                            &x(2, kv_heads),
                            &x(3, kv_heads),
                            |_| {},
                        )
                        .unwrap();
                    outputs.extend(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    masks.clear();
                }
                outputs
            };
            let mut original = LayerMemory::default();
            read(&mut original, 0, 160, 0);
            assert!(original.block_count() > 20, "{}", original.block_count());
            let snapshot = original.fork().unwrap();
            let shared: Vec<_> = snapshot.shared_allocations().map(|(id, _)| id).collect();
            let full_slabs = snapshot.block_count() / block_store::SLAB_BLOCKS;
            assert!(full_slabs > 0);
            assert_eq!(shared.len(), full_slabs, "{scoring}");
            assert!(original.shared_allocations().any(|(id, _)| id == shared[0]));

            let expected = read(&mut original, 160, 192, 0);
            let mut fork = snapshot.fork().unwrap();
            assert_eq!(read(&mut fork, 160, 192, 0), expected, "{scoring}");
            let mut other = snapshot.fork().unwrap();
            assert_ne!(read(&mut other, 160, 192, 1000), expected, "{scoring}");
            let mut third = snapshot.fork().unwrap();
            assert_eq!(read(&mut third, 160, 192, 0), expected, "{scoring}");
            assert_eq!(snapshot.processed(), 160);
            assert_eq!(third.processed(), 192);
        }
    }

    #[test]
    fn q8_blocks_attend_their_rounded_rows_and_take_a_third_of_f32s_bytes() {
        use Scoring::{AttentionMass, Dot, TokenMax};
        use Selection::{PerKvHead, Shared};
        // Fixed boundaries only: with sentence boundaries a token can be read
        // both from an overlapping block (rounded) and among the recent
        // tokens (exact), which one tensor of keys cannot hold.
        for (positions, scoring, selection) in [
            (Positions::Fixed, Dot, Shared),
            (Positions::Fixed, AttentionMass, PerKvHead),
            (Positions::Ordered, TokenMax, Shared),
            (Positions::Ordered, AttentionMass, PerKvHead),
        ] {
            let config = |block_dtype| Policy {
                scoring,
                selection,
                block_dtype,
                ..selective_config(positions, 0)
            };
            let name = format!("{positions} {scoring} {selection}");
            let q8 = compare_with_reference(&config(BlockDType::Q8_0));
            assert!(q8.selective, "{name}: every block was retrieved");
            assert!(q8.worst <= 1e-4, "{name}: max abs difference {}", q8.worst);
            let f32 = compare_with_reference(&config(BlockDType::F32));
            let drift = q8
                .outputs
                .iter()
                .zip(&f32.outputs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Values of about unit size, rows of 16 rounded to 1/127 of their
            // largest value.
            assert!(
                drift > 0.0 && drift < 0.05,
                "{name}: q8 against f32 blocks {drift}"
            );
            // A row of 16 values: 16 bytes and a 4-byte scale, against 64.
            assert_eq!(q8.block_bytes * 64, f32.block_bytes * 20, "{name}");
        }
    }

    #[test]
    fn interpolated_positions_squeeze_memory_into_a_small_table_as_the_reference_does() {
        // `question_topk` 5 of blocks of 4 with 4 sinks: the question's
        // execution blocks hold about 28 memory keys beside a window of up
        // to 24, more than a table of 40 leaves, so their keys are squeezed;
        // in a table of 256 nothing is, and the result is `ordered`'s.
        for (scoring, selection) in [
            (Scoring::AttentionMass, Selection::PerKvHead),
            (Scoring::Dot, Selection::Shared),
        ] {
            let config = |positions| Policy {
                scoring,
                selection,
                question_topk: 5,
                ..selective_config(positions, 0)
            };
            let interpolated = config(Positions::Interpolated);
            interpolated.validate().unwrap();
            let name = format!("{scoring} {selection}");
            let small = compare_with_reference_in_table(&interpolated, 40);
            assert!(small.worst <= 1e-4, "{name}: {}", small.worst);
            let wide = compare_with_reference(&interpolated);
            let ordered = compare_with_reference(&config(Positions::Ordered));
            assert_eq!(wide.outputs, ordered.outputs, "{name}");
            let moved = small
                .outputs
                .iter()
                .zip(&wide.outputs)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(moved > 1e-3, "{name}: nothing was squeezed ({moved})");
        }
    }

    #[test]
    fn the_question_the_last_prompt_token_and_the_answer_retrieve_their_topk() {
        use Scoring::{AttentionMass, Dot};
        use Selection::{PerKvHead, Shared};
        for (positions, scoring, selection, answer_topk) in [
            (Positions::Fixed, AttentionMass, PerKvHead, 0),
            (Positions::Fixed, AttentionMass, PerKvHead, 3),
            (Positions::Ordered, Dot, Shared, 0),
            (Positions::Ordered, Dot, Shared, 4),
        ] {
            let config = Policy {
                scoring,
                selection,
                question_topk: 5,
                answer_topk,
                ..selective_config(positions, 0)
            };
            config.validate().unwrap();
            let compared = compare_with_reference(&config);
            let name = format!("{positions} {scoring} {selection} {answer_topk}");
            assert!(compared.worst <= 1e-4, "{name}: {}", compared.worst);
            for &(p0, picked) in &compared.picked {
                // The call at 96 reads the question, the one at 120 is the
                // prompt's last token, those from 121 on decode; blocks
                // exist from the first calls on.
                let want = match p0 {
                    96 | 120 => 5,
                    121.. if answer_topk > 0 => answer_topk,
                    _ => 2,
                };
                assert!(picked <= want, "{name}: call at {p0} took {picked}");
                if p0 >= 32 {
                    assert_eq!(picked, want, "{name}: call at {p0}");
                }
            }
        }
    }

    #[test]
    fn ordered_positions_change_what_memory_tokens_contribute() {
        // The reference would pass for both position schemes if they gave the
        // same numbers; they must not.
        let fixed = selective_config(Positions::Fixed, 0);
        let ordered = selective_config(Positions::Ordered, 0);
        let rope = RopeTable::new(10000.0, 16, 256, true, &Device::Cpu).unwrap();
        let q = random((1, 4, 8, 16), 1, 2.0);
        let k = random((1, 2, 40, 16), 2, 2.0);
        let v = random((1, 2, 40, 16), 3, 1.0);
        let picks = [vec![0]];
        let state = MemoryState {
            p0: 32,
            init: 4,
            block_starts: &[4, 8],
            recent_start: 12,
            retrieved: &picks,
        };
        let a = reference_attention(&fixed, &rope, &q, &k, &v, &state, 0.25);
        let b = reference_attention(&ordered, &rope, &q, &k, &v, &state, 0.25);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff > 1e-3, "{diff}");
    }
}

//! Retrieval: which memory blocks an execution block attends. Blocks are
//! scored against the execution block's queries (and the question, in
//! `qllm` mode) by the rule `scoring` names, then the `topk` best are picked
//! for all heads together or per KV head (`selection`).

mod mass;
mod moments;
pub mod question;
pub mod representative;
pub mod scores;
pub mod select;
pub mod votes;

use candle_core::{Device, Result, Tensor};

use crate::attention::Q8Rows;
use crate::config::{Policy, Read, Scoring, Selection};
use moments::{Candidates, KeyMoments};
use question::{QuestionMass, QuestionState};
use representative::{head_means, most_attended_rows};
use scores::{
    attention_mass_candidate_scores, attention_mass_scores, block_scores,
    head_softmax_block_scores, kv_head_block_scores, sum_rows, token_max_scores,
};
pub use select::{top_k, top_k_with_neighbours};
pub use votes::LayerVotes;

/// One slab's keys as the block store keeps them: `(kv_heads, tokens, d)`,
/// whole blocks, in block order.
#[derive(Debug, Clone)]
pub enum KeySlab {
    /// In a float dtype.
    Float(Tensor),
    /// As 8-bit rows with a scale each.
    Q8(Q8Rows),
}

impl KeySlab {
    /// `(kv_heads, tokens, d)`.
    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        match self {
            KeySlab::Float(keys) => keys.dims3(),
            KeySlab::Q8(rows) => rows.values.dims3(),
        }
    }

    /// The keys in f32.
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            KeySlab::Float(keys) => keys.to_dtype(candle_core::DType::F32),
            KeySlab::Q8(rows) => rows.dequantize(),
        }
    }
}

/// The memory blocks' keys, as retrieval reads them (the memory's block
/// store implements it; retrieval does not depend on how blocks are kept).
pub trait BlockKeys {
    /// Blocks held.
    fn blocks(&self) -> usize;
    /// Keys of blocks `from..` as stored, in pieces (views, not copies) in
    /// block order.
    fn key_slabs(&self, from: usize) -> Result<Vec<KeySlab>>;
    /// Keys of blocks `from..`, as f32 `(kv_heads, tokens, d)` pieces in
    /// block order.
    fn keys_f32(&self, from: usize) -> Result<Vec<Tensor>> {
        self.key_slabs(from)?.iter().map(KeySlab::to_f32).collect()
    }
}

/// Blocks for tests: keys only, in pieces of 16 blocks as the store keeps
/// them.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct TestBlocks {
    /// `(1, kv_heads, block_size, d)` keys per block.
    keys: Vec<Tensor>,
}

#[cfg(test)]
impl TestBlocks {
    pub fn push(&mut self, k: &Tensor, _v: &Tensor) -> Result<()> {
        self.keys.push(k.clone());
        Ok(())
    }
}

#[cfg(test)]
impl BlockKeys for TestBlocks {
    fn blocks(&self) -> usize {
        self.keys.len()
    }
    fn key_slabs(&self, from: usize) -> Result<Vec<KeySlab>> {
        let mut pieces = Vec::new();
        let mut start = from;
        while start < self.keys.len() {
            let end = ((start / 16 + 1) * 16).min(self.keys.len());
            let piece = Tensor::cat(&self.keys[start..end], 2)?;
            pieces.push(KeySlab::Float(piece.squeeze(0)?));
            start = end;
        }
        Ok(pieces)
    }
}

/// One layer's retrieval state: the blocks' representative keys, the
/// question, and what the latest execution block retrieved.
#[derive(Debug, Default, Clone)]
pub struct Retrieval {
    /// One representative key per block, `heads * d` values each.
    representatives: Vec<f32>,
    /// Per-channel key moments of every block, with `mass_candidates`.
    moments: KeyMoments,
    pub(crate) question: QuestionState,
    /// Blocks retrieved at the latest execution block: one list, or one
    /// per KV head with `per_kv_head` selection.
    picks: Vec<Vec<usize>>,
    /// Blocks retrieved by some head at the latest execution block.
    retrieved: Vec<usize>,
    /// With `consensus`, those some head picked by its own scores, with
    /// their best place in a list (0 = some head's best); empty otherwise.
    own: Vec<(usize, usize)>,
    /// Retrieval score of every block at the latest execution block: one
    /// row, or one per KV head with `per_kv_head` selection.
    scores: Vec<Vec<f32>>,
    /// Decode steps since the latest read of the prompt, for
    /// `answer_refresh`.
    answer_steps: usize,
    /// With `answer_pool`, the blocks per KV head the decode steps between
    /// retrievals rank again: the latest decode retrieval's best.
    pool: Option<AnswerPool>,
}

/// The blocks a decode step between retrievals ranks (`answer_pool`).
#[derive(Debug, Clone)]
struct AnswerPool {
    /// Per KV head, the best blocks of the retrieval that chose them.
    best: Candidates,
    /// Blocks held when they were chosen: those filed since (the answer's
    /// own tokens leaving the window) are ranked too.
    filed: usize,
}

impl AnswerPool {
    /// The pool with every block filed since it was chosen, of `blocks`.
    fn candidates(&self, blocks: usize) -> Candidates {
        let mut candidates = self.best.clone();
        for head in &mut candidates.blocks {
            head.extend(self.filed..blocks);
        }
        candidates
    }
}

impl Retrieval {
    /// Blocks retrieved at the latest execution block, per list (one for all
    /// heads, or one per KV head), each ascending and all of one length.
    pub fn picks(&self) -> &[Vec<usize>] {
        &self.picks
    }

    /// Blocks some head retrieved at the latest execution block, ascending.
    pub fn retrieved(&self) -> &[usize] {
        &self.retrieved
    }

    /// Blocks some head picked by its own scores at the latest execution
    /// block, ascending, each with its best place in a list (0 = some
    /// head's best): this layer's vote for the others. Kept only with
    /// `consensus`; empty otherwise.
    pub fn own_picks(&self) -> &[(usize, usize)] {
        &self.own
    }

    /// Every block's score at the latest execution block, per list.
    pub fn scores(&self) -> &[Vec<f32>] {
        &self.scores
    }

    /// With `answer_pool`, the blocks per KV head that the decode steps until
    /// the next retrieval rank again, and the blocks held when they were
    /// chosen (those filed since are ranked too).
    pub fn answer_pool(&self) -> Option<(&[Vec<usize>], usize)> {
        self.pool
            .as_ref()
            .map(|p| (p.best.blocks.as_slice(), p.filed))
    }

    /// The question's rows, once captured or set.
    pub fn question_rows(&self) -> Option<&[f32]> {
        self.question.rows.as_deref()
    }

    /// Files a new block's representative: per query head, the mean of its
    /// `repr_topk` most attended keys. `keys` is the block's `(kv_heads,
    /// block_size, d)` f32 keys flattened; `received` the local attention
    /// each token received, `heads` per token.
    pub fn add_block(
        &mut self,
        policy: &Policy,
        keys: &[f32],
        kv_heads: usize,
        received: &[f32],
        heads: usize,
    ) {
        let (bs, d) = (
            policy.block_size,
            keys.len() / (kv_heads * policy.block_size),
        );
        let representative = head_means(
            &most_attended_rows(
                keys,
                heads / kv_heads,
                bs,
                d,
                received,
                heads,
                policy.repr_topk,
            ),
            heads,
            d,
        );
        self.representatives.extend_from_slice(&representative);
    }

    /// Files a new block's per-channel key moments (`(1, kv_heads,
    /// block_size, d)` keys), which choose the blocks `attention_mass`
    /// reads with `mass_candidates`.
    pub fn add_key_moments(&mut self, keys: &Tensor) -> Result<()> {
        self.moments.push(keys)
    }

    /// Picks the blocks of `store` for the execution block whose queries at
    /// the memory distance are `q_global` (`(1, heads, e, d)` f32), for
    /// query heads in groups of `group` per KV head: the policy's `topk`
    /// for `read` per list, its keys read from the policy's mass candidates
    /// for `read`; a decode step between `answer_refresh` steps keeps the
    /// latest picks. `voted` ranks the blocks the other layers retrieved (most
    /// votes first); the first `consensus` of them join every list.
    pub fn retrieve(
        &mut self,
        policy: &Policy,
        store: &dyn BlockKeys,
        q_global: &Tensor,
        (group, read): (usize, Read),
        voted: &[usize],
    ) -> Result<()> {
        let topk = policy.topk_for(read);
        // Decode steps 1, 1 + N, 1 + 2N, ... retrieve; the others attend the
        // latest picks, or with `answer_pool` rank that retrieval's pool
        // again.
        let mut rerank = false;
        if read == Read::Answer {
            self.answer_steps += 1;
            if !(self.answer_steps - 1).is_multiple_of(policy.answer_refresh) {
                if self.pool.is_none() {
                    return Ok(());
                }
                rerank = true;
            }
        } else {
            self.answer_steps = 0;
        }
        // A retrieval over every block chooses a new pool.
        let pool = self.pool.take().filter(|_| rerank);
        // A decode step's bounded read also reads what the previous
        // retrieval picked: every decode step reads for the same answer, so
        // a block picked once (the answer's first token's picks are exact)
        // keeps its place until exact scores among the read blocks drop it.
        let previous = std::mem::take(&mut self.picks);
        self.retrieved.clear();
        self.own.clear();
        self.scores.clear();
        if !policy.mode.keeps_blocks() || store.blocks() == 0 || topk == 0 {
            return Ok(());
        }
        let per_head = policy.selection == Selection::PerKvHead;
        let (heads, d) = (q_global.dim(1)?, q_global.dim(3)?);
        let question = match (policy.mode.uses_question(), &self.question.rows) {
            (true, Some(question)) if policy.question_weight > 0.0 => Some(question),
            _ => None,
        };
        let question_rows = question.map_or(1, |q| q.len() / (heads * d));
        #[allow(clippy::cast_precision_loss)] // a head size
        let scale = 1.0 / (d as f32).sqrt();
        let kv_heads = heads / group;
        if policy.scoring == Scoring::AttentionMass {
            let q = q_global
                .mean(2)?
                .squeeze(0)?
                .reshape((kv_heads, group, d))?;
            // The question's share is known for every block; it is added to
            // the queries', and with `mass_candidates` it helps choose the
            // blocks whose keys the queries read.
            let question_scores = match question {
                Some(_) => Some(self.question_mass(
                    policy,
                    store,
                    (kv_heads, d, q_global.device()),
                    scale,
                    question_rows,
                )?),
                None => None,
            };
            let bound = policy.mass_candidates_for(read);
            // At least the blocks this retrieval picks.
            let candidates = bound.max(topk);
            let mut scores = if let Some(pool) = pool {
                let scores = attention_mass_candidate_scores(
                    store,
                    policy.block_size,
                    &q,
                    &pool.candidates(store.blocks()),
                    &[1.0],
                    scale,
                )?;
                self.pool = Some(pool);
                scores
            } else if bound > 0 && store.blocks() > candidates {
                if self.moments.blocks() != store.blocks() {
                    candle_core::bail!(
                        "qllm: key moments of {} blocks for {} blocks held",
                        self.moments.blocks(),
                        store.blocks()
                    );
                }
                let rows = q.flatten_all()?.to_vec1::<f32>()?;
                let pinned = if read == Read::Answer {
                    previous.as_slice()
                } else {
                    &[]
                };
                let candidates = self.moments.candidates(
                    &rows,
                    (kv_heads, scale),
                    (question_scores.as_deref(), pinned),
                    candidates,
                );
                attention_mass_candidate_scores(
                    store,
                    policy.block_size,
                    &q,
                    &candidates,
                    &[1.0],
                    scale,
                )?
            } else {
                attention_mass_scores(store, policy.block_size, &q, &[1.0], scale)?
            };
            // A decode retrieval's pool: the queries' masses are their share.
            let queries_masses =
                (read == Read::Answer && !rerank && policy.answer_pool > 0).then(|| scores.clone());
            for (head, question) in scores.iter_mut().zip(question_scores.iter().flatten()) {
                head.iter_mut().zip(question).for_each(|(s, q)| *s += q);
            }
            if let Some(masses) = queries_masses {
                self.pool = Some(AnswerPool {
                    best: pool_of(&scores, &masses, policy.answer_pool, group),
                    filed: store.blocks(),
                });
            }
            self.scores = if per_head {
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
                    *q += policy.question_weight * x;
                }
            }
            let reps = &self.representatives;
            self.scores = match policy.scoring {
                // Per head, the softmax over blocks keeps the dot product's order.
                Scoring::Dot | Scoring::HeadSoftmax if per_head => {
                    kv_head_block_scores(reps, &query, d * group)
                }
                Scoring::Dot => vec![block_scores(reps, &query)],
                Scoring::HeadSoftmax => {
                    vec![head_softmax_block_scores(reps, &query, d * group, scale)]
                }
                Scoring::TokenMax => {
                    let q = Tensor::from_slice(&query, (kv_heads, group, d), q_global.device())?
                        .sum(1)?;
                    token_max_scores(store, &q, !per_head)?
                }
                Scoring::AttentionMass => unreachable!("handled above"),
            };
        }
        let own: Vec<Vec<usize>> = self
            .scores
            .iter()
            .map(|scores| top_k_with_neighbours(scores, topk, policy.neighbours))
            .collect();
        // Only `consensus` reads this layer's vote.
        if policy.consensus > 0 {
            self.own = best_places(&own, &self.scores);
        }
        let picks = if policy.consensus > 0 && store.blocks() > topk && topk == policy.topk {
            votes::with_consensus(
                &own,
                voted,
                policy.consensus,
                &self.scores,
                topk,
                policy.neighbours,
            )
        } else {
            own
        };
        self.retrieved = picks.concat();
        self.retrieved.sort_unstable();
        self.retrieved.dedup();
        self.picks = picks;
        Ok(())
    }

    /// The question rows' attention mass per KV head and block,
    /// `question_weight` shared by the `rows` rows of each query head.
    fn question_mass(
        &mut self,
        policy: &Policy,
        store: &dyn BlockKeys,
        (kv_heads, d, device): (usize, usize, &Device),
        scale: f32,
        rows: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let question = self
            .question
            .rows
            .as_ref()
            .expect("called with the question's rows set");
        if self.question.mass.is_none() {
            self.question.mass = Some(QuestionMass::new(question, kv_heads, d, device)?);
        }
        let mass = self.question.mass.as_mut().expect("just set");
        mass.extend(store, policy.block_size, scale)?;
        #[allow(clippy::cast_precision_loss)] // at most `MAX_QUESTION_ROWS`
        let row_weight = policy.question_weight / rows as f32;
        mass.scores(row_weight, scale)
    }

    /// Bytes held: representatives, key moments and the question's rows and
    /// partials.
    pub fn bytes(&self) -> usize {
        self.representatives.capacity() * 4 + self.moments.bytes() + self.question.bytes()
    }
}

/// Per KV head, the `count` best blocks by `scores` (queries' masses plus
/// the question's), ascending; each of the head's `rows` query rows is
/// given the share of its attention they hold, from `masses` (the queries'
/// alone, each row's summing to one over all blocks).
fn pool_of(scores: &[Vec<f32>], masses: &[Vec<f32>], count: usize, rows: usize) -> Candidates {
    let (blocks, shares) = scores
        .iter()
        .zip(masses)
        .map(|(scores, masses)| {
            let blocks = top_k(scores, count);
            #[allow(clippy::cast_precision_loss)] // a group of query heads
            let held = blocks.iter().map(|&b| masses[b]).sum::<f32>() / rows as f32;
            // No query mass (an empty memory) leaves nothing to scale.
            let share = if held > 0.0 { held.min(1.0) } else { 1.0 };
            (blocks, vec![share; rows])
        })
        .unzip();
    Candidates { blocks, shares }
}

/// The blocks of `lists` (each scored by the same row of `scores`),
/// ascending, each with its best place in a list by score (0 = a list's
/// best).
fn best_places(lists: &[Vec<usize>], scores: &[Vec<f32>]) -> Vec<(usize, usize)> {
    let mut places = std::collections::BTreeMap::new();
    for (list, row) in lists.iter().zip(scores) {
        let mut ranked = list.clone();
        ranked.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for (place, b) in ranked.into_iter().enumerate() {
            let best = places.entry(b).or_insert(place);
            *best = (*best).min(place);
        }
    }
    places.into_iter().collect()
}

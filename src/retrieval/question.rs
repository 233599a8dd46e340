//! The question's part in retrieval: its rows (the paper's question vector,
//! or one row per token), captured as its tokens pass, and its share of
//! `attention_mass` scores, cached per block.

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use super::mass::{block_partials, combine_partials};
use super::representative::{head_means, most_attended_rows};
use super::BlockKeys;
use crate::config::{Policy, QuestionRows, MAX_QUESTION_ROWS};

/// The question's share of `attention_mass` scores, kept up to date as
/// blocks form. The question's rows and the memory keys never move
/// (queries at the fixed distance, keys unrotated), so each block's logits
/// against them are computed once: per block and row, the largest logit and
/// the sum of `exp(scale * (logit - largest))`, which combine into the
/// softmax over all blocks without reading a key again.
#[derive(Debug, Clone)]
pub(crate) struct QuestionMass {
    /// `(kv_heads, rows, d)` f32: each KV head's query heads' question rows.
    rows: Tensor,
    /// Per block, per KV head and row: the largest logit, then the sum.
    partials: Vec<f32>,
    /// Blocks covered by `partials`.
    blocks: usize,
}

impl QuestionMass {
    /// `question` is `(heads, r, d)` flattened: `r` rows per query head.
    pub(crate) fn new(
        question: &[f32],
        kv_heads: usize,
        d: usize,
        device: &Device,
    ) -> Result<Self> {
        let rows = question.len() / (kv_heads * d);
        Ok(Self {
            rows: Tensor::from_slice(question, (kv_heads, rows, d), device)?,
            partials: Vec::new(),
            blocks: 0,
        })
    }

    /// Adds the partials of the blocks formed since the last call.
    pub(crate) fn extend(
        &mut self,
        store: &dyn BlockKeys,
        block_size: usize,
        scale: f32,
    ) -> Result<()> {
        let (kv_heads, rows, _) = self.rows.dims3()?;
        let partials = block_partials(
            &store.key_slabs(self.blocks)?,
            block_size,
            &self.rows,
            scale,
        )?;
        self.partials.extend_from_slice(&partials);
        self.blocks += partials.len() / (kv_heads * rows * 2);
        Ok(())
    }

    /// Per KV head and block, the attention the question rows give the
    /// block, each row's softmax over all blocks' keys weighted by
    /// `row_weight`, summed over the KV head's rows.
    pub(crate) fn scores(&self, row_weight: f32, scale: f32) -> Result<Vec<Vec<f32>>> {
        let (kv_heads, rows, _) = self.rows.dims3()?;
        Ok(combine_partials(
            &self.partials,
            (kv_heads, rows),
            &[row_weight],
            scale,
        ))
    }

    pub(crate) fn bytes(&self) -> usize {
        (self.partials.capacity() + self.rows.elem_count()) * 4
    }
}

/// What a layer knows of the question: its rows once captured (or set from
/// a probe), the queries of its tokens while they pass, and the cached
/// attention-mass partials.
#[derive(Debug, Default, Clone)]
pub(crate) struct QuestionState {
    /// The question's rows, `(heads, r, d)` flattened: `r` is 1 (the
    /// question vector) or, with `question_rows = "tokens"`, one per token.
    pub rows: Option<Vec<f32>>,
    /// The rows' `attention_mass` partials, built at the first retrieval
    /// that uses them.
    pub mass: Option<QuestionMass>,
    /// Globally rotated queries of the question tokens seen so far,
    /// `(heads, t, d)` f32 pieces.
    queries: Vec<Tensor>,
}

impl QuestionState {
    /// Sets the rows, computed elsewhere (a probe pass).
    pub fn set(&mut self, rows: Vec<f32>) {
        self.rows = Some(rows);
        self.mass = None;
    }

    /// Collects the question's queries as they pass (`q_global`, the
    /// execution block `p0..end`'s queries at the memory distance) and,
    /// once the whole span has been read, turns them into the question's
    /// rows. `received` is the local attention each token of the span has
    /// received so far, `heads` per token.
    pub fn observe(
        &mut self,
        policy: &Policy,
        span: &Range<usize>,
        block: Range<usize>,
        q_global: &Tensor,
        received: impl FnOnce(Range<usize>) -> Result<Vec<f32>>,
    ) -> Result<()> {
        if self.rows.is_some() || span.end <= block.start || span.start >= block.end {
            return Ok(());
        }
        let from = span.start.max(block.start);
        let to = span.end.min(block.end);
        self.queries.push(
            q_global
                .narrow(2, from - block.start, to - from)?
                .squeeze(0)?,
        );
        if span.end > block.end {
            return Ok(());
        }
        let queries = Tensor::cat(&self.queries, 1)?;
        self.queries.clear();
        let (heads, len, d) = queries.dims3()?;
        let scores = received(span.clone())?;
        let queries = queries.flatten_all()?.to_vec1::<f32>()?;
        self.set(question_rows(policy, &queries, heads, len, d, &scores));
        Ok(())
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.rows.as_ref().map_or(0, Vec::capacity) * 4
            + self.mass.as_ref().map_or(0, QuestionMass::bytes)
    }
}

/// The question's rows from its tokens' queries (`(heads, len, d)`
/// flattened) and the local attention each received (`len` x `heads`): per
/// head, the mean of the `repr_topk` most attended tokens' queries (the
/// paper's question vector), or with `question_rows = "tokens"` up to
/// [`MAX_QUESTION_ROWS`] of them, most attended first.
pub fn question_rows(
    policy: &Policy,
    queries: &[f32],
    heads: usize,
    len: usize,
    d: usize,
    received: &[f32],
) -> Vec<f32> {
    match policy.question_rows {
        QuestionRows::Mean => head_means(
            &most_attended_rows(queries, 1, len, d, received, heads, policy.repr_topk),
            heads,
            d,
        ),
        QuestionRows::Tokens => {
            most_attended_rows(queries, 1, len, d, received, heads, MAX_QUESTION_ROWS)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::attention::reference::{assert_close, random};
    use crate::retrieval::scores::attention_mass_scores;
    use crate::retrieval::TestBlocks;

    use super::*;

    #[test]
    fn question_mass_partials_combine_into_the_softmax_over_all_blocks() {
        // 20 blocks of 3 tokens over two slabs, covered in steps (7, then 13
        // more across the slab boundary), against the one-pass softmax.
        let (blocks, bs, kv_heads, d, rows) = (20, 3, 2, 4, 6);
        let keys = random((1, kv_heads, blocks * bs, d), 9, 1.5);
        let question = random((1, kv_heads, rows, d), 10, 2.0).squeeze(0).unwrap();
        let flat = question.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (weight, scale) = (0.25, 0.5);
        let mut store = TestBlocks::default();
        let mut mass = QuestionMass::new(&flat, kv_heads, d, &Device::Cpu).unwrap();
        // The third step adds no block: nothing changes.
        for (from, to) in [(0, 7), (7, blocks), (blocks, blocks)] {
            for b in from..to {
                let k = keys.narrow(2, b * bs, bs).unwrap();
                store.push(&k, &k).unwrap();
            }
            mass.extend(&store, bs, scale).unwrap();
            let got = mass.scores(weight, scale).unwrap();
            let expected = attention_mass_scores(&store, bs, &question, &[weight], scale).unwrap();
            assert_eq!(got.len(), kv_heads);
            for (g, e) in got.iter().zip(&expected) {
                assert_eq!(g.len(), to);
                assert_close(g, e, 1e-5);
            }
        }
    }

    #[test]
    fn a_question_split_across_two_execution_blocks_gives_the_rows_of_the_whole() {
        // Question at tokens 5..13, read in execution blocks 0..8 and 8..16:
        // its rows must be those of its 8 queries taken at once, per head
        // the mean of the `repr_topk` most attended.
        let (heads, d) = (3, 4);
        let policy = Policy {
            repr_topk: 3,
            ..Policy::default()
        };
        let q_global = random((1, heads, 16, d), 21, 1.0);
        let received: Vec<f32> = (0..16 * heads)
            .map(|i| f32::from(u8::try_from((i * 7) % 23).unwrap()))
            .collect();
        let span = 5..13;
        let mut state = QuestionState::default();
        for block in [0..8, 8..16] {
            let q = q_global.narrow(2, block.start, block.len()).unwrap();
            let received =
                |span: Range<usize>| Ok(received[span.start * heads..span.end * heads].to_vec());
            state
                .observe(&policy, &span, block.clone(), &q, received)
                .unwrap();
            // Nothing is captured before the span has been read whole.
            assert_eq!(state.rows.is_some(), block.end >= span.end);
        }
        let whole = q_global
            .narrow(2, span.start, span.len())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expected = question_rows(
            &policy,
            &whole,
            heads,
            span.len(),
            d,
            &received[span.start * heads..span.end * heads],
        );
        assert_eq!(state.rows.as_deref(), Some(expected.as_slice()));
        // Written out for head 0: its three most attended tokens' queries.
        let score = |t: usize| received[(span.start + t) * heads];
        let mut order: Vec<usize> = (0..span.len()).collect();
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
        let query = |t: usize, j: usize| whole[t * d + j];
        for (j, got) in expected[..d].iter().enumerate() {
            let mean = order[..3].iter().map(|&t| query(t, j)).sum::<f32>() / 3.0;
            assert!((got - mean).abs() < 1e-6, "{j}: {got} vs {mean}");
        }
    }
}

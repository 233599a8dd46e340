//! Block scores: how relevant each memory block is to the current queries
//! (and the question), by the rules [`crate::config::Scoring`] names.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::moments::Candidates;
use super::BlockKeys;
use crate::attention::lanes::dot;

/// Blocks per rayon task in the representative scans: at a million tokens a
/// layer holds 16K representatives (37 MB for SmolLM2), a memory-bound scan
/// that one core ran in about 2 ms per layer and token. Fewer blocks are one
/// task (the decode step at 1K tokens measured the same as before the split).
const BLOCKS_PER_TASK: usize = 1024;

/// Relevance of each block: the dot product of its representative (a row of
/// `representatives`) with `query`, i.e. summed over heads.
pub fn block_scores(representatives: &[f32], query: &[f32]) -> Vec<f32> {
    let mut scores = vec![0f32; representatives.len() / query.len()];
    scores
        .par_chunks_mut(BLOCKS_PER_TASK)
        .zip(representatives.par_chunks(BLOCKS_PER_TASK * query.len()))
        .for_each(|(scores, rows)| {
            for (score, row) in scores.iter_mut().zip(rows.chunks_exact(query.len())) {
                *score = dot(row, query);
            }
        });
    scores
}

/// Per KV head (a `width` slice of `heads * d`: its query heads together),
/// the dot product of each block's representative with `query`.
pub fn kv_head_block_scores(representatives: &[f32], query: &[f32], width: usize) -> Vec<Vec<f32>> {
    let kv_heads = query.len() / width;
    // Block-major, so each task reads its representatives once.
    let mut by_block = vec![0f32; representatives.len() / query.len() * kv_heads];
    by_block
        .par_chunks_mut(BLOCKS_PER_TASK * kv_heads)
        .zip(representatives.par_chunks(BLOCKS_PER_TASK * query.len()))
        .for_each(|(scores, rows)| {
            for (scores, row) in scores
                .chunks_exact_mut(kv_heads)
                .zip(rows.chunks_exact(query.len()))
            {
                for ((score, r), q) in scores
                    .iter_mut()
                    .zip(row.chunks_exact(width))
                    .zip(query.chunks_exact(width))
                {
                    *score = dot(r, q);
                }
            }
        });
    (0..kv_heads)
        .map(|g| by_block.iter().skip(g).step_by(kv_heads).copied().collect())
        .collect()
}

/// Element-wise sum of equally long rows.
pub(crate) fn sum_rows(rows: &[Vec<f32>]) -> Vec<f32> {
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

/// Per block, the highest `q · k` over its tokens, where `q` is
/// `(kv_heads, d)` f32 (each KV head's query heads summed). One row per
/// KV head, or with `summed` one row of the dot products summed over KV
/// heads before the maximum is taken.
pub fn token_max_scores(store: &dyn BlockKeys, q: &Tensor, summed: bool) -> Result<Vec<Vec<f32>>> {
    let q = q.unsqueeze(1)?;
    let logits = store
        .keys_f32(0)?
        .iter()
        .map(|keys| q.matmul(&keys.t()?))
        .collect::<Result<Vec<_>>>()?;
    let mut logits = Tensor::cat(&logits, 2)?.squeeze(1)?;
    if summed {
        logits = logits.sum_keepdim(0)?;
    }
    let rows = logits.dim(0)?;
    logits
        .reshape((rows, store.blocks(), ()))?
        .max(2)?
        .to_vec2::<f32>()
}

/// Per KV head and block, the attention the block would receive: `q` is
/// `(kv_heads, m, d)` f32, the `m` query rows of each KV head's query
/// heads; each row is softmax-normalised over every stored key (logits
/// times `scale`), its probabilities summed per block and weighted by
/// `weights[r % weights.len()]` (one weight per distinct query row),
/// then summed over the rows.
pub fn attention_mass_scores(
    store: &dyn BlockKeys,
    block_size: usize,
    q: &Tensor,
    weights: &[f32],
    scale: f32,
) -> Result<Vec<Vec<f32>>> {
    let (kv_heads, m, _) = q.dims3()?;
    let partials = super::mass::block_partials(&store.key_slabs(0)?, block_size, q, scale)?;
    Ok(super::mass::combine_partials(
        &partials,
        (kv_heads, m),
        weights,
        scale,
    ))
}

/// [`attention_mass_scores`] with each KV head's rows reading only the keys
/// of its `candidates` blocks: their softmax runs over those keys, scaled by
/// the candidates' estimated share, and the other blocks score 0.
pub(crate) fn attention_mass_candidate_scores(
    store: &dyn BlockKeys,
    block_size: usize,
    q: &Tensor,
    candidates: &Candidates,
    weights: &[f32],
    scale: f32,
) -> Result<Vec<Vec<f32>>> {
    let m = q.dim(1)?;
    let partials = super::mass::candidate_partials(
        &store.key_slabs(0)?,
        block_size,
        q,
        scale,
        &candidates.blocks,
    )?;
    Ok(super::mass::combine_candidate_partials(
        &partials,
        candidates,
        (m, store.blocks()),
        weights,
        scale,
    ))
}

#[cfg(test)]
mod tests {
    use crate::attention::reference::{assert_close, attention_mass_slow, random};
    use crate::retrieval::TestBlocks;

    use super::*;

    #[test]
    fn head_softmax_gives_every_kv_head_one_vote() {
        // Three KV heads of width 1, three blocks. Head 0 favours block 0 by
        // a wide margin; heads 1 and 2 favour block 2 by less. Summed dot
        // products follow head 0; normalised, each head has one vote.
        let representatives = [10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0];
        let query = [1.0, 1.0, 1.0];
        assert_eq!(
            crate::retrieval::top_k(&block_scores(&representatives, &query), 1),
            vec![0]
        );
        let scores = head_softmax_block_scores(&representatives, &query, 1, 1.0);
        assert!(
            (scores.iter().sum::<f32>() - 3.0).abs() < 1e-5,
            "{scores:?}"
        );
        assert_eq!(crate::retrieval::top_k(&scores, 1), vec![2]);
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
        let mut store = TestBlocks::default();
        for b in 0..blocks {
            let k = keys.narrow(2, b * bs, bs).unwrap();
            store.push(&k, &k).unwrap();
        }
        let q = random((1, 1, kv_heads, d), 6, 1.0)
            .reshape((kv_heads, d))
            .unwrap();
        let summed = token_max_scores(&store, &q, true).unwrap();
        let per_head = token_max_scores(&store, &q, false).unwrap();
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

    #[test]
    fn attention_mass_is_each_rows_softmax_over_all_keys_summed_per_block() {
        // 20 blocks of 3 tokens (two slabs), 2 KV heads of size 4, 4 query
        // rows per KV head alternating between two weights.
        let (blocks, bs, kv_heads, d, m) = (20, 3, 2, 4, 4);
        let keys = random((1, kv_heads, blocks * bs, d), 7, 1.0);
        let mut store = TestBlocks::default();
        for b in 0..blocks {
            let k = keys.narrow(2, b * bs, bs).unwrap();
            store.push(&k, &k).unwrap();
        }
        let q = random((1, kv_heads, m, d), 8, 2.0).squeeze(0).unwrap();
        let (weights, scale) = ([1.0, 3.0], 0.5);
        let got = attention_mass_scores(&store, bs, &q, &weights, scale).unwrap();
        let expected = attention_mass_slow(&keys, &q, bs, &weights, scale);
        assert_eq!(got.len(), kv_heads);
        for g in 0..kv_heads {
            assert_close(&got[g], &expected[g], 1e-5);
            // Each row spends its weight once: 2 rows of weight 1, 2 of 3.
            let total: f32 = got[g].iter().sum();
            assert!((total - 8.0).abs() < 1e-4, "{total}");
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
    fn representative_scans_split_over_tasks_score_every_block() {
        // More blocks than one task takes, and a remainder.
        let (blocks, kv_heads, width) = (2 * BLOCKS_PER_TASK + 37, 3, 8);
        let d = kv_heads * width;
        let value = |i: usize| f32::from(u8::try_from((i * 7919) % 113).unwrap()) / 57.0 - 1.0;
        let reps: Vec<f32> = (0..blocks * d).map(value).collect();
        let query: Vec<f32> = (0..d).map(|i| value(i * 31 + 5)).collect();
        let written_out = |block: usize, range: std::ops::Range<usize>| -> f32 {
            range.map(|c| reps[block * d + c] * query[c]).sum()
        };
        let summed = block_scores(&reps, &query);
        let per_head = kv_head_block_scores(&reps, &query, width);
        assert_eq!(summed.len(), blocks);
        assert_eq!(per_head.len(), kv_heads);
        for b in 0..blocks {
            assert!((summed[b] - written_out(b, 0..d)).abs() < 1e-4, "block {b}");
            for (g, head) in per_head.iter().enumerate() {
                let expected = written_out(b, g * width..(g + 1) * width);
                assert!((head[b] - expected).abs() < 1e-4, "block {b}, head {g}");
            }
        }
    }
}

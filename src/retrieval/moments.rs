//! Per block and KV head, the mean and variance of each key channel: enough
//! to estimate the attention a query gives the block without reading its
//! keys. If a block's keys were Gaussian with these moments (channels
//! independent), `sum_t exp(s q.k_t)` would be about `block_size *
//! exp(s q.mean + s^2/2 sum_c q_c^2 var_c)`, the log-normal moment, so
//! blocks are rated by `q.mean + s/2 sum_c q_c^2 var_c`. With
//! `mass_candidates`, the blocks whose estimate, plus the question's share,
//! is best are the only ones whose keys `attention_mass` reads, and a
//! retrieval's cost stops growing with the context.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::top_k;
use crate::attention::lanes::dot;

/// The blocks whose keys a retrieval reads.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidates {
    /// Per KV head, the blocks, ascending.
    pub blocks: Vec<Vec<usize>>,
    /// Per KV head and row, the share of the row's attention the candidates
    /// hold by the estimate: their masses, read over their keys alone, are
    /// scaled by it, so that candidates do not gain the share the other
    /// blocks would have taken.
    pub shares: Vec<Vec<f32>>,
}

/// Channel moments of every block's keys, in block order.
#[derive(Debug, Default, Clone)]
pub(crate) struct KeyMoments {
    /// Per block, per KV head: `d` means, then `d` variances.
    moments: Vec<f32>,
    /// Values per block: `kv_heads * 2 * d`, once a block is in.
    width: usize,
}

impl KeyMoments {
    /// Files the moments of a new block's keys, `(1, kv_heads, block_size,
    /// d)` in any float dtype, on any device (two small reductions cross to
    /// the host).
    pub(crate) fn push(&mut self, keys: &Tensor) -> Result<()> {
        let keys = keys.to_dtype(DType::F32)?.squeeze(0)?;
        let (kv_heads, _, d) = keys.dims3()?;
        let means = keys.mean_keepdim(1)?;
        let variances = keys
            .broadcast_sub(&means)?
            .sqr()?
            .mean(1)?
            .to_vec2::<f32>()?;
        let means = means.squeeze(1)?.to_vec2::<f32>()?;
        for (mean, variance) in means.iter().zip(&variances) {
            self.moments.extend_from_slice(mean);
            self.moments.extend_from_slice(variance);
        }
        self.width = kv_heads * 2 * d;
        Ok(())
    }

    /// Blocks filed.
    pub(crate) fn blocks(&self) -> usize {
        self.moments.len().checked_div(self.width).unwrap_or(0)
    }

    /// Per KV head, the `count` blocks (ascending) with the best estimated
    /// score: `rows` is `(kv_heads, m, d)` flattened. Each row rates the
    /// blocks by `exp(scale * (estimate - best estimate))` and splits one
    /// unit among them in proportion, the share `attention_mass` would give
    /// if the estimates were exact; the rows' shares are summed, and
    /// `prior[g][b]` (the question's share, known exactly) is added. The
    /// blocks of `pinned` (one list per KV head, or one for all) join the
    /// chosen. Also returns, per KV head and row, the share the chosen
    /// blocks hold.
    pub(crate) fn candidates(
        &self,
        rows: &[f32],
        (kv_heads, scale): (usize, f32),
        (prior, pinned): (Option<&[Vec<f32>]>, &[Vec<usize>]),
        count: usize,
    ) -> Candidates {
        let blocks = self.blocks();
        if blocks == 0 || kv_heads == 0 {
            return Candidates {
                blocks: vec![Vec::new(); kv_heads],
                shares: vec![Vec::new(); kv_heads],
            };
        }
        let d = self.width / (kv_heads * 2);
        let m = rows.len() / (kv_heads * d);
        let (blocks, shares) = (0..kv_heads)
            .into_par_iter()
            .map(|g| {
                let mut rates = vec![vec![0f32; blocks]; m];
                let mut total = match prior {
                    Some(prior) => prior[g].clone(),
                    None => vec![0f32; blocks],
                };
                for (q, rates) in rows[g * m * d..(g + 1) * m * d]
                    .chunks_exact(d)
                    .zip(&mut rates)
                {
                    self.estimates(g, q, scale, rates);
                    let best = rates.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for rate in rates.iter_mut() {
                        *rate = ((*rate - best) * scale).exp();
                        sum += *rate;
                    }
                    for (rate, total) in rates.iter_mut().zip(&mut total) {
                        *rate /= sum;
                        *total += *rate;
                    }
                }
                let mut chosen = top_k(&total, count);
                if let Some(pins) = pinned.get(g).or(pinned.first()) {
                    chosen.extend(pins.iter().filter(|&&b| b < blocks));
                    chosen.sort_unstable();
                    chosen.dedup();
                }
                let shares = rates
                    .iter()
                    .map(|rates| chosen.iter().map(|&b| rates[b]).sum::<f32>())
                    .collect::<Vec<f32>>();
                (chosen, shares)
            })
            .unzip();
        Candidates { blocks, shares }
    }

    /// Per block, the estimated log-attention (over `scale`) `q` gives the
    /// keys of KV head `g` in it: `q.mean + scale/2 * sum_c q_c^2 var_c`.
    fn estimates(&self, g: usize, q: &[f32], scale: f32, out: &mut [f32]) {
        let d = q.len();
        let half_scaled_square: Vec<f32> = q.iter().map(|x| 0.5 * scale * x * x).collect();
        for (b, x) in out.iter_mut().enumerate() {
            let at = b * self.width + g * 2 * d;
            *x = dot(q, &self.moments[at..at + d])
                + dot(&half_scaled_square, &self.moments[at + d..at + 2 * d]);
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.moments.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::attention::reference::{dot_slow, random};

    /// `d` uniform values in `[-1, 1)` from `seed`.
    fn vector(d: usize, seed: u64) -> Vec<f32> {
        random((1, 1, 1, d), seed, 1.0)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn the_estimate_is_exact_for_a_block_of_equal_keys_and_tracks_spread_ones() {
        let (kv_heads, bs, d, scale) = (2, 16, 8, 0.35);
        let q = vector(d, 50);
        // Block 0: sixteen copies of one key; block 1: keys spread around it.
        let key = random((1, kv_heads, 1, d), 51, 1.0);
        let same = key.broadcast_as((1, kv_heads, bs, d)).unwrap();
        let spread = (same.clone() + random((1, kv_heads, bs, d), 52, 0.8)).unwrap();
        let mut moments = KeyMoments::default();
        moments.push(&same.contiguous().unwrap()).unwrap();
        moments.push(&spread).unwrap();
        assert_eq!(moments.blocks(), 2);
        let mut estimate = vec![0f32; 2];
        for g in 0..kv_heads {
            moments.estimates(g, &q, scale, &mut estimate);
            let keys = |t: &Tensor| t.get(0).unwrap().get(g).unwrap().to_vec2::<f32>().unwrap();
            // log sum_t exp(s q.k_t) = log bs + s * estimate when exact.
            let log_mass = |keys: &[Vec<f32>]| {
                keys.iter()
                    .map(|k| (scale * dot_slow(&q, k)).exp())
                    .sum::<f32>()
                    .ln()
            };
            let exact = log_mass(&keys(&same));
            #[allow(clippy::cast_precision_loss)]
            let log_bs = (bs as f32).ln();
            assert!((log_bs + scale * estimate[0] - exact).abs() < 1e-4);
            // Spread keys: within a few tenths in log space, and the variance
            // term pulls the estimate toward the truth.
            let exact = log_mass(&keys(&spread));
            let mean_only = log_bs
                + scale * {
                    let mean = &moments.moments[moments.width + g * 2 * d..][..d];
                    dot_slow(&q, mean)
                };
            let estimated = log_bs + scale * estimate[1];
            assert!((estimated - exact).abs() < 0.3, "{estimated} {exact}");
            assert!(
                (estimated - exact).abs() <= (mean_only - exact).abs(),
                "{estimated} {mean_only} {exact}"
            );
        }
    }

    #[test]
    fn a_block_holding_keys_along_the_query_or_the_prior_is_chosen() {
        // Eight blocks of small random keys; block 5 of KV head 1 holds keys
        // along its rows' query. The prior favours block 2 for every head.
        let (kv_heads, bs, d, m) = (2, 4, 8, 3);
        let direction = vector(d, 60);
        let mut moments = KeyMoments::default();
        for b in 0..8 {
            let mut keys = random((1, kv_heads, bs, d), 61 + b, 0.1)
                .squeeze(0)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            if b == 5 {
                for key in &mut keys[1] {
                    *key = direction.iter().map(|x| x * 3.0).collect();
                }
            }
            let flat: Vec<f32> = keys.into_iter().flatten().flatten().collect();
            moments
                .push(&Tensor::from_vec(flat, (1, kv_heads, bs, d), &Device::Cpu).unwrap())
                .unwrap();
        }
        let rows: Vec<f32> = (0..kv_heads * m).flat_map(|_| direction.clone()).collect();
        let picked = moments.candidates(&rows, (kv_heads, 0.35), (None, &[]), 1);
        assert_eq!(picked.blocks[1], [5], "{picked:?}");
        assert!(picked.shares[1].iter().all(|&s| s > 0.5), "{picked:?}");
        let mut prior = vec![vec![0f32; 8]; kv_heads];
        for head in &mut prior {
            head[2] = 10.0;
        }
        let picked = moments.candidates(&rows, (kv_heads, 0.35), (Some(&prior), &[]), 2);
        assert_eq!(picked.blocks[1], [2, 5], "{picked:?}");
        assert!(picked.blocks[0].contains(&2), "{picked:?}");
        // Pinned blocks join the chosen, and their estimated share with
        // them: one list for all heads, or one per head; a block past the
        // last is ignored.
        let alone = moments.candidates(&rows, (kv_heads, 0.35), (None, &[]), 1);
        let pinned = moments.candidates(&rows, (kv_heads, 0.35), (None, &[vec![0, 7, 8]]), 1);
        assert_eq!(pinned.blocks[1], [0, 5, 7], "{pinned:?}");
        let mut head_0 = alone.blocks[0].clone();
        head_0.extend([0, 7]);
        head_0.sort_unstable();
        head_0.dedup();
        assert_eq!(pinned.blocks[0], head_0, "{pinned:?}");
        for (with, without) in pinned
            .shares
            .iter()
            .flatten()
            .zip(alone.shares.iter().flatten())
        {
            assert!(with > without, "{with} {without}");
        }
        let per_head = moments.candidates(&rows, (kv_heads, 0.35), (None, &[vec![3], vec![4]]), 1);
        assert!(per_head.blocks[0].contains(&3), "{per_head:?}");
        assert_eq!(per_head.blocks[1], [4, 5], "{per_head:?}");
        let every = moments.candidates(&rows, (kv_heads, 0.35), (None, &[]), 20);
        assert_eq!(every.blocks[0], (0..8).collect::<Vec<_>>());
        for share in every.shares.iter().flatten() {
            assert!((share - 1.0).abs() < 1e-5, "{share}");
        }
    }
}

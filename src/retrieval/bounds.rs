//! Per block and KV head, the smallest and largest value of each key
//! channel. A query `q` can give no key of the block a logit above
//! `sum_c max(q_c * low_c, q_c * high_c)` (Quest's bound), so these bounds
//! rank the blocks for `attention_mass` scoring without reading their keys:
//! with `mass_candidates`, only the best-bounded blocks' keys are read, and
//! a retrieval's cost stops growing with the context.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::scores::dot;
use super::top_k;

/// The blocks whose keys a retrieval reads.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidates {
    /// Per KV head, the blocks, ascending.
    pub blocks: Vec<Vec<usize>>,
    /// Per KV head and row, the share of the row's attention the candidates
    /// hold by the bounds' estimate: their masses, read over their keys
    /// alone, are scaled by it, so that candidates do not gain the share the
    /// other blocks would have taken.
    pub shares: Vec<Vec<f32>>,
}

/// Channel bounds of every block's keys, in block order.
#[derive(Debug, Default, Clone)]
pub(crate) struct KeyBounds {
    /// Per block, per KV head: `d` lows, then `d` highs.
    bounds: Vec<f32>,
    /// Values per block: `kv_heads * 2 * d`, once a block is in.
    width: usize,
}

impl KeyBounds {
    /// Files the bounds of a new block's keys, `(1, kv_heads, block_size,
    /// d)` in any float dtype, on any device (two small reductions cross to
    /// the host).
    pub(crate) fn push(&mut self, keys: &Tensor) -> Result<()> {
        let keys = keys.to_dtype(DType::F32)?.squeeze(0)?;
        let (kv_heads, _, d) = keys.dims3()?;
        let lows = keys.min(1)?.to_vec2::<f32>()?;
        let highs = keys.max(1)?.to_vec2::<f32>()?;
        for (low, high) in lows.iter().zip(&highs) {
            self.bounds.extend_from_slice(low);
            self.bounds.extend_from_slice(high);
        }
        self.width = kv_heads * 2 * d;
        Ok(())
    }

    /// Blocks filed.
    pub(crate) fn blocks(&self) -> usize {
        self.bounds.len().checked_div(self.width).unwrap_or(0)
    }

    /// Per KV head, the `count` blocks (ascending) whose keys may take the
    /// most attention from that head's rows: `rows` is `(kv_heads, m, d)`
    /// flattened. Each row rates the blocks by `exp(scale * (bound - best
    /// bound))`, its bound on a block's largest logit against the best
    /// block's, and the rows' rates are summed, so that every row (a query
    /// head) has one vote, as in `attention_mass`. Also returns, per KV head
    /// and row, the candidates' share of the row's rates: the estimate of
    /// how much of the row's attention they hold.
    pub(crate) fn candidates(
        &self,
        rows: &[f32],
        kv_heads: usize,
        scale: f32,
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
                let mut total = vec![0f32; blocks];
                for (q, rates) in rows[g * m * d..(g + 1) * m * d]
                    .chunks_exact(d)
                    .zip(&mut rates)
                {
                    self.logit_bounds(g, q, rates);
                    let best = rates.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    for (rate, sum) in rates.iter_mut().zip(&mut total) {
                        *rate = ((*rate - best) * scale).exp();
                        *sum += *rate;
                    }
                }
                let chosen = top_k(&total, count);
                let shares = rates
                    .iter()
                    .map(|rates| {
                        let all: f32 = rates.iter().sum();
                        chosen.iter().map(|&b| rates[b]).sum::<f32>() / all
                    })
                    .collect::<Vec<f32>>();
                (chosen, shares)
            })
            .unzip();
        Candidates { blocks, shares }
    }

    /// Per block, the largest logit `q` can give a key of KV head `g` in
    /// it: per channel `max(q * low, q * high)`, summed.
    fn logit_bounds(&self, g: usize, q: &[f32], out: &mut [f32]) {
        let d = q.len();
        // `max(q * low, q * high)` is the positive part of `q` times `high`
        // plus its negative part times `low`: two dot products.
        let positive: Vec<f32> = q.iter().map(|x| x.max(0.0)).collect();
        let negative: Vec<f32> = q.iter().map(|x| x.min(0.0)).collect();
        for (b, x) in out.iter_mut().enumerate() {
            let at = b * self.width + g * 2 * d;
            *x = dot(&negative, &self.bounds[at..at + d])
                + dot(&positive, &self.bounds[at + d..at + 2 * d]);
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bounds.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::attention::reference::random;

    #[test]
    fn the_bound_is_never_below_a_blocks_largest_logit_and_met_by_its_keys_box() {
        let (kv_heads, bs, d) = (2, 8, 16);
        let mut bounds = KeyBounds::default();
        let blocks: Vec<Tensor> = (0..5)
            .map(|i| random((1, kv_heads, bs, d), 40 + i, 1.5))
            .collect();
        for keys in &blocks {
            bounds.push(keys).unwrap();
        }
        assert_eq!(bounds.blocks(), 5);
        let q = random((1, 1, 1, d), 50, 2.0)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut bound = vec![0f32; 5];
        for g in 0..kv_heads {
            bounds.logit_bounds(g, &q, &mut bound);
            for (b, keys) in blocks.iter().enumerate() {
                let keys = keys
                    .get(0)
                    .unwrap()
                    .get(g)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let largest = keys
                    .iter()
                    .map(|k| k.iter().zip(&q).map(|(k, q)| k * q).sum::<f32>())
                    .fold(f32::NEG_INFINITY, f32::max);
                let bound = bound[b];
                assert!(
                    bound >= largest - 1e-4,
                    "block {b} head {g}: {bound} < {largest}"
                );
                // The bound is met by a key at the box's corner that `q`
                // points to: no looser than the box allows.
                let corner: f32 = (0..d)
                    .map(|c| {
                        let column = keys.iter().map(|k| k[c]);
                        let pick = if q[c] >= 0.0 {
                            column.fold(f32::NEG_INFINITY, f32::max)
                        } else {
                            column.fold(f32::INFINITY, f32::min)
                        };
                        q[c] * pick
                    })
                    .sum();
                assert!((bound - corner).abs() < 1e-4, "{bound} {corner}");
            }
        }
    }

    #[test]
    fn a_block_holding_a_key_along_the_query_is_its_heads_first_candidate() {
        // Eight blocks of small random keys; block 5 of KV head 1 holds one
        // key along the query of that head's rows.
        let (kv_heads, bs, d, m) = (2, 4, 8, 3);
        let direction = random((1, 1, 1, d), 60, 1.0)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut bounds = KeyBounds::default();
        for b in 0..8 {
            let mut keys = random((1, kv_heads, bs, d), 61 + b, 0.1)
                .squeeze(0)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            if b == 5 {
                keys[1][2] = direction.iter().map(|x| x * 4.0).collect();
            }
            let flat: Vec<f32> = keys.into_iter().flatten().flatten().collect();
            bounds
                .push(&Tensor::from_vec(flat, (1, kv_heads, bs, d), &Device::Cpu).unwrap())
                .unwrap();
        }
        let rows: Vec<f32> = (0..kv_heads * m).flat_map(|_| direction.clone()).collect();
        let picked = bounds.candidates(&rows, kv_heads, 0.35, 1).blocks;
        assert_eq!(picked[1], [5], "{picked:?}");
        assert_eq!(picked[0].len(), 1);
        assert_eq!(
            bounds.candidates(&rows, kv_heads, 0.35, 20).blocks[0],
            (0..8).collect::<Vec<_>>()
        );
    }
}

//! Slow, obviously correct twins of the fast attention code, written out
//! from the method's definition one query and one key at a time. Tests
//! compare the fast paths against them; they are not for serving.

use candle_core::{DType, Device, Tensor};

use super::rope::{rotate_slow, rotate_slow_fractional, Rotary};
use crate::config::{Policy, Positions};

/// What a layer's memory held when an execution block was read.
#[derive(Debug, Clone, Copy)]
pub struct MemoryState<'a> {
    /// Position of the execution block's first query.
    pub p0: usize,
    /// Sinks held.
    pub init: usize,
    /// Position of each formed block's first token; a block holds
    /// `block_size` tokens from there (blocks may overlap).
    pub block_starts: &'a [usize],
    /// Position of the oldest token not behind a block.
    pub recent_start: usize,
    /// Blocks retrieved: none, one list for every head, or one per KV head.
    pub retrieved: &'a [Vec<usize>],
}

impl MemoryState<'static> {
    /// Every past token attended, for queries from `p0` on: full attention
    /// with Q-LLM's positions (the window exact, the rest at distance
    /// `n_local - 1` with `fixed` positions), what retrieving every block
    /// gives.
    pub fn every_token(p0: usize) -> Self {
        Self {
            p0,
            init: 0,
            block_starts: &[],
            recent_start: 0,
            retrieved: &[],
        }
    }
}

/// Q-LLM's attention for one execution block, written out from the
/// method's definition given the blocks retrieved (`retrieved`: one list
/// for every head, or one per KV head, ascending). Query `pos` of KV head
/// `g` sees key `j <= pos` at window positions when `pos - j < n_local`;
/// older keys it sees as memory, in this order: the sinks, the tokens of
/// each block `g` retrieved (all `block_size` of them, so a token of two
/// overlapping retrieved blocks is seen twice), the tokens not yet behind
/// a block. Memory keys sit at distance `n_local - 1` (`Fixed`) or at
/// their rank in that list (`Ordered`; `Interpolated` spreads the ranks
/// evenly over the table's room beside the window where they need more),
/// with the window right after them.
pub fn reference_attention(
    config: &Policy,
    rope: &dyn Rotary,
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    memory: &MemoryState<'_>,
    softmax_scale: f32,
) -> Vec<f32> {
    let MemoryState {
        p0,
        init,
        block_starts,
        recent_start,
        retrieved,
    } = *memory;
    let (_, heads, e, d) = q.dims4().unwrap();
    let kv_heads = keys.dim(1).unwrap();
    let group = heads / kv_heads;
    let end = p0 + e;
    let (n_local, bs) = (config.n_local, config.block_size);
    let picks_of = |g: usize| -> &[usize] {
        match retrieved {
            [] => &[],
            [shared] => shared,
            per_head => &per_head[g],
        }
    };
    // Each KV head's memory keys, in order: older than every query's window.
    let older = end.saturating_sub(n_local);
    let memory: Vec<Vec<usize>> = (0..kv_heads)
        .map(|g| {
            let blocks = picks_of(g)
                .iter()
                .flat_map(|&b| block_starts[b]..block_starts[b] + bs);
            (0..init)
                .chain(blocks)
                .chain(recent_start..older)
                .filter(|&j| j < older)
                .collect()
        })
        .collect();
    let local_start = recent_start.max((p0 + 1).saturating_sub(n_local));
    // Interpolated: memory keys over the positions the table leaves beside
    // the window (`end - local_start` keys), where their ranks need more.
    let room = rope.max_positions() - (end - local_start);
    let n_memory = memory[0].len();
    let squeezed = config.positions == Positions::Interpolated && n_memory > room;
    let base = match config.positions {
        Positions::Fixed => 0,
        Positions::Ordered => n_memory,
        Positions::Interpolated => n_memory.min(room),
    };
    let n = keys.dim(2).unwrap();
    let raw = rows(keys);
    let vals = rows(values);
    // Window keys at window positions.
    let k_window = rows(
        &rotate_slow(
            rope,
            keys,
            &(0..n)
                .map(|j| base + j.saturating_sub(local_start))
                .collect::<Vec<_>>(),
        )
        .unwrap(),
    );
    // Memory keys at their rank, entry by entry.
    let k_ranked: Vec<Vec<Vec<f32>>> = (0..kv_heads)
        .map(|g| {
            if memory[g].is_empty() || config.positions == Positions::Fixed {
                return Vec::new();
            }
            let index: Vec<u32> = memory[g]
                .iter()
                .map(|&j| u32::try_from(j).expect("a test-sized position"))
                .collect();
            let index = Tensor::new(index, &Device::Cpu).unwrap();
            let entries = keys
                .narrow(1, g, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .index_select(&index, 2)
                .unwrap();
            let rotated = if squeezed {
                #[allow(clippy::cast_precision_loss)]
                let at: Vec<f32> = (0..memory[g].len())
                    .map(|r| r as f32 * room as f32 / n_memory as f32)
                    .collect();
                rotate_slow_fractional(rope, &entries, &at).unwrap()
            } else {
                rotate_slow(rope, &entries, &(0..memory[g].len()).collect::<Vec<_>>()).unwrap()
            };
            rows(&rotated).swap_remove(0)
        })
        .collect();
    let window_at: Vec<usize> = (p0..end).map(|p| base + p - local_start).collect();
    let q_window = rows(&rotate_slow(rope, q, &window_at).unwrap());
    let q_far = rows(&rotate_slow(rope, q, &vec![n_local - 1; e]).unwrap());
    let mut out = vec![0f32; heads * e * d];
    for h in 0..heads {
        let g = h / group;
        for i in 0..e {
            let pos = p0 + i;
            let mut seen = Vec::new();
            for (rank, &j) in memory[g].iter().enumerate() {
                if j + n_local > pos {
                    continue;
                }
                let score = match config.positions {
                    Positions::Fixed => dot_slow(&q_far[h][i], &raw[g][j]),
                    Positions::Ordered | Positions::Interpolated => {
                        dot_slow(&q_window[h][i], &k_ranked[g][rank])
                    }
                };
                seen.push((j, score * softmax_scale));
            }
            let window = (pos + 1).saturating_sub(n_local);
            for (j, key) in k_window[g].iter().enumerate().take(pos + 1).skip(window) {
                seen.push((j, dot_slow(&q_window[h][i], key) * softmax_scale));
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

/// The attention mass query rows give each block, written out: per KV
/// head `g` (of `keys`, `(1, kv_heads, blocks * block_size, d)`) and row
/// `r` (of `rows`, `(kv_heads, m, d)`), the row's softmax over every key,
/// weighted by `weights[r % weights.len()]` and summed per block.
pub fn attention_mass_slow(
    keys: &Tensor,
    rows: &Tensor,
    block_size: usize,
    weights: &[f32],
    scale: f32,
) -> Vec<Vec<f32>> {
    let k = keys.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
    let q = rows.to_vec3::<f32>().unwrap();
    k.iter()
        .zip(&q)
        .map(|(k, q)| {
            let mut mass = vec![0f32; k.len() / block_size];
            for (r, row) in q.iter().enumerate() {
                let logits: Vec<f32> = k.iter().map(|key| dot_slow(row, key) * scale).collect();
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
                for (t, l) in logits.iter().enumerate() {
                    mass[t / block_size] += weights[r % weights.len()] * (l - max).exp() / sum;
                }
            }
            mass
        })
        .collect()
}

/// [`attention_mass_slow`] with `mass_candidates`, written out: per KV head
/// `g` and row, a block's estimate is `row . mean + scale / 2 * sum_c row_c^2
/// var_c` over its keys' per-channel mean and variance; each row splits one
/// unit among the blocks in proportion to `exp(scale * estimate)`; the rows'
/// splits summed, plus `prior[g]`, rank the blocks, and the `count` best,
/// with the blocks of `pinned[g]` (or `pinned[0]` for every head), are the
/// head's candidates. Each row's softmax then runs over the candidates'
/// keys only, scaled by the candidates' part of the row's split (weight 1).
/// Returns the candidates (ascending) and the scores of every block (0
/// outside the candidates).
pub fn candidate_attention_mass_slow(
    keys: &Tensor,
    rows: &Tensor,
    (block_size, scale): (usize, f32),
    (prior, pinned): (Option<&[Vec<f32>]>, &[Vec<usize>]),
    count: usize,
) -> (Vec<Vec<usize>>, Vec<Vec<f32>>) {
    let k = keys.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
    let q = rows.to_vec3::<f32>().unwrap();
    let mut all_candidates = Vec::new();
    let mut all_scores = Vec::new();
    for (g, (k, q)) in k.iter().zip(&q).enumerate() {
        let blocks: Vec<&[Vec<f32>]> = k.chunks(block_size).collect();
        #[allow(clippy::cast_precision_loss)]
        let estimate = |row: &[f32], block: &[Vec<f32>]| -> f32 {
            let n = block.len() as f32;
            (0..row.len())
                .map(|c| {
                    let mean = block.iter().map(|key| key[c]).sum::<f32>() / n;
                    let var = block.iter().map(|key| (key[c] - mean).powi(2)).sum::<f32>() / n;
                    row[c] * mean + 0.5 * scale * row[c] * row[c] * var
                })
                .sum()
        };
        let mut rank = prior.map_or_else(|| vec![0f32; blocks.len()], |p| p[g].clone());
        let mut splits = Vec::new();
        for row in q {
            let estimates: Vec<f32> = blocks.iter().map(|b| estimate(row, b)).collect();
            let best = estimates.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let rates: Vec<f32> = estimates
                .iter()
                .map(|e| ((e - best) * scale).exp())
                .collect();
            let sum: f32 = rates.iter().sum();
            let split: Vec<f32> = rates.iter().map(|r| r / sum).collect();
            for (r, part) in rank.iter_mut().zip(&split) {
                *r += part;
            }
            splits.push(split);
        }
        let mut order: Vec<usize> = (0..blocks.len()).collect();
        order.sort_by(|&a, &b| rank[b].total_cmp(&rank[a]).then(a.cmp(&b)));
        let mut candidates = order[..count.min(order.len())].to_vec();
        if let Some(pins) = pinned.get(g).or(pinned.first()) {
            for &b in pins {
                if b < blocks.len() && !candidates.contains(&b) {
                    candidates.push(b);
                }
            }
        }
        candidates.sort_unstable();
        let mut mass = vec![0f32; blocks.len()];
        for (row, split) in q.iter().zip(&splits) {
            let share: f32 = candidates.iter().map(|&b| split[b]).sum();
            let logits: Vec<(usize, f32)> = candidates
                .iter()
                .flat_map(|&b| blocks[b].iter().map(move |key| (b, key)))
                .map(|(b, key)| (b, dot_slow(row, key) * scale))
                .collect();
            let max = logits.iter().map(|l| l.1).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = logits.iter().map(|l| (l.1 - max).exp()).sum();
            for (b, l) in logits {
                mass[b] += share * (l - max).exp() / sum;
            }
        }
        all_candidates.push(candidates);
        all_scores.push(mass);
    }
    (all_candidates, all_scores)
}

/// A tensor of uniform values in `[-scale, scale)` from `seed`
/// (xorshift), the same on every machine.
pub fn random(shape: (usize, usize, usize, usize), seed: u64, scale: f64) -> Tensor {
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

/// Causal attention written out: query `i` of the last `l` of `n` positions
/// sees keys `0..=n - l + i`; query head `h` reads KV head `h / group`.
/// Returns `(1, heads, l, d)` flattened.
pub fn causal_attention_slow(q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32) -> Vec<f32> {
    let (_, heads, l, d) = q.dims4().unwrap();
    let (_, kv_heads, n, _) = k.dims4().unwrap();
    let (q, k, v) = (rows(q), rows(k), rows(v));
    let group = heads / kv_heads;
    let mut out = vec![0f32; heads * l * d];
    for h in 0..heads {
        for i in 0..l {
            let seen = n - l + i + 1;
            let logits: Vec<f32> = (0..seen)
                .map(|j| dot_slow(&q[h][i], &k[h / group][j]) * softmax_scale)
                .collect();
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            let total: f32 = logits.iter().map(|s| (s - max).exp()).sum();
            let row = &mut out[(h * l + i) * d..(h * l + i + 1) * d];
            for (j, s) in logits.iter().enumerate() {
                let w = (s - max).exp() / total;
                for (o, x) in row.iter_mut().zip(&v[h / group][j]) {
                    *o += w * x;
                }
            }
        }
    }
    out
}

/// The rows of a `(1, h, t, d)` tensor as f32, `[h][t][d]`.
fn rows(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
    t.squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec3()
        .unwrap()
}

/// The largest absolute elementwise difference of two tensors of one shape.
pub fn tensor_max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The plain dot product.
pub fn dot_slow(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Asserts that two equally long slices agree within `tolerance`.
pub fn assert_close(got: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(got.len(), expected.len());
    for (a, b) in got.iter().zip(expected) {
        assert!((a - b).abs() < tolerance, "{got:?} vs {expected:?}");
    }
}

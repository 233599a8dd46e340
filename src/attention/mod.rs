//! Attention math, in f32 whatever the model's dtype: one grouped-query
//! softmax kernel that both dense attention and Q-LLM's two-stage attention
//! run, the masks they share, rotation, and slow written-out twins of each
//! ([`mod@reference`]) that the fast code is tested against.

pub mod dense;
pub mod lanes;
pub mod mask;
pub mod q8;
pub mod reference;
pub mod rope;
pub mod softmax;

use candle_core::{Result, Tensor};

pub use dense::causal_attention;
pub use mask::{CausalMasks, MaskCache};
pub use q8::Q8Rows;
pub use rope::{positions, rotate_f32, rotate_f32_fractional, RopeTable, Rotary};

/// Grouped-query softmax attention over keys given in parts, all f32.
///
/// Each part is `(q, k)`: `q` is `(kv_heads, group * l, d)` (the query
/// heads sharing a key head stacked), `k` is `(kv_heads, n_i, d)`. The
/// parts' logits sit side by side in one softmax, against `values`
/// (`(kv_heads, sum n_i, d)`, in the same order). `mask` is `(l, sum n_i)`,
/// added to every head's logits after scaling. Returns the output
/// `(kv_heads, group * l, d)` and the probabilities `(kv_heads, group * l,
/// sum n_i)`.
pub fn grouped_attention(
    parts: &[(&Tensor, &Tensor)],
    values: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let logits = parts
        .iter()
        .map(|(q, k)| q.matmul(&k.t()?))
        .collect::<Result<Vec<_>>>()?;
    let probs = softmax::scaled_masked_softmax(&logits, mask, scale)?;
    Ok((probs.matmul(values)?, probs))
}

/// Attention each of the keys `columns` received, summed over the `l`
/// queries of each query head: `probs` is `(kv_heads, group * l, n)` as
/// [`grouped_attention`] returns it; the result is one row of
/// `columns.len()` sums per query head (`kv_heads * group` rows). On the
/// CPU one pass over the rows; elsewhere [`received_by_tensors`].
pub fn received(
    probs: &Tensor,
    l: usize,
    columns: std::ops::Range<usize>,
) -> Result<Vec<Vec<f32>>> {
    if !probs.device().is_cpu() || !probs.is_contiguous() {
        return received_by_tensors(probs, l, columns);
    }
    let (kv_heads, rows, n) = probs.dims3()?;
    let (storage, layout) = probs.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(p)) = &*storage else {
        return received_by_tensors(probs, l, columns.clone());
    };
    let p = &p[layout.start_offset()..][..probs.elem_count()];
    let heads = kv_heads * rows / l;
    let mut sums = vec![vec![0f32; columns.len()]; heads];
    for (row, probs) in p.chunks_exact(n).enumerate() {
        for (s, &x) in sums[row / l].iter_mut().zip(&probs[columns.clone()]) {
            *s += x;
        }
    }
    Ok(sums)
}

/// [`received`] as tensor ops (any device, and its reference).
pub fn received_by_tensors(
    probs: &Tensor,
    l: usize,
    columns: std::ops::Range<usize>,
) -> Result<Vec<Vec<f32>>> {
    let (kv_heads, rows, _) = probs.dims3()?;
    probs
        .narrow(2, columns.start, columns.len())?
        .contiguous()?
        .reshape((kv_heads * rows / l, l, columns.len()))?
        .sum(1)?
        .to_vec2()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::reference::{assert_close, random};

    #[test]
    fn received_attention_is_summed_per_query_head_as_the_tensor_ops_sum_it() {
        // 2 KV heads of 3 query heads, 4 queries each, 10 keys; keys 6..9.
        let probs = random((1, 2, 12, 10), 61, 1.0).squeeze(0).unwrap();
        let fast = received(&probs, 4, 6..9).unwrap();
        let slow = received_by_tensors(&probs, 4, 6..9).unwrap();
        assert_eq!((fast.len(), fast[0].len()), (6, 3));
        assert_close(&fast.concat(), &slow.concat(), 1e-6);
        // Written out for query head 4 (KV head 1, second of its group),
        // key 7: rows 4..8 of KV head 1.
        let p = probs.to_vec3::<f32>().unwrap();
        let want: f32 = (4..8).map(|r| p[1][r][7]).sum();
        assert!((fast[4][1] - want).abs() < 1e-6);
    }
}

//! Full causal attention of one sequence: the hook's `dense` mode, and the
//! reference the other modes are measured against.

use candle_core::{DType, Result, Tensor};

use super::grouped_attention;
use super::mask::CausalMasks;

/// Causal attention of one sequence.
///
/// `q` is `(1, heads, l, d)`; `k` and `v` are `(1, kv_heads, n, d)` with the
/// queries being the last `l` of the `n` positions, so query `i` sees keys
/// `0..=n - l + i`. Grouped-query attention maps query head `h` to key head
/// `h / (heads / kv_heads)` without repeating `k` or `v`. Scores, softmax
/// and sums are f32; the result has `q`'s dtype and shape.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    masks: &CausalMasks,
) -> Result<Tensor> {
    let (_, heads, l, d) = q.dims4()?;
    let (_, kv_heads, n, _) = k.dims4()?;
    if heads % kv_heads != 0 || l > n {
        candle_core::bail!(
            "causal_attention: q {:?} does not fit k {:?}",
            q.shape(),
            k.shape()
        );
    }
    let group = heads / kv_heads;
    let out_dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.reshape((kv_heads, group * l, d))?;
    let k = k.to_dtype(DType::F32)?.squeeze(0)?;
    let v = v.to_dtype(DType::F32)?.squeeze(0)?;
    let mask = if l > 1 {
        Some(masks.get(l, n, q.device())?)
    } else {
        None
    };
    let (out, _) = grouped_attention(&[(&q, &k)], &v, mask.as_ref(), softmax_scale)?;
    out.reshape((1, heads, l, d))?.to_dtype(out_dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::reference::{causal_attention_slow, max_abs_diff, random};

    #[test]
    fn causal_attention_matches_the_written_out_one() {
        let masks = CausalMasks::default();
        // 6 query heads over 2 KV heads; 5 new queries after 7 past tokens,
        // then a single decode query.
        for l in [5, 1] {
            let q = random((1, 6, l, 8), 1, 1.5);
            let k = random((1, 2, 12, 8), 2, 1.5);
            let v = random((1, 2, 12, 8), 3, 1.0);
            let fast = causal_attention(&q, &k, &v, 0.35, &masks).unwrap();
            let slow = causal_attention_slow(&q, &k, &v, 0.35);
            let diff = max_abs_diff(&fast.flatten_all().unwrap().to_vec1().unwrap(), &slow);
            assert!(diff < 1e-5, "l = {l}: {diff}");
        }
        let err = causal_attention(
            &random((1, 5, 1, 8), 1, 1.0),
            &random((1, 2, 3, 8), 1, 1.0),
            &random((1, 2, 3, 8), 1, 1.0),
            1.0,
            &masks,
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}

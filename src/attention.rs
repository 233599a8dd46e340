//! Attention math in f32, whatever the model's dtype.

use std::sync::Mutex;

use candle_core::{DType, Device, DeviceLocation, Result, Tensor};

/// The last causal mask built, keyed by its `(l, n)` shape and device: every
/// layer of a step needs the same one, so it is built once per step, not
/// once per layer (and once more where layers change device).
#[derive(Debug, Default)]
pub struct CausalMasks(Mutex<Option<(usize, usize, DeviceLocation, Tensor)>>);

impl CausalMasks {
    /// The `(l, n)` additive mask: 0 where query `i` may see key `j`, `-inf`
    /// elsewhere, for queries that are the last `l` of `n` positions.
    pub fn get(&self, l: usize, n: usize, device: &Device) -> Result<Tensor> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cl, cn, location, mask)) = cached.as_ref() {
            if (*cl, *cn, *location) == (l, n, device.location()) {
                return Ok(mask.clone());
            }
        }
        let mask = causal_mask(l, n, device)?;
        *cached = Some((l, n, device.location(), mask.clone()));
        Ok(mask)
    }
}

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
    // (kv_heads, group * l, d): the query heads sharing a key head are stacked.
    let q = q.to_dtype(DType::F32)?.reshape((kv_heads, group * l, d))?;
    let k = k.to_dtype(DType::F32)?.squeeze(0)?;
    let v = v.to_dtype(DType::F32)?.squeeze(0)?;
    let scores = (q.matmul(&k.t()?)? * f64::from(softmax_scale))?;
    let scores = if l > 1 {
        let mask = masks.get(l, n, q.device())?;
        scores
            .reshape((kv_heads, group, l, n))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * l, n))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .reshape((1, heads, l, d))?
        .to_dtype(out_dtype)
}

fn causal_mask(l: usize, n: usize, device: &Device) -> Result<Tensor> {
    let past = n - l;
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| {
            (0..n).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (l, n), device)
}

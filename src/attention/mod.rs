//! Attention math, in f32 whatever the model's dtype: one grouped-query
//! softmax kernel that both dense attention and Q-LLM's two-stage attention
//! run, the masks they share, rotation, and slow written-out twins of each
//! ([`mod@reference`]) that the fast code is tested against.

pub mod dense;
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
    let logits = if logits.len() == 1 {
        logits.into_iter().next().expect("one part")
    } else {
        Tensor::cat(&logits, 2)?
    };
    let probs = softmax::scaled_masked_softmax(&logits, mask, scale)?;
    Ok((probs.matmul(values)?, probs))
}

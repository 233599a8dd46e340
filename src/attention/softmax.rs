//! The softmax of scaled, masked logits, the middle of every attention this
//! crate computes: on the CPU one pass per row that reads the logits once
//! and writes the probabilities once ([`scaled_masked_softmax`]); elsewhere,
//! and as its reference, the same as tensor ops
//! ([`scaled_masked_softmax_by_tensors`]).

use candle_core::{CpuStorage, Result, Storage, Tensor};
use rayon::prelude::*;

/// `softmax(scale * logits + mask)` over the last dimension, where the
/// logits are `parts` side by side (`(kv_heads, rows, n_i)` f32 each; the
/// CPU pass reads them where they are, without joining them first). `mask`
/// is `(l, sum n_i)` f32, added to row `r` of every head as its row `r % l`
/// (rows are `l` queries of `rows / l` query heads). Returns `(kv_heads,
/// rows, sum n_i)`.
pub fn scaled_masked_softmax(
    parts: &[Tensor],
    mask: Option<&Tensor>,
    scale: f32,
) -> Result<Tensor> {
    match host_softmax(parts, mask, scale)? {
        Some(probs) => Ok(probs),
        None => scaled_masked_softmax_by_tensors(parts, mask, scale),
    }
}

/// [`scaled_masked_softmax`] as tensor ops (any device).
pub fn scaled_masked_softmax_by_tensors(
    parts: &[Tensor],
    mask: Option<&Tensor>,
    scale: f32,
) -> Result<Tensor> {
    let mut logits = (Tensor::cat(parts, 2)? * f64::from(scale))?;
    if let Some(mask) = mask {
        let (kv_heads, rows, n) = logits.dims3()?;
        let l = mask.dim(0)?;
        logits = logits
            .reshape((kv_heads, rows / l, l, n))?
            .broadcast_add(mask)?
            .reshape((kv_heads, rows, n))?;
    }
    candle_nn::ops::softmax_last_dim(&logits)
}

/// The CPU pass, or `None` off the CPU.
fn host_softmax(parts: &[Tensor], mask: Option<&Tensor>, scale: f32) -> Result<Option<Tensor>> {
    let on_cpu = |t: &Tensor| t.device().is_cpu();
    if parts.is_empty() || !parts.iter().all(on_cpu) || mask.is_some_and(|m| !on_cpu(m)) {
        return Ok(None);
    }
    let parts = parts
        .iter()
        .map(Tensor::contiguous)
        .collect::<Result<Vec<_>>>()?;
    let (kv_heads, rows, _) = parts[0].dims3()?;
    let widths = parts.iter().map(|p| p.dim(2)).collect::<Result<Vec<_>>>()?;
    let n: usize = widths.iter().sum();
    let guards: Vec<_> = parts.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = Vec::with_capacity(parts.len());
    for (part, (storage, layout)) in parts.iter().zip(&guards) {
        let Storage::Cpu(CpuStorage::F32(x)) = &**storage else {
            return Ok(None);
        };
        if part.dims3()?.0 != kv_heads || part.dim(1)? != rows {
            candle_core::bail!("scaled_masked_softmax: parts of unequal rows");
        }
        slices.push(&x[layout.start_offset()..][..part.elem_count()]);
    }
    let mask = mask.map(Tensor::contiguous).transpose()?;
    let mask_guard = mask.as_ref().map(Tensor::storage_and_layout);
    let mask_rows: Option<&[f32]> = match (&mask, &mask_guard) {
        (Some(mask), Some((storage, layout))) => {
            let Storage::Cpu(CpuStorage::F32(m)) = &**storage else {
                return Ok(None);
            };
            if mask.dim(1)? != n {
                candle_core::bail!(
                    "scaled_masked_softmax: a mask of {} columns for {n}",
                    mask.dim(1)?
                );
            }
            Some(&m[layout.start_offset()..][..mask.elem_count()])
        }
        _ => None,
    };
    let l = mask_rows.map_or(1, |m| m.len() / n);
    let mut out = vec![0f32; kv_heads * rows * n];
    out.par_chunks_mut(n).enumerate().for_each(|(row, probs)| {
        let mut at = 0;
        for (x, &width) in slices.iter().zip(&widths) {
            let logits = &x[row * width..][..width];
            let probs = &mut probs[at..at + width];
            match mask_rows {
                Some(m) => {
                    let mask = &m[(row % rows % l) * n + at..][..width];
                    for ((p, &x), &m) in probs.iter_mut().zip(logits).zip(mask) {
                        *p = x * scale + m;
                    }
                }
                None => {
                    for (p, &x) in probs.iter_mut().zip(logits) {
                        *p = x * scale;
                    }
                }
            }
            at += width;
        }
        softmax_in_place(probs);
    });
    Ok(Some(Tensor::from_vec(
        out,
        (kv_heads, rows, n),
        parts[0].device(),
    )?))
}

/// Replaces `row` by its softmax. Maxima and sums are kept in eight lanes,
/// so the passes vectorise (a single running sum is one add per cycle).
fn softmax_in_place(row: &mut [f32]) {
    const LANES: usize = 8;
    let max = lane_max(row);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, p) in sums.iter_mut().zip(chunk) {
            *p = exp_nonpositive(*p - max);
            *s += *p;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for p in chunks.into_remainder() {
        *p = exp_nonpositive(*p - max);
        sum += *p;
    }
    let inv = 1.0 / sum;
    for p in row.iter_mut() {
        *p *= inv;
    }
}

/// The largest of `values` and `sum exp(scale * (v - max))`; `values` is
/// left holding the exponentials. Writing them out first lets the
/// exponential loop vectorise (a sum fed by the exponential does not), and
/// the sum runs in eight lanes.
#[inline(always)]
pub fn max_and_exp_sum(values: &mut [f32], scale: f32) -> (f32, f32) {
    const LANES: usize = 8;
    let max = lane_max(values);
    for v in values.iter_mut() {
        *v = exp_nonpositive((*v - max) * scale);
    }
    let mut sums = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &x) in sums.iter_mut().zip(chunk) {
            *s += x;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    (max, super::lanes::lane_sum(sums) + tail)
}

/// The largest of `values` (`-inf` for none), in eight lanes.
#[inline(always)]
fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = m.max(x);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `e^x` for `x <= 0` (0 below -87), within 2e-7 relative of `f32::exp`:
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2`, `e^r` by its Taylor series to the
/// 7th power, `2^n` by writing the exponent bits. Branch-free, so loops over
/// it vectorise, where `f32::exp` is a libm call per value.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN_2_HI: f32 = 0.693_145_75;
    const LN_2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.0;
    let x = x.max(-87.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN_2_HI) - n * LN_2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `n` is an integer in -126..=0, held in the low bits of `shifted`'s
    // mantissa; the bits of `2^n` are `(n + 127) << 23`: integer arithmetic
    // on the bits instead of Rust's saturating float-to-integer cast, which
    // takes extra instructions per value.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    // A select, not a branch: masked logits (`-inf`) give exactly 0.
    if below {
        0.0
    } else {
        p * two_n
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::attention::mask::causal_mask;
    use crate::attention::reference::{assert_close, random};

    #[test]
    fn the_fast_exponential_matches_the_library_one() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            #[allow(clippy::cast_precision_loss)]
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn the_cpu_pass_gives_the_tensor_ops_probabilities() {
        // 2 KV heads, 3 query heads of 5 queries each, 9 keys: the causal
        // mask of the last 5 of 9 positions, and no mask.
        // The logits in two parts of 4 and 5 columns.
        let logits = random((1, 2, 15, 9), 51, 3.0).squeeze(0).unwrap();
        let parts = [
            logits.narrow(2, 0, 4).unwrap(),
            logits.narrow(2, 4, 5).unwrap(),
        ];
        let mask = causal_mask(5, 9, &Device::Cpu).unwrap();
        for mask in [Some(&mask), None] {
            let fast = scaled_masked_softmax(&parts, mask, 0.7).unwrap();
            let slow =
                scaled_masked_softmax_by_tensors(std::slice::from_ref(&logits), mask, 0.7).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&flat(&fast), &flat(&slow), 1e-6);
            // Masked keys get nothing; each row sums to one.
            let rows = fast.to_vec3::<f32>().unwrap();
            for head in &rows {
                for (r, row) in head.iter().enumerate() {
                    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                    if mask.is_some() {
                        assert!(
                            row[9 - 5 + r % 5 + 1..].iter().all(|&p| p == 0.0),
                            "row {r}"
                        );
                    }
                }
            }
        }
    }
}

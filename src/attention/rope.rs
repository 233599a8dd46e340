//! Rotation at chosen positions, in f32, whatever dtype the model computes in
//! or keeps its RoPE tables in.
//!
//! mistral.rs builds each model's tables in a dtype of its own choosing
//! (GGUF qwen2 and qwen3: f32; GGUF llama and phi3: the compute dtype),
//! while the hook receives q/k in the compute dtype; candle's rope kernels
//! need all three to agree.
//! The hook computes attention in f32, so it rotates in f32: the input is
//! upcast and the table rows are upcast to match.

use candle_core::{DType, Device, Result, Tensor};

/// A model's rotary position embedding, as the hook needs it: the tables
/// and how dimensions are paired. The engine's embedding implements it;
/// [`RopeTable`] is a plain one for tests and benchmarks.
pub trait Rotary {
    /// `(positions, d / 2)` cosine and sine tables, in any float dtype.
    fn cos_sin(&self) -> Result<(Tensor, Tensor)>;
    /// Whether dimension `i` pairs with `i + d/2` (GPT-NeoX) rather than
    /// with `i + 1` (interleaved, GGUF llama).
    fn is_neox(&self) -> bool;
    /// Positions the tables cover.
    fn max_positions(&self) -> usize;
}

/// The standard RoPE tables, `theta_i = base^(-2i/d)`, built in f32.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
    neox: bool,
}

impl RopeTable {
    /// Tables for heads of size `d` over `positions` positions.
    pub fn new(base: f32, d: usize, positions: usize, neox: bool, device: &Device) -> Result<Self> {
        #[allow(clippy::cast_precision_loss)] // head sizes and positions
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..positions)
            .flat_map(|p| {
                (0..d / 2).map(move |i| {
                    let angle = p as f32 / base.powf(2.0 * i as f32 / d as f32);
                    (angle.cos(), angle.sin())
                })
            })
            .unzip();
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, d / 2), device)?,
            sin: Tensor::from_vec(sin, (positions, d / 2), device)?,
            neox,
        })
    }
}

impl Rotary for RopeTable {
    fn cos_sin(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.clone(), self.sin.clone()))
    }
    fn is_neox(&self) -> bool {
        self.neox
    }
    fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// `x` (`(b, h, t, d)`, any float dtype) rotated as if its `t` rows sat at
/// `positions` (`u32`, length `t`); the result is f32.
pub fn rotate_f32(rope: &dyn Rotary, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (cos, sin) = rope.cos_sin()?;
    let cos = cos.index_select(positions, 0)?.to_dtype(DType::F32)?;
    let sin = sin.index_select(positions, 0)?.to_dtype(DType::F32)?;
    if rope.is_neox() {
        candle_nn::rotary_emb::rope(&x, &cos, &sin)
    } else {
        candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
    }
}

/// [`rotate_f32`] written out, one pair of dimensions at a time: the slow
/// twin the fast kernel is checked against.
pub fn rotate_slow(rope: &dyn Rotary, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let (cos, sin) = rope.cos_sin()?;
    let cos = cos.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let sin = sin.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rotate_pairs_slow(x, rope.is_neox(), |i, j| {
        (cos[positions[i]][j], sin[positions[i]][j])
    })
}

/// `x` with the pair of dimensions `j` of row `i` turned by `turn(i, j)`,
/// a `(cos, sin)` pair: the written-out rotation both slow twins share.
fn rotate_pairs_slow(
    x: &Tensor,
    neox: bool,
    turn: impl Fn(usize, usize) -> (f32, f32),
) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = data.clone();
    for row in 0..b * h {
        for i in 0..t {
            let at = (row * t + i) * d;
            for j in 0..d / 2 {
                let (a, c) = if neox {
                    (at + j, at + j + d / 2)
                } else {
                    (at + 2 * j, at + 2 * j + 1)
                };
                let (cos, sin) = turn(i, j);
                let (x0, x1) = (data[a], data[c]);
                out[a] = x0 * cos - x1 * sin;
                out[c] = x0 * sin + x1 * cos;
            }
        }
    }
    Tensor::from_vec(out, (b, h, t, d), x.device())
}

/// `x` (`(b, h, t, d)`) rotated as if its `t` rows sat at the fractional
/// positions `at` (each below the table's last position; f32 result):
/// table row `floor(p)` turned on by the fraction of each dimension's
/// angle step (read off table rows 0 and 1), so whole positions rotate
/// exactly as the table does. Squeezes memory keys into the positions a
/// model's table covers (`positions = "interpolated"`).
pub fn rotate_f32_fractional(rope: &dyn Rotary, x: &Tensor, at: &[f32]) -> Result<Tensor> {
    let device = x.device();
    let (cos, sin) = rope.cos_sin()?;
    let half = cos.dim(1)?;
    let steps = angle_steps(&cos, &sin)?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // `at` is non-negative
    let whole: Vec<usize> = at.iter().map(|&p| p.floor() as usize).collect();
    let (mut turn_cos, mut turn_sin) = (Vec::with_capacity(at.len() * half), Vec::new());
    turn_sin.reserve(at.len() * half);
    for (&p, &n) in at.iter().zip(&whole) {
        #[allow(clippy::cast_precision_loss)]
        let fraction = p - n as f32;
        for &step in &steps {
            let (s, c) = (fraction * step).sin_cos();
            turn_cos.push(c);
            turn_sin.push(s);
        }
    }
    let turn_cos = Tensor::from_vec(turn_cos, (at.len(), half), device)?;
    let turn_sin = Tensor::from_vec(turn_sin, (at.len(), half), device)?;
    let rows = positions(whole.into_iter(), device)?;
    let cos_n = cos.index_select(&rows, 0)?.to_dtype(DType::F32)?;
    let sin_n = sin.index_select(&rows, 0)?.to_dtype(DType::F32)?;
    // cos(a + b) and sin(a + b), with `a` the whole position's angle.
    let cos = ((&cos_n * &turn_cos)? - (&sin_n * &turn_sin)?)?;
    let sin = ((&sin_n * &turn_cos)? + (&cos_n * &turn_sin)?)?;
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    if rope.is_neox() {
        candle_nn::rotary_emb::rope(&x, &cos, &sin)
    } else {
        candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
    }
}

/// Each dimension's angle per position, read off table rows 0 and 1.
fn angle_steps(cos: &Tensor, sin: &Tensor) -> Result<Vec<f32>> {
    let cos1 = cos.get(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let sin1 = sin.get(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(sin1.iter().zip(&cos1).map(|(s, c)| s.atan2(*c)).collect())
}

/// [`rotate_f32_fractional`] written out: each pair of dimensions turned by
/// `p` times its angle step, at the table's magnitude (row 0), computed
/// directly in f64.
#[allow(clippy::cast_possible_truncation)] // f64 angles back to f32 values
pub fn rotate_slow_fractional(rope: &dyn Rotary, x: &Tensor, at: &[f32]) -> Result<Tensor> {
    let (cos, sin) = rope.cos_sin()?;
    let cos = cos.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let sin = sin.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rotate_pairs_slow(x, rope.is_neox(), |i, j| {
        let step = f64::from(sin[1][j]).atan2(f64::from(cos[1][j]));
        let angle = f64::from(at[i]) * step;
        let scale = f64::from(cos[0][j]);
        ((scale * angle.cos()) as f32, (scale * angle.sin()) as f32)
    })
}

/// A `u32` position tensor from `values`.
pub fn positions(values: impl Iterator<Item = usize>, device: &Device) -> Result<Tensor> {
    let values = values
        .map(|p| u32::try_from(p).map_err(|_| candle_core::Error::Msg(format!("position {p}"))))
        .collect::<Result<Vec<u32>>>()?;
    let n = values.len();
    Tensor::from_vec(values, n, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::reference::{random, tensor_max_abs_diff};

    #[test]
    fn fast_rotation_matches_the_written_out_one_in_both_pairings() {
        let x = random((1, 2, 5, 8), 3, 1.0);
        let at = [0, 7, 3, 30, 12];
        for neox in [true, false] {
            let rope = RopeTable::new(10000.0, 8, 32, neox, &Device::Cpu).unwrap();
            let fast =
                rotate_f32(&rope, &x, &positions(at.into_iter(), &Device::Cpu).unwrap()).unwrap();
            let slow = rotate_slow(&rope, &x, &at).unwrap();
            let diff = tensor_max_abs_diff(&fast, &slow);
            assert!(diff < 1e-5, "neox {neox}: {diff}");
        }
        // Position 0 is the identity.
        let rope = RopeTable::new(10000.0, 8, 32, true, &Device::Cpu).unwrap();
        let same = rotate_slow(&rope, &x, &[0; 5]).unwrap();
        assert!(tensor_max_abs_diff(&same, &x) < 1e-7);
    }

    #[test]
    fn fractional_rotation_matches_the_direct_angle_and_the_table_at_whole_positions() {
        let x = random((1, 2, 5, 8), 4, 1.0);
        let at = [0.0, 6.5, 3.25, 29.9, 12.0];
        for neox in [true, false] {
            let rope = RopeTable::new(10000.0, 8, 32, neox, &Device::Cpu).unwrap();
            let fast = rotate_f32_fractional(&rope, &x, &at).unwrap();
            let slow = rotate_slow_fractional(&rope, &x, &at).unwrap();
            let diff = tensor_max_abs_diff(&fast, &slow);
            assert!(diff < 1e-5, "neox {neox}: {diff}");
            let table = rotate_slow(&rope, &x, &[0, 7, 3, 30, 12]).unwrap();
            let fast = rotate_f32_fractional(&rope, &x, &[0.0, 7.0, 3.0, 30.0, 12.0]).unwrap();
            assert!(tensor_max_abs_diff(&fast, &table) < 1e-5, "neox {neox}");
            // Half a step apart is not the whole position: the fraction is used.
            let half_off = rotate_f32_fractional(&rope, &x, &[0.5, 7.5, 3.5, 30.5, 12.5]);
            assert!(tensor_max_abs_diff(&half_off.unwrap(), &table) > 1e-3);
        }
    }
}

//! Rotation at chosen positions, in f32, whatever dtype the model computes in
//! or keeps its RoPE tables in.
//!
//! mistral.rs builds each model's tables in a dtype of its own choosing
//! (GGUF qwen2: f32; GGUF llama: the compute dtype), while the hook receives
//! q/k in the compute dtype; candle's rope kernels need all three to agree.
//! The hook computes attention in f32, so it rotates in f32: the input is
//! upcast and the table rows are upcast to match.

use candle_core::{DType, Device, Result, Tensor};
use mistralrs_core::layers::RotaryEmbedding;

/// `x` (`(b, h, t, d)`, any float dtype) rotated as if its `t` rows sat at
/// `positions` (`u32`, length `t`); the result is f32.
pub fn rotate_f32(rope: &RotaryEmbedding, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (cos, sin) = rope.get_cos_sin()?;
    let cos = cos.index_select(positions, 0)?.to_dtype(DType::F32)?;
    let sin = sin.index_select(positions, 0)?.to_dtype(DType::F32)?;
    if rope.is_gpt_neox() {
        candle_nn::rotary_emb::rope(&x, &cos, &sin)
    } else {
        candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
    }
}

/// A `u32` position tensor from `values`.
pub fn positions(values: impl Iterator<Item = usize>, device: &Device) -> Result<Tensor> {
    let values = values
        .map(|p| u32::try_from(p).map_err(|_| candle_core::Error::Msg(format!("position {p}"))))
        .collect::<Result<Vec<u32>>>()?;
    let n = values.len();
    Tensor::from_vec(values, n, device)
}

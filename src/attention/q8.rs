//! 8-bit rows: keys and values kept as one signed byte per value and one
//! f32 scale per row of a head (`q8_0` memory blocks).
//!
//! A row `x` of `d` values is stored as `q = round(x / s)` with `s =
//! max|x| / 127`, so every value is within `s / 2` of its original. The
//! bytes are kept offset by 128 in a `u8` tensor (candle has no `i8`
//! dtype), on whatever device the rows came from: quantizing and reading
//! back are tensor ops. For `d = 64` a row takes 68 bytes instead of 128
//! (bf16) or 256 (f32).

use candle_core::{CpuStorage, DType, Result, Storage, Tensor, D};

/// The offset that turns a signed byte into the stored `u8`.
pub const Q8_ZERO: f32 = 128.0;

/// Rows quantized to 8 bits: `values` `(.., d)` u8 (signed byte + 128) and
/// `scales` `(.., 1)` f32, one per row.
#[derive(Debug, Clone)]
pub struct Q8Rows {
    /// Signed bytes plus 128.
    pub values: Tensor,
    /// One scale per row: a value is `scale * (byte - 128)`.
    pub scales: Tensor,
}

impl Q8Rows {
    /// Quantizes the rows (the last dimension) of `x`, any float dtype.
    pub fn quantize(x: &Tensor) -> Result<Self> {
        let x = x.to_dtype(DType::F32)?;
        let largest = x.abs()?.max_keepdim(D::Minus1)?;
        // An all-zero row keeps scale 0; dividing by 1 then keeps it zero.
        let scales = (largest / 127.0)?;
        let divisor = scales.eq(0.0)?.where_cond(&scales.ones_like()?, &scales)?;
        let values = (x.broadcast_div(&divisor)?.round()?.clamp(-127.0, 127.0)?
            + f64::from(Q8_ZERO))?
        .to_dtype(DType::U8)?;
        Ok(Self { values, scales })
    }

    /// Zero rows of the given shape (`(.., d)`), on `device`.
    pub fn zeros(shape: &[usize], device: &candle_core::Device) -> Result<Self> {
        let mut scale_shape = shape.to_vec();
        *scale_shape.last_mut().expect("rows have a last dimension") = 1;
        Ok(Self {
            values: (Tensor::zeros(shape, DType::U8, device)? + f64::from(Q8_ZERO))?,
            scales: Tensor::zeros(scale_shape, DType::F32, device)?,
        })
    }

    /// The rows in f32: on the CPU in one pass over the bytes, elsewhere
    /// by [`Q8Rows::dequantize_by_tensors`].
    pub fn dequantize(&self) -> Result<Tensor> {
        if !self.values.device().is_cpu() {
            return self.dequantize_by_tensors();
        }
        let (values, scales) = (self.values.contiguous()?, self.scales.contiguous()?);
        let (value_storage, value_layout) = values.storage_and_layout();
        let (scale_storage, scale_layout) = scales.storage_and_layout();
        let (Storage::Cpu(CpuStorage::U8(bytes)), Storage::Cpu(CpuStorage::F32(row_scales))) =
            (&*value_storage, &*scale_storage)
        else {
            candle_core::bail!("Q8Rows: values must be u8 and scales f32");
        };
        let d = values.dim(D::Minus1)?;
        let bytes = &bytes[value_layout.start_offset()..][..values.elem_count()];
        let row_scales = &row_scales[scale_layout.start_offset()..][..scales.elem_count()];
        let mut out = Vec::with_capacity(bytes.len());
        dequantize_into(bytes, row_scales, d, &mut out);
        Tensor::from_vec(out, values.shape(), values.device())
    }

    /// [`Q8Rows::dequantize`] as tensor ops (any device; the CPU pass's
    /// reference).
    pub fn dequantize_by_tensors(&self) -> Result<Tensor> {
        (self.values.to_dtype(DType::F32)? - f64::from(Q8_ZERO))?.broadcast_mul(&self.scales)
    }

    /// Rows `start..start + len` along dimension `dim` (not the last).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            values: self.values.narrow(dim, start, len)?,
            scales: self.scales.narrow(dim, start, len)?,
        })
    }

    /// The rows of `pieces` side by side along `dim` (not the last).
    pub fn cat(pieces: &[Self], dim: usize) -> Result<Self> {
        let values: Vec<&Tensor> = pieces.iter().map(|p| &p.values).collect();
        let scales: Vec<&Tensor> = pieces.iter().map(|p| &p.scales).collect();
        Ok(Self {
            values: Tensor::cat(&values, dim)?,
            scales: Tensor::cat(&scales, dim)?,
        })
    }

    /// Removes dimension `dim` (of size 1).
    pub fn squeeze(&self, dim: usize) -> Result<Self> {
        Ok(Self {
            values: self.values.squeeze(dim)?,
            scales: self.scales.squeeze(dim)?,
        })
    }

    /// Writes `rows` over these rows from `start` along dimension `dim`.
    pub fn slice_set(&self, rows: &Self, dim: usize, start: usize) -> Result<()> {
        self.values
            .slice_set(&rows.values.contiguous()?, dim, start)?;
        self.scales
            .slice_set(&rows.scales.contiguous()?, dim, start)
    }

    /// A copy in buffers of its own.
    pub fn copy(&self) -> Result<Self> {
        Ok(Self {
            values: self.values.copy()?,
            scales: self.scales.copy()?,
        })
    }

    /// Bytes of the values and scales.
    pub fn bytes(&self) -> usize {
        self.values.elem_count() + self.scales.elem_count() * 4
    }
}

/// Appends the rows of `d` bytes in `bytes`, each scaled by its entry of
/// `scales`, to `out` in f32.
pub fn dequantize_into(bytes: &[u8], scales: &[f32], d: usize, out: &mut Vec<f32>) {
    for (row, &scale) in bytes.chunks_exact(d).zip(scales) {
        out.extend(row.iter().map(|&b| scale * (f32::from(b) - Q8_ZERO)));
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::attention::reference::{random, tensor_max_abs_diff};

    #[test]
    fn every_value_comes_back_within_half_its_rows_step() {
        let x = random((2, 3, 40, 16), 5, 2.0);
        // A row of zeros and a row with one large outlier.
        let x = x
            .slice_assign(
                &[0..1, 0..1, 0..1, 0..16],
                &Tensor::zeros((1, 1, 1, 16), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let q = Q8Rows::quantize(&x).unwrap();
        assert_eq!(q.values.dtype(), DType::U8);
        assert_eq!(q.scales.dims(), &[2, 3, 40, 1]);
        let back = q.dequantize().unwrap();
        let rows = x.flatten_to(2).unwrap().to_vec2::<f32>().unwrap();
        let back = back.flatten_to(2).unwrap().to_vec2::<f32>().unwrap();
        for (row, got) in rows.iter().zip(&back) {
            let step = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (want, got) in row.iter().zip(got) {
                assert!(
                    (want - got).abs() <= step / 2.0 + 1e-6,
                    "{want} -> {got}, step {step}"
                );
            }
        }
        assert!(back[0].iter().all(|&v| v == 0.0), "a zero row stays zero");
        // Each row's largest value is exact up to rounding of the scale.
        let (want, got) = (
            rows[7].iter().fold(0f32, |m, v| m.max(v.abs())),
            back[7].iter().fold(0f32, |m, v| m.max(v.abs())),
        );
        assert!((want - got).abs() <= want * 1e-6);
    }

    #[test]
    fn narrowed_rows_and_slices_are_the_rows_they_name() {
        let x = random((1, 2, 8, 4), 6, 1.0);
        let store = Q8Rows::zeros(&[1, 2, 16, 4], &Device::Cpu).unwrap();
        assert_eq!(
            store
                .dequantize()
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        store
            .slice_set(&Q8Rows::quantize(&x).unwrap(), 2, 8)
            .unwrap();
        let got = store.narrow(2, 8, 8).unwrap().dequantize().unwrap();
        let want = Q8Rows::quantize(&x).unwrap().dequantize().unwrap();
        assert_eq!(tensor_max_abs_diff(&got, &want), 0.0);
        assert_eq!(store.bytes(), 2 * 16 * 4 + 2 * 16 * 4);
    }
}

//! A growable per-layer KV buffer that can also drop its oldest tokens.

use candle_core::{Result, Tensor};

/// Granularity of buffer growth, in tokens.
const GROW_TOKENS: usize = 512;

/// Capacity, in tokens, a buffer grows to when it needs room for `needed`:
/// twice that, in steps of [`GROW_TOKENS`].
pub(crate) fn grown_capacity(needed: usize) -> usize {
    (2 * needed).next_multiple_of(GROW_TOKENS)
}

/// Rows of one layer of one sequence: a `(1, heads, capacity, d)` buffer of
/// which positions `start..start + len` are live.
#[derive(Debug, Default)]
pub struct RowBuffer {
    buffer: Option<Tensor>,
    start: usize,
    len: usize,
}

impl RowBuffer {
    /// Number of tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `rows` (`(1, heads, t, d)`). When the buffer is full the live
    /// tokens move into a fresh buffer of at least twice their count, so
    /// appends and [`Self::drop_front`] cost amortised O(t).
    pub fn append(&mut self, rows: &Tensor) -> Result<()> {
        let needed = self.len + rows.dim(2)?;
        let capacity = self.buffer.as_ref().map_or(0, |b| b.dims()[2]);
        if self.start + needed > capacity {
            let (b, h, _, d) = rows.dims4()?;
            let fresh = Tensor::zeros(
                (b, h, grown_capacity(needed), d),
                rows.dtype(),
                rows.device(),
            )?;
            if let Some(old) = self.buffer.as_ref().filter(|_| self.len > 0) {
                fresh.slice_set(&old.narrow(2, self.start, self.len)?.contiguous()?, 2, 0)?;
            }
            self.buffer = Some(fresh);
            self.start = 0;
        }
        let buffer = self.buffer.as_ref().expect("allocated above");
        buffer.slice_set(&rows.contiguous()?, 2, self.start + self.len)?;
        self.len = needed;
        Ok(())
    }

    /// Forgets the oldest `n` tokens.
    pub fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.start += n;
        self.len -= n;
    }

    /// A view of tokens `from..from + n` (relative to the oldest live
    /// token), `(1, heads, n, d)`.
    pub fn range(&self, from: usize, n: usize) -> Result<Tensor> {
        match &self.buffer {
            Some(buffer) if from + n <= self.len => buffer.narrow(2, self.start + from, n),
            _ => candle_core::bail!(
                "range({from}, {n}) out of bounds: {} tokens stored",
                self.len
            ),
        }
    }

    /// A copy of the live tokens in a buffer of its own and of their size
    /// (a kept copy may never grow; one that does moves once, as any full
    /// buffer does), so that appends to either leave the other as it was.
    pub fn fork(&self) -> Result<Self> {
        if self.len == 0 {
            return Ok(Self::default());
        }
        // A fresh buffer for the live rows: `Tensor::copy` of a view copies
        // its whole storage.
        let view = self.range(0, self.len)?;
        let fresh = Tensor::zeros(view.shape(), view.dtype(), view.device())?;
        fresh.slice_set(&view.contiguous()?, 2, 0)?;
        Ok(Self {
            buffer: Some(fresh),
            start: 0,
            len: self.len,
        })
    }

    /// Bytes held by the buffer (capacity, not length).
    pub fn bytes(&self) -> usize {
        self.buffer
            .as_ref()
            .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }
}

/// Keys and values of one layer of one sequence, token for token.
#[derive(Debug, Default)]
pub struct KvBuffer {
    keys: RowBuffer,
    values: RowBuffer,
}

impl KvBuffer {
    /// Number of tokens stored.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Forgets everything, keeping nothing allocated.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Appends `k`, `v` (`(1, kv_heads, t, d)`), amortised O(t) (see
    /// [`RowBuffer::append`]).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        if k.dim(2)? != v.dim(2)? {
            candle_core::bail!(
                "KvBuffer::append: {} keys but {} values",
                k.dim(2)?,
                v.dim(2)?
            );
        }
        self.keys.append(k)?;
        self.values.append(v)
    }

    /// Forgets the oldest `n` tokens.
    pub fn drop_front(&mut self, n: usize) {
        self.keys.drop_front(n);
        self.values.drop_front(n);
    }

    /// Views of tokens `from..from + n` (relative to the oldest live token),
    /// `(1, kv_heads, n, d)` each.
    pub fn range(&self, from: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let keys = self
            .keys
            .range(from, n)
            .map_err(|e| candle_core::Error::Msg(format!("KvBuffer::{e}")))?;
        Ok((keys, self.values.range(from, n)?))
    }

    /// Views of all stored keys and values, `(1, kv_heads, len, d)`.
    pub fn get(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.is_empty() {
            return Ok(None);
        }
        self.range(0, self.len()).map(Some)
    }

    /// A copy of the live tokens in buffers of their own (see
    /// [`RowBuffer::fork`]).
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            keys: self.keys.fork()?,
            values: self.values.fork()?,
        })
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn bytes(&self) -> usize {
        self.keys.bytes() + self.values.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tokens(from: usize, n: usize) -> Tensor {
        #[allow(clippy::cast_precision_loss)]
        let values: Vec<f32> = (from..from + n).map(|t| t as f32).collect();
        Tensor::from_vec(values, (1, 1, n, 1), &Device::Cpu).unwrap()
    }

    fn stored(buffer: &KvBuffer) -> Vec<f32> {
        let (k, _) = buffer.get().unwrap().unwrap();
        k.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn sliding_window_keeps_the_newest_tokens_in_order() {
        let mut buffer = KvBuffer::default();
        let mut next = 0;
        for step in 0..3000 {
            let n = 1 + step % 7;
            buffer.append(&tokens(next, n), &tokens(next, n)).unwrap();
            next += n;
            if buffer.len() > 600 {
                buffer.drop_front(buffer.len() - 600);
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let expected: Vec<f32> = (next - 600..next).map(|t| t as f32).collect();
        assert_eq!(stored(&buffer), expected);
        // Compaction keeps the allocation bounded by the live size.
        assert!(buffer.bytes() <= 2 * 2 * 2048 * DType::F32.size_in_bytes());
        let (k, _) = buffer.range(10, 5).unwrap();
        assert_eq!(k.dims(), &[1, 1, 5, 1]);
        assert!(buffer.range(598, 5).is_err());
    }
}

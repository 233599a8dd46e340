//! A growable per-layer KV buffer that can also drop its oldest tokens.

use candle_core::{Result, Tensor};

/// Granularity of buffer growth, in tokens.
const GROW_TOKENS: usize = 512;

/// Capacity, in tokens, a buffer grows to when it needs room for `needed`:
/// twice that, in steps of [`GROW_TOKENS`].
pub(crate) fn grown_capacity(needed: usize) -> usize {
    (2 * needed).next_multiple_of(GROW_TOKENS)
}

/// Keys and values of one layer of one sequence: `(1, kv_heads, capacity, d)`
/// buffers of which positions `start..start + len` are live.
#[derive(Debug, Default)]
pub struct KvBuffer {
    buffers: Option<(Tensor, Tensor)>,
    start: usize,
    len: usize,
}

impl KvBuffer {
    /// Number of tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything, keeping nothing allocated.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Appends `k`, `v` (`(1, kv_heads, t, d)`). When the buffers are full the
    /// live tokens move into fresh buffers of at least twice their count, so
    /// appends and [`Self::drop_front`] cost amortised O(t).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let added = k.dim(2)?;
        let needed = self.len + added;
        let capacity = self.buffers.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        if self.start + needed > capacity {
            let new_capacity = grown_capacity(needed);
            let move_live = |old: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = like.dims4()?;
                let fresh = Tensor::zeros((b, h, new_capacity, d), like.dtype(), like.device())?;
                if let Some(old) = old.filter(|_| self.len > 0) {
                    fresh.slice_set(&old.narrow(2, self.start, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(fresh)
            };
            let old = self.buffers.as_ref();
            self.buffers = Some((
                move_live(old.map(|b| &b.0), k)?,
                move_live(old.map(|b| &b.1), v)?,
            ));
            self.start = 0;
        }
        let (kb, vb) = self.buffers.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.start + self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.start + self.len)?;
        self.len = needed;
        Ok(())
    }

    /// Forgets the oldest `n` tokens.
    pub fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.start += n;
        self.len -= n;
    }

    /// Views of tokens `from..from + n` (relative to the oldest live token),
    /// `(1, kv_heads, n, d)` each.
    pub fn range(&self, from: usize, n: usize) -> Result<(Tensor, Tensor)> {
        match &self.buffers {
            Some((k, v)) if from + n <= self.len => Ok((
                k.narrow(2, self.start + from, n)?,
                v.narrow(2, self.start + from, n)?,
            )),
            _ => candle_core::bail!(
                "KvBuffer::range({from}, {n}) out of bounds: {} tokens stored",
                self.len
            ),
        }
    }

    /// Views of all stored keys and values, `(1, kv_heads, len, d)`.
    pub fn get(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.len == 0 {
            return Ok(None);
        }
        self.range(0, self.len).map(Some)
    }

    /// A copy of the live tokens in buffers of their own and of their size
    /// (a kept copy may never grow; one that does moves once, as any full
    /// buffer does), so that appends to either leave the other as it was.
    pub fn fork(&self) -> Result<Self> {
        // A fresh buffer for the live rows: `Tensor::copy` of a view copies
        // its whole storage.
        let own = |view: Tensor| -> Result<Tensor> {
            let fresh = Tensor::zeros(view.shape(), view.dtype(), view.device())?;
            fresh.slice_set(&view.contiguous()?, 2, 0)?;
            Ok(fresh)
        };
        Ok(match self.get()? {
            Some((k, v)) => Self {
                buffers: Some((own(k)?, own(v)?)),
                start: 0,
                len: self.len,
            },
            None => Self::default(),
        })
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn bytes(&self) -> usize {
        self.buffers.as_ref().map_or(0, |(k, v)| {
            (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
        })
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

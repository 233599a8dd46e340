//! A growable per-layer KV buffer.

use candle_core::{Result, Tensor};

/// Granularity of buffer growth, in tokens.
const GROW_TOKENS: usize = 512;

/// Keys and values of one layer of one sequence, `(1, kv_heads, capacity, d)`
/// buffers of which the first `len` positions are filled.
#[derive(Debug, Default)]
pub struct KvBuffer {
    buffers: Option<(Tensor, Tensor)>,
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

    /// Appends `k`, `v` (`(1, kv_heads, t, d)`), growing the buffers
    /// geometrically so appends cost amortised O(t).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let added = k.dim(2)?;
        let needed = self.len + added;
        let capacity = self.buffers.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        if needed > capacity {
            let new_capacity = needed.max(capacity * 2).next_multiple_of(GROW_TOKENS);
            let grow = |old: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = like.dims4()?;
                let fresh = Tensor::zeros((b, h, new_capacity, d), like.dtype(), like.device())?;
                if let Some(old) = old {
                    fresh.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(fresh)
            };
            let old = self.buffers.as_ref();
            self.buffers = Some((grow(old.map(|b| &b.0), k)?, grow(old.map(|b| &b.1), v)?));
        }
        let (kb, vb) = self.buffers.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok(())
    }

    /// Views of the stored keys and values, `(1, kv_heads, len, d)`.
    pub fn get(&self) -> Result<Option<(Tensor, Tensor)>> {
        match &self.buffers {
            Some((k, v)) if self.len > 0 => {
                Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)))
            }
            _ => Ok(None),
        }
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn bytes(&self) -> usize {
        self.buffers.as_ref().map_or(0, |(k, v)| {
            (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
        })
    }
}

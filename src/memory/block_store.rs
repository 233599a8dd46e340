//! The memory blocks of one layer: tensors only, no bookkeeping.

use candle_core::{Result, Tensor};

use crate::retrieval::BlockKeys;

/// Blocks per slab of a [`BlockStore`].
pub(crate) const SLAB_BLOCKS: usize = 16;

/// The memory blocks of one layer: `block_size` consecutive evicted tokens
/// each, pre-RoPE, in slabs of `SLAB_BLOCKS` (16) blocks. One allocation per
/// slab rather than per block: thousands of small long-lived buffers
/// interleaved with transient ones fragment the heap.
#[derive(Debug, Default)]
pub struct BlockStore {
    /// `(1, kv_heads, SLAB_BLOCKS * block_size, d)` keys and values.
    slabs: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl BlockStore {
    /// Blocks held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a block, `(1, kv_heads, block_size, d)` keys and values.
    pub fn push(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, heads, block_size, d) = k.dims4()?;
        let slot = self.len % SLAB_BLOCKS;
        if slot == 0 {
            let shape = (b, heads, SLAB_BLOCKS * block_size, d);
            self.slabs.push((
                Tensor::zeros(shape, k.dtype(), k.device())?,
                Tensor::zeros(shape, v.dtype(), v.device())?,
            ));
        }
        let (ks, vs) = self.slabs.last().expect("a slab with room");
        ks.slice_set(&k.contiguous()?, 2, slot * block_size)?;
        vs.slice_set(&v.contiguous()?, 2, slot * block_size)?;
        self.len += 1;
        Ok(())
    }

    /// Views of block `i`'s keys and values, `(1, kv_heads, block_size, d)`.
    pub fn get(&self, i: usize) -> Result<(Tensor, Tensor)> {
        if i >= self.len {
            candle_core::bail!("BlockStore::get({i}): {} blocks held", self.len);
        }
        let (ks, vs) = &self.slabs[i / SLAB_BLOCKS];
        let block_size = ks.dim(2)? / SLAB_BLOCKS;
        let at = (i % SLAB_BLOCKS) * block_size;
        Ok((ks.narrow(2, at, block_size)?, vs.narrow(2, at, block_size)?))
    }

    /// Keys of blocks `from..self.len()` in the storage dtype, one
    /// `(kv_heads, tokens, d)` view per slab they fall in, in block order.
    fn slab_keys(&self, from: usize) -> Result<Vec<Tensor>> {
        let mut pieces = Vec::new();
        for (i, (keys, _)) in self.slabs.iter().enumerate().skip(from / SLAB_BLOCKS) {
            let block_size = keys.dim(2)? / SLAB_BLOCKS;
            let first = from.max(i * SLAB_BLOCKS) - i * SLAB_BLOCKS;
            let filled = (self.len - i * SLAB_BLOCKS).min(SLAB_BLOCKS);
            if filled == first {
                continue;
            }
            pieces.push(
                keys.narrow(2, first * block_size, (filled - first) * block_size)?
                    .squeeze(0)?,
            );
        }
        Ok(pieces)
    }

    /// Bytes allocated, including the free slots of the last slab.
    pub fn bytes(&self) -> usize {
        self.slabs
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

impl BlockKeys for BlockStore {
    fn blocks(&self) -> usize {
        self.len
    }
    fn key_slabs(&self, from: usize) -> Result<Vec<Tensor>> {
        self.slab_keys(from)
    }
}

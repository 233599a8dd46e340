//! The memory blocks of one layer: tensors only, no bookkeeping.

use candle_core::{Result, Tensor};

use crate::attention::Q8Rows;
use crate::config::BlockStorage;
use crate::retrieval::{BlockKeys, KeySlab};

/// Blocks per slab of a [`BlockStore`].
pub(crate) const SLAB_BLOCKS: usize = 16;

/// The memory blocks of one layer: `block_size` consecutive evicted tokens
/// each, pre-RoPE, in slabs of `SLAB_BLOCKS` (16) blocks. One allocation per
/// slab rather than per block: thousands of small long-lived buffers
/// interleaved with transient ones fragment the heap.
#[derive(Debug, Default)]
pub struct BlockStore {
    slabs: Vec<Slab>,
    len: usize,
}

/// `(1, kv_heads, SLAB_BLOCKS * block_size, d)` keys and values.
#[derive(Debug)]
enum Slab {
    Float(Tensor, Tensor),
    Q8(Q8Rows, Q8Rows),
}

impl Slab {
    fn tokens(&self) -> Result<usize> {
        match self {
            Slab::Float(keys, _) => keys.dim(2),
            Slab::Q8(keys, _) => keys.values.dim(2),
        }
    }
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

    /// Appends a block, `(1, kv_heads, block_size, d)` keys and values,
    /// stored as `storage` says (every block of a store alike).
    pub fn push(&mut self, k: &Tensor, v: &Tensor, storage: BlockStorage) -> Result<()> {
        let (b, heads, block_size, d) = k.dims4()?;
        let slot = self.len % SLAB_BLOCKS;
        if slot == 0 {
            let shape = (b, heads, SLAB_BLOCKS * block_size, d);
            self.slabs.push(match storage {
                BlockStorage::Float(dtype) => Slab::Float(
                    Tensor::zeros(shape, dtype, k.device())?,
                    Tensor::zeros(shape, dtype, v.device())?,
                ),
                BlockStorage::Q8 => {
                    let shape = [b, heads, SLAB_BLOCKS * block_size, d];
                    Slab::Q8(
                        Q8Rows::zeros(&shape, k.device())?,
                        Q8Rows::zeros(&shape, v.device())?,
                    )
                }
            });
        }
        let at = slot * block_size;
        match (self.slabs.last().expect("a slab with room"), storage) {
            (Slab::Float(ks, vs), BlockStorage::Float(dtype)) if ks.dtype() == dtype => {
                ks.slice_set(&k.to_dtype(dtype)?.contiguous()?, 2, at)?;
                vs.slice_set(&v.to_dtype(dtype)?.contiguous()?, 2, at)?;
            }
            (Slab::Q8(ks, vs), BlockStorage::Q8) => {
                ks.slice_set(&Q8Rows::quantize(k)?, 2, at)?;
                vs.slice_set(&Q8Rows::quantize(v)?, 2, at)?;
            }
            _ => candle_core::bail!("BlockStore::push: a block stored as {storage:?} among others"),
        }
        self.len += 1;
        Ok(())
    }

    /// Block `i`'s keys and values, `(1, kv_heads, block_size, d)`: views in
    /// the storage dtype, or f32 for 8-bit rows.
    pub fn get(&self, i: usize) -> Result<(Tensor, Tensor)> {
        if i >= self.len {
            candle_core::bail!("BlockStore::get({i}): {} blocks held", self.len);
        }
        let slab = &self.slabs[i / SLAB_BLOCKS];
        let block_size = slab.tokens()? / SLAB_BLOCKS;
        let at = (i % SLAB_BLOCKS) * block_size;
        match slab {
            Slab::Float(ks, vs) => {
                Ok((ks.narrow(2, at, block_size)?, vs.narrow(2, at, block_size)?))
            }
            Slab::Q8(ks, vs) => Ok((
                ks.narrow(2, at, block_size)?.dequantize()?,
                vs.narrow(2, at, block_size)?.dequantize()?,
            )),
        }
    }

    /// Keys of blocks `from..self.len()` as stored, one `(kv_heads, tokens,
    /// d)` view per slab they fall in, in block order.
    fn slab_keys(&self, from: usize) -> Result<Vec<KeySlab>> {
        let mut pieces = Vec::new();
        for (i, slab) in self.slabs.iter().enumerate().skip(from / SLAB_BLOCKS) {
            let block_size = slab.tokens()? / SLAB_BLOCKS;
            let first = from.max(i * SLAB_BLOCKS) - i * SLAB_BLOCKS;
            let filled = (self.len - i * SLAB_BLOCKS).min(SLAB_BLOCKS);
            if filled == first {
                continue;
            }
            let (start, len) = (first * block_size, (filled - first) * block_size);
            pieces.push(match slab {
                Slab::Float(keys, _) => KeySlab::Float(keys.narrow(2, start, len)?.squeeze(0)?),
                Slab::Q8(keys, _) => KeySlab::Q8(keys.narrow(2, start, len)?.squeeze(0)?),
            });
        }
        Ok(pieces)
    }

    /// Bytes allocated, including the free slots of the last slab.
    pub fn bytes(&self) -> usize {
        self.slabs
            .iter()
            .map(|slab| match slab {
                Slab::Float(k, v) => (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes(),
                Slab::Q8(k, v) => k.bytes() + v.bytes(),
            })
            .sum()
    }
}

impl BlockKeys for BlockStore {
    fn blocks(&self) -> usize {
        self.len
    }
    fn key_slabs(&self, from: usize) -> Result<Vec<KeySlab>> {
        self.slab_keys(from)
    }
}

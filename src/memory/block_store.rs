//! The memory blocks of one layer: tensors only, no bookkeeping.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor, D};

use crate::attention::q8::dequantize_into;
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

    /// A view of `start..start + len` along `dim`.
    fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Slab::Float(k, v) => {
                Slab::Float(k.narrow(dim, start, len)?, v.narrow(dim, start, len)?)
            }
            Slab::Q8(k, v) => Slab::Q8(k.narrow(dim, start, len)?, v.narrow(dim, start, len)?),
        })
    }

    /// The pieces side by side along `dim`, in their storage dtype.
    fn cat(pieces: Vec<Self>, dim: usize) -> Result<Self> {
        let (mut floats, mut q8s) = (Vec::new(), Vec::new());
        for piece in pieces {
            match piece {
                Slab::Float(k, v) => floats.push((k, v)),
                Slab::Q8(k, v) => q8s.push((k, v)),
            }
        }
        match (floats.is_empty(), q8s.is_empty()) {
            (false, true) => {
                let (ks, vs): (Vec<_>, Vec<_>) = floats.into_iter().unzip();
                Ok(Slab::Float(Tensor::cat(&ks, dim)?, Tensor::cat(&vs, dim)?))
            }
            (true, false) => {
                let (ks, vs): (Vec<_>, Vec<_>) = q8s.into_iter().unzip();
                Ok(Slab::Q8(Q8Rows::cat(&ks, dim)?, Q8Rows::cat(&vs, dim)?))
            }
            _ => candle_core::bail!("BlockStore: no pieces, or pieces stored alike and not"),
        }
    }

    /// The keys' and values' tensors (the bytes, for 8-bit rows).
    fn tensors(&self) -> (&Tensor, &Tensor) {
        match self {
            Slab::Float(k, v) => (k, v),
            Slab::Q8(k, v) => (&k.values, &v.values),
        }
    }

    /// The rows' scales of keys and values, for 8-bit rows.
    fn scales(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Slab::Float(..) => None,
            Slab::Q8(k, v) => Some((&k.scales, &v.scales)),
        }
    }

    /// The same slab for a second owner (no copy).
    fn share(&self) -> Self {
        match self {
            Slab::Float(k, v) => Slab::Float(k.clone(), v.clone()),
            Slab::Q8(k, v) => Slab::Q8(k.clone(), v.clone()),
        }
    }

    /// A copy in buffers of its own.
    fn copy(&self) -> Result<Self> {
        Ok(match self {
            Slab::Float(k, v) => Slab::Float(k.copy()?, v.copy()?),
            Slab::Q8(k, v) => Slab::Q8(k.copy()?, v.copy()?),
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Slab::Float(k, v) => (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes(),
            Slab::Q8(k, v) => k.bytes() + v.bytes(),
        }
    }

    /// Keys and values in f32.
    fn to_f32(&self) -> Result<(Tensor, Tensor)> {
        match self {
            Slab::Float(k, v) => Ok((k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?)),
            Slab::Q8(k, v) => Ok((k.dequantize()?, v.dequantize()?)),
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

    /// Block `i`'s keys and values in f32, `(1, kv_heads, block_size, d)`.
    pub fn get(&self, i: usize) -> Result<(Tensor, Tensor)> {
        self.gather(&[vec![i]])
    }

    /// The blocks `picks` names, gathered in f32: `(1, kv_heads,
    /// picks * block_size, d)` keys and values. One list of picks serves
    /// every KV head; otherwise each KV head has its own list, all of one
    /// length. The blocks are gathered in their storage dtype and converted
    /// once.
    pub fn gather(&self, picks: &[Vec<usize>]) -> Result<(Tensor, Tensor)> {
        if picks.first().is_none_or(Vec::is_empty) {
            candle_core::bail!("BlockStore::gather: no blocks picked");
        }
        Ok((
            self.gather_around(picks, Half::Keys, &[], &[])?,
            self.gather_around(picks, Half::Values, &[], &[])?,
        ))
    }

    /// The keys (or values) of the blocks `picks` names (as for
    /// [`Self::gather`]; none if empty) with the rows of `before` ahead of
    /// them and of `after` behind them, per KV head, in one f32 tensor
    /// `(1, kv_heads, n, d)`. `before` and `after` are `(1, kv_heads, t, d)`
    /// tensors or views. On the CPU every row is copied (and converted) once,
    /// straight into the result; elsewhere by tensor ops.
    pub fn gather_around(
        &self,
        picks: &[Vec<usize>],
        half: Half,
        before: &[&Tensor],
        after: &[&Tensor],
    ) -> Result<Tensor> {
        let count = picks.first().map_or(0, Vec::len);
        if picks.iter().any(|p| p.len() != count) {
            candle_core::bail!("BlockStore::gather_around: KV heads picked unequal block counts");
        }
        if let Some(&b) = picks.iter().flatten().find(|&&b| b >= self.len) {
            candle_core::bail!("BlockStore::gather_around: block {b} of {} held", self.len);
        }
        let picks = if count == 0 { &[][..] } else { picks };
        if let Some(gathered) = self.gather_around_on_host(picks, half, before, after)? {
            return Ok(gathered);
        }
        let mut parts = before
            .iter()
            .map(|t| t.to_dtype(DType::F32))
            .collect::<Result<Vec<_>>>()?;
        if !picks.is_empty() {
            let (k, v) = self.gather_by_tensors(picks)?;
            parts.push(match half {
                Half::Keys => k,
                Half::Values => v,
            });
        }
        for t in after {
            parts.push(t.to_dtype(DType::F32)?);
        }
        Tensor::cat(&parts, 2)
    }

    /// [`Self::gather_around`] on the CPU; `None` where a part is not on
    /// the CPU or not in a layout the pass reads.
    fn gather_around_on_host(
        &self,
        picks: &[Vec<usize>],
        half: Half,
        before: &[&Tensor],
        after: &[&Tensor],
    ) -> Result<Option<Tensor>> {
        let Some(like) = before
            .first()
            .or(after.first())
            .copied()
            .or(self.slabs.first().map(|slab| slab.tensors().0))
        else {
            candle_core::bail!("BlockStore::gather_around: nothing to gather");
        };
        let (_, kv_heads, _, d) = like.dims4()?;
        if !like.device().is_cpu() {
            return Ok(None);
        }
        let per_head: Vec<&[usize]> = match picks {
            [] => vec![&[]; kv_heads],
            [shared] => vec![shared.as_slice(); kv_heads],
            per_head if per_head.len() == kv_heads => per_head.iter().map(Vec::as_slice).collect(),
            _ => candle_core::bail!(
                "BlockStore::gather_around: {} pick lists for {kv_heads} KV heads",
                picks.len()
            ),
        };
        let block_size = match self.slabs.first() {
            Some(slab) => slab.tokens()? / SLAB_BLOCKS,
            None => 0,
        };
        let around: usize = before
            .iter()
            .chain(after)
            .map(|t| t.dim(2))
            .sum::<Result<usize>>()?;
        let tokens = around + per_head[0].len() * block_size;
        let mut out = Vec::with_capacity(kv_heads * tokens * d);
        for (h, list) in per_head.iter().enumerate() {
            for t in before {
                if !append_head_rows(t, h, &mut out)? {
                    return Ok(None);
                }
            }
            for &b in *list {
                let slab = &self.slabs[b / SLAB_BLOCKS];
                let capacity = slab.tokens()?;
                let row = h * capacity + (b % SLAB_BLOCKS) * block_size;
                let (k, v) = slab.tensors();
                let (rows, scales) = match half {
                    Half::Keys => (k, slab.scales().map(|s| s.0)),
                    Half::Values => (v, slab.scales().map(|s| s.1)),
                };
                if !append_rows(rows, scales, row, block_size, &mut out)? {
                    return Ok(None);
                }
            }
            for t in after {
                if !append_head_rows(t, h, &mut out)? {
                    return Ok(None);
                }
            }
        }
        Ok(Some(Tensor::from_vec(
            out,
            (1, kv_heads, tokens, d),
            like.device(),
        )?))
    }

    /// [`BlockStore::gather`] as tensor ops (any device, and the CPU pass's
    /// reference).
    fn gather_by_tensors(&self, picks: &[Vec<usize>]) -> Result<(Tensor, Tensor)> {
        let block_size = self.slabs[0].tokens()? / SLAB_BLOCKS;
        // One head's (or, with one list, every head's) blocks, side by side
        // along the token axis.
        let one_list = |list: &[usize], head: Option<usize>| -> Result<Slab> {
            let pieces = list
                .iter()
                .map(|&b| {
                    let block = self.slabs[b / SLAB_BLOCKS].narrow(
                        2,
                        (b % SLAB_BLOCKS) * block_size,
                        block_size,
                    )?;
                    match head {
                        Some(h) => block.narrow(1, h, 1),
                        None => Ok(block),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Slab::cat(pieces, 2)
        };
        let gathered = match picks {
            [shared] => one_list(shared, None)?,
            per_head => Slab::cat(
                per_head
                    .iter()
                    .enumerate()
                    .map(|(h, list)| one_list(list, Some(h)))
                    .collect::<Result<Vec<_>>>()?,
                1,
            )?,
        };
        gathered.to_f32()
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

    /// The same blocks for a second owner: full slabs, which no push writes
    /// again, are shared; the last one, if it has free slots, is copied, so
    /// that either owner's pushes leave the other's blocks as they were.
    pub fn fork(&self) -> Result<Self> {
        let mut slabs = Vec::with_capacity(self.slabs.len());
        let partial = !self.len.is_multiple_of(SLAB_BLOCKS);
        for (i, slab) in self.slabs.iter().enumerate() {
            slabs.push(if partial && i + 1 == self.slabs.len() {
                slab.copy()?
            } else {
                slab.share()
            });
        }
        Ok(Self {
            slabs,
            len: self.len,
        })
    }

    /// Each full slab's identity and bytes: the allocations [`Self::fork`]
    /// shares between owners (the free slots of the last slab belong to
    /// one owner and count in [`Self::bytes`] only).
    pub fn shared_slabs(&self) -> impl Iterator<Item = (candle_core::TensorId, usize)> + '_ {
        let full = self.len / SLAB_BLOCKS;
        self.slabs[..full]
            .iter()
            .map(|slab| (slab.tensors().0.id(), slab.bytes()))
    }

    /// Bytes allocated, including the free slots of the last slab.
    pub fn bytes(&self) -> usize {
        self.slabs.iter().map(Slab::bytes).sum()
    }
}

/// Which half of the KV a gather reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// The keys.
    Keys,
    /// The values.
    Values,
}

/// Appends the rows of KV head `h` of a `(1, kv_heads, t, d)` tensor or
/// view whose rows lie contiguous within each head (a buffer narrowed along
/// its tokens) to `out` in f32. False where the pass cannot read it.
fn append_head_rows(rows: &Tensor, h: usize, out: &mut Vec<f32>) -> Result<bool> {
    let (_, _, t, d) = rows.dims4()?;
    let (storage, layout) = rows.storage_and_layout();
    let stride = layout.stride();
    if t > 0 && (stride[3] != 1 || (t > 1 && stride[2] != d)) {
        return Ok(false);
    }
    let first = layout.start_offset() + h * stride[1];
    Ok(extend_f32(&storage, first..first + t * d, out))
}

/// Appends `range` of a float CPU storage to `out` in f32. False for other
/// storages.
fn extend_f32(storage: &Storage, range: std::ops::Range<usize>, out: &mut Vec<f32>) -> bool {
    match storage {
        Storage::Cpu(CpuStorage::F32(x)) => out.extend_from_slice(&x[range]),
        Storage::Cpu(CpuStorage::BF16(x)) => out.extend(x[range].iter().map(|v| v.to_f32())),
        Storage::Cpu(CpuStorage::F16(x)) => out.extend(x[range].iter().map(|v| v.to_f32())),
        _ => return false,
    }
    true
}

/// Appends rows `row..row + rows` of a contiguous slab tensor (rows of its
/// last dimension) to `out` in f32, scaling 8-bit rows by `scales`. False
/// where the storage is not one the CPU pass reads.
fn append_rows(
    slab: &Tensor,
    scales: Option<&Tensor>,
    row: usize,
    rows: usize,
    out: &mut Vec<f32>,
) -> Result<bool> {
    let d = slab.dim(D::Minus1)?;
    let (storage, layout) = slab.storage_and_layout();
    if !layout.is_contiguous() {
        return Ok(false);
    }
    let range = layout.start_offset() + row * d..layout.start_offset() + (row + rows) * d;
    if scales.is_none() {
        return Ok(extend_f32(&storage, range, out));
    }
    match (&*storage, scales) {
        (Storage::Cpu(CpuStorage::U8(bytes)), Some(scales)) => {
            let (scale_storage, scale_layout) = scales.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(scales)) = &*scale_storage else {
                return Ok(false);
            };
            let first = scale_layout.start_offset() + row;
            dequantize_into(&bytes[range], &scales[first..first + rows], d, out);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

impl BlockKeys for BlockStore {
    fn blocks(&self) -> usize {
        self.len
    }
    fn key_slabs(&self, from: usize) -> Result<Vec<KeySlab>> {
        self.slab_keys(from)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::attention::reference::{random, tensor_max_abs_diff};

    #[test]
    fn gathered_blocks_are_the_picked_blocks_per_head_in_any_storage() {
        // 20 blocks of 4 tokens: two slabs; 2 KV heads of 8 values.
        let keys = random((1, 2, 80, 8), 41, 1.0);
        let values = random((1, 2, 80, 8), 42, 1.0);
        for storage in [
            BlockStorage::Float(DType::F32),
            BlockStorage::Float(DType::BF16),
            BlockStorage::Q8,
        ] {
            let mut store = BlockStore::default();
            for b in 0..20 {
                let (k, v) = (
                    keys.narrow(2, b * 4, 4).unwrap(),
                    values.narrow(2, b * 4, 4).unwrap(),
                );
                store.push(&k, &v, storage).unwrap();
            }
            let picks = [vec![3, 17, 19], vec![0, 16, 5]];
            let (k, v) = store.gather(&picks).unwrap();
            assert_eq!((k.dims(), k.dtype()), (&[1, 2, 12, 8][..], DType::F32));
            for (h, list) in picks.iter().enumerate() {
                for (i, &b) in list.iter().enumerate() {
                    let (want_k, want_v) = store.get(b).unwrap();
                    let got = |t: &Tensor| t.narrow(1, h, 1).unwrap().narrow(2, i * 4, 4).unwrap();
                    assert_eq!(
                        tensor_max_abs_diff(&got(&k), &want_k.narrow(1, h, 1).unwrap()),
                        0.0
                    );
                    assert_eq!(
                        tensor_max_abs_diff(&got(&v), &want_v.narrow(1, h, 1).unwrap()),
                        0.0
                    );
                    // And the block is the one pushed, up to the storage's rounding.
                    let raw = keys.narrow(2, b * 4, 4).unwrap().narrow(1, h, 1).unwrap();
                    assert!(
                        tensor_max_abs_diff(&got(&k), &raw) < 0.05,
                        "{storage:?} block {b}"
                    );
                }
            }
            // The CPU pass against the tensor ops, with rows around the
            // blocks from views of wider buffers (sinks before, the oldest
            // recent tokens and the window after), and with no block.
            let (slow_k, slow_v) = store.gather_by_tensors(&picks).unwrap();
            let buffer = random((1, 2, 40, 8), 43, 1.0);
            let sinks = buffer.narrow(2, 3, 5).unwrap();
            let older = buffer.narrow(2, 20, 1).unwrap();
            let window = buffer
                .narrow(2, 21, 9)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            for (half, slow) in [(Half::Keys, &slow_k), (Half::Values, &slow_v)] {
                let fast = store
                    .gather_around_on_host(&picks, half, &[&sinks], &[&older, &window])
                    .unwrap()
                    .expect("on the CPU");
                let want = Tensor::cat(
                    &[sinks.clone(), slow.clone(), older.clone(), f32(&window)],
                    2,
                )
                .unwrap();
                assert_eq!(fast.dims(), &[1, 2, 5 + 12 + 1 + 9, 8]);
                assert_eq!(tensor_max_abs_diff(&fast, &want), 0.0, "{storage:?}");
                let no_blocks = store
                    .gather_around_on_host(&[], half, &[&sinks], &[&older])
                    .unwrap()
                    .expect("on the CPU");
                let want = Tensor::cat(&[sinks.clone(), older.clone()], 2).unwrap();
                assert_eq!(tensor_max_abs_diff(&no_blocks, &want), 0.0);
            }
            let (shared_k, _) = store.gather(&[vec![17, 3]]).unwrap();
            let want =
                Tensor::cat(&[store.get(17).unwrap().0, store.get(3).unwrap().0], 2).unwrap();
            assert_eq!(tensor_max_abs_diff(&shared_k, &want), 0.0);
            assert!(
                store.gather(&[vec![1], vec![1, 2]]).is_err(),
                "unequal counts"
            );
            assert!(store.gather(&[vec![20]]).is_err(), "a block not held");
        }
    }
}

//! Attention-mass partials: for each block, KV head and query row, the
//! largest logit `m` over the block's tokens and
//! `s = sum exp(scale * (logit - m))`. Partials of any set of blocks combine into each row's softmax
//! over all their keys without reading a key again, so `attention_mass`
//! scores and the question's cached share are both built from them.
//!
//! [`block_partials`] reads the keys where they lie on the CPU, in their
//! storage dtype (8-bit rows included), one task per slab and KV head;
//! [`block_partials_by_tensors`] is the same computation as tensor ops (any
//! device, and the reference the CPU kernel is tested against).

use candle_core::{CpuStorage, Result, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::moments::Candidates;
use super::KeySlab;
use crate::attention::lanes::row_key_logits;
use crate::attention::q8::Q8_ZERO;
use crate::attention::softmax::max_and_exp_sum;

/// Partials of the blocks in `slabs` (whole blocks of `block_size`, in
/// block order) against `rows` (`(kv_heads, m, d)` f32: each KV head's
/// query rows): per block, KV head and row, `[m, s]`, laid out
/// `[block][kv_head][row][2]`.
pub(crate) fn block_partials(
    slabs: &[KeySlab],
    block_size: usize,
    rows: &Tensor,
    scale: f32,
) -> Result<Vec<f32>> {
    match host_block_partials(slabs, block_size, rows, scale)? {
        Some(partials) => Ok(partials),
        None => block_partials_by_tensors(slabs, block_size, rows, scale),
    }
}

/// [`block_partials`] by the CPU kernel, or `None` where it does not apply:
/// tensors on another device, another dtype, or rows not laid out as the
/// block store lays them out.
fn host_block_partials(
    slabs: &[KeySlab],
    block_size: usize,
    rows: &Tensor,
    scale: f32,
) -> Result<Option<Vec<f32>>> {
    let (_, _, d) = rows.dims3()?;
    let Some(rows) = host_rows(slabs, rows)? else {
        return Ok(None);
    };
    with_slab_views(slabs, d, |views| {
        host_partials(views, block_size, &rows, d, scale)
    })
}

/// `rows` on the host, when they and every slab lie in CPU memory.
fn host_rows(slabs: &[KeySlab], rows: &Tensor) -> Result<Option<Vec<f32>>> {
    let on_cpu = rows.device().is_cpu()
        && slabs.iter().all(|slab| match slab {
            KeySlab::Float(keys) => keys.device().is_cpu(),
            KeySlab::Q8(rows) => rows.values.device().is_cpu() && rows.scales.device().is_cpu(),
        });
    if !on_cpu {
        return Ok(None);
    }
    Ok(Some(rows.contiguous()?.flatten_all()?.to_vec1::<f32>()?))
}

/// Runs `f` on views of the slabs' keys where they lie, or returns `None`
/// where the slabs are not CPU tensors of head size `d` laid out as the
/// block store lays them out.
fn with_slab_views<R>(
    slabs: &[KeySlab],
    d: usize,
    f: impl FnOnce(&[SlabView<'_>]) -> R,
) -> Result<Option<R>> {
    let tensors = |slab: &KeySlab| match slab {
        KeySlab::Float(keys) => vec![keys.clone()],
        KeySlab::Q8(rows) => vec![rows.values.clone(), rows.scales.clone()],
    };
    let all: Vec<Tensor> = slabs.iter().flat_map(tensors).collect();
    let guards: Vec<_> = all.iter().map(Tensor::storage_and_layout).collect();
    let mut guard = guards.iter();
    let mut views = Vec::with_capacity(slabs.len());
    for slab in slabs {
        let (kv_heads, tokens, dim) = slab.dims3()?;
        let (storage, layout) = guard.next().expect("a guard per tensor");
        let stride = layout.stride();
        // Each head's rows must be consecutive: the block store's slabs are.
        if dim != d || stride[1] != d || stride[2] != 1 {
            return Ok(None);
        }
        let (keys, row_scales) = match (&**storage, slab) {
            (Storage::Cpu(CpuStorage::F32(v)), KeySlab::Float(_)) => (Keys::F32(v), None),
            (Storage::Cpu(CpuStorage::BF16(v)), KeySlab::Float(_)) => (Keys::Bf16(v), None),
            (Storage::Cpu(CpuStorage::F16(v)), KeySlab::Float(_)) => (Keys::F16(v), None),
            (Storage::Cpu(CpuStorage::U8(v)), KeySlab::Q8(_)) => {
                let (scales, scale_layout) = guard.next().expect("a guard per tensor");
                let Storage::Cpu(CpuStorage::F32(scales)) = &**scales else {
                    return Ok(None);
                };
                let scale_stride = scale_layout.stride();
                if scale_stride[1] != 1 {
                    return Ok(None);
                }
                let scales = RowScales {
                    scales,
                    start: scale_layout.start_offset(),
                    head_stride: scale_stride[0],
                };
                (Keys::Q8(v), Some(scales))
            }
            _ => return Ok(None),
        };
        views.push(SlabView {
            keys,
            row_scales,
            start: layout.start_offset(),
            head_stride: stride[0],
            kv_heads,
            tokens,
            d,
        });
    }
    Ok(Some(f(&views)))
}

/// [`block_partials`] as tensor ops: the logits of each slab as one matrix
/// product, the maxima and sums on the host.
pub(crate) fn block_partials_by_tensors(
    slabs: &[KeySlab],
    block_size: usize,
    rows: &Tensor,
    scale: f32,
) -> Result<Vec<f32>> {
    let (kv_heads, m, _) = rows.dims3()?;
    let mut partials = Vec::new();
    for keys in slabs {
        let tokens = keys.dims3()?.1;
        let logits = rows
            .matmul(&keys.to_f32()?.t()?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = tokens / block_size;
        let first = partials.len();
        partials.resize(first + blocks * kv_heads * m * 2, 0.0);
        for (row, logits) in logits.chunks_exact(tokens).enumerate() {
            for (b, block) in logits.chunks_exact(block_size).enumerate() {
                let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = block.iter().map(|x| ((x - max) * scale).exp()).sum();
                let at = first + (b * kv_heads * m + row) * 2;
                partials[at] = max;
                partials[at + 1] = sum;
            }
        }
    }
    Ok(partials)
}

/// Partials of chosen blocks only: for each KV head `g`, the blocks
/// `candidates[g]` against that head's rows of `rows` (`(kv_heads, m, d)`
/// f32). Returns per KV head `[m, s]` per candidate and row, laid out
/// `[candidate][row][2]`. The blocks are whole blocks of `block_size` in
/// `slabs` (block order, as [`block_partials`] reads them).
pub(crate) fn candidate_partials(
    slabs: &[KeySlab],
    block_size: usize,
    rows: &Tensor,
    scale: f32,
    candidates: &[Vec<usize>],
) -> Result<Vec<Vec<f32>>> {
    let (_, _, d) = rows.dims3()?;
    if let Some(host) = host_rows(slabs, rows)? {
        let done = with_slab_views(slabs, d, |views| {
            host_candidate_partials(views, block_size, &host, d, scale, candidates)
        })?;
        if let Some(partials) = done {
            return Ok(partials);
        }
    }
    candidate_partials_by_tensors(slabs, block_size, rows, scale, candidates)
}

/// [`candidate_partials`] as tensor ops, one block at a time.
pub(crate) fn candidate_partials_by_tensors(
    slabs: &[KeySlab],
    block_size: usize,
    rows: &Tensor,
    scale: f32,
    candidates: &[Vec<usize>],
) -> Result<Vec<Vec<f32>>> {
    let tokens = slabs
        .iter()
        .map(|s| s.dims3().map(|d| d.1))
        .collect::<Result<Vec<_>>>()?;
    let firsts = first_blocks(tokens, block_size);
    let mut out = Vec::with_capacity(candidates.len());
    for (g, blocks) in candidates.iter().enumerate() {
        let head_rows = rows.get(g)?;
        let mut partials = Vec::with_capacity(blocks.len() * head_rows.dim(0)? * 2);
        for &b in blocks {
            let s = firsts.partition_point(|&first| first <= b) - 1;
            let offset = (b - firsts[s]) * block_size;
            let keys = match &slabs[s] {
                KeySlab::Float(keys) => keys.get(g)?.narrow(0, offset, block_size)?,
                KeySlab::Q8(q8) => q8.narrow(1, offset, block_size)?.dequantize()?.get(g)?,
            };
            let logits = head_rows
                .matmul(&keys.to_dtype(candle_core::DType::F32)?.t()?)?
                .to_vec2::<f32>()?;
            for row in logits {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|x| ((x - max) * scale).exp()).sum();
                partials.extend([max, sum]);
            }
        }
        out.push(partials);
    }
    Ok(out)
}

/// The first block of each slab, from the slabs' token counts.
fn first_blocks(tokens: impl IntoIterator<Item = usize>, block_size: usize) -> Vec<usize> {
    tokens
        .into_iter()
        .scan(0, |next, t| {
            let first = *next;
            *next += t / block_size;
            Some(first)
        })
        .collect()
}

/// The CPU kernel of [`candidate_partials`]: one task per KV head and
/// candidate block.
fn host_candidate_partials(
    views: &[SlabView<'_>],
    block_size: usize,
    rows: &[f32],
    d: usize,
    scale: f32,
    candidates: &[Vec<usize>],
) -> Vec<Vec<f32>> {
    let kv_heads = candidates.len();
    let m = rows.len() / (kv_heads.max(1) * d);
    let firsts = first_blocks(views.iter().map(|v| v.tokens), block_size);
    let block_partials = |(g, b): (usize, usize)| {
        let s = firsts.partition_point(|&first| first <= b) - 1;
        view_partials(
            &views[s],
            g,
            (b - firsts[s]) * block_size..(b - firsts[s] + 1) * block_size,
            block_size,
            &rows[g * m * d..(g + 1) * m * d],
            scale,
        )
    };
    let tasks: Vec<(usize, usize)> = candidates
        .iter()
        .enumerate()
        .flat_map(|(g, blocks)| blocks.iter().map(move |&b| (g, b)))
        .collect();
    // A decode step's few candidates (32 blocks of 64 keys for 3 KV heads)
    // are little work: in a profile of such steps about a third of the
    // samples went to waking the pool's threads.
    let pieces: Vec<Vec<f32>> = if tasks.len() * m * block_size * d < PARALLEL_MULTIPLY_ADDS {
        tasks.iter().map(|&task| block_partials(task)).collect()
    } else {
        tasks.par_iter().map(|&task| block_partials(task)).collect()
    };
    let mut pieces = pieces.into_iter();
    candidates
        .iter()
        .map(|blocks| pieces.by_ref().take(blocks.len()).flatten().collect())
        .collect()
}

/// Multiply-adds below which the candidate kernel runs on the calling
/// thread.
const PARALLEL_MULTIPLY_ADDS: usize = 1 << 22;

/// Per KV head and block, the attention mass `rows` give the block: each
/// row's softmax over all the blocks' keys (from `partials`, laid out as
/// [`block_partials`] makes them), weighted by `weights[r % weights.len()]`,
/// summed over the KV head's `m` rows.
pub(crate) fn combine_partials(
    partials: &[f32],
    (kv_heads, m): (usize, usize),
    weights: &[f32],
    scale: f32,
) -> Vec<Vec<f32>> {
    let stride = kv_heads * m * 2;
    let blocks = partials.len() / stride;
    let mut scores = vec![vec![0f32; blocks]; kv_heads];
    let mut masses = vec![0f32; blocks];
    for (g, head_scores) in scores.iter_mut().enumerate() {
        for r in 0..m {
            let at = (g * m + r) * 2;
            let max = (0..blocks)
                .map(|b| partials[b * stride + at])
                .fold(f32::NEG_INFINITY, f32::max);
            for (b, mass) in masses.iter_mut().enumerate() {
                let (block_max, sum) = (partials[b * stride + at], partials[b * stride + at + 1]);
                *mass = sum * ((block_max - max) * scale).exp();
            }
            let weight = weights[r % weights.len()] / masses.iter().sum::<f32>();
            for (s, mass) in head_scores.iter_mut().zip(&masses) {
                *s += weight * mass;
            }
        }
    }
    scores
}

/// Per KV head and block, the attention mass `rows` give the block when
/// each row's softmax runs over the candidate blocks' keys only (from
/// [`candidate_partials`]), scaled by the row's `shares` (the candidates'
/// estimated share of its attention), weighted and summed as in
/// [`combine_partials`]; 0 for the blocks that are not candidates. `blocks`
/// is the number of blocks held.
pub(crate) fn combine_candidate_partials(
    partials: &[Vec<f32>],
    candidates: &Candidates,
    (m, blocks): (usize, usize),
    weights: &[f32],
    scale: f32,
) -> Vec<Vec<f32>> {
    partials
        .iter()
        .zip(candidates.blocks.iter().zip(&candidates.shares))
        .map(|(head_partials, (head_candidates, shares))| {
            let mut scores = vec![0f32; blocks];
            let row_weights: Vec<f32> = (0..m)
                .map(|r| weights[r % weights.len()] * shares[r])
                .collect();
            let masses = combine_partials(head_partials, (1, m), &row_weights, scale)
                .pop()
                .expect("one KV head");
            for (&b, mass) in head_candidates.iter().zip(masses) {
                scores[b] = mass;
            }
            scores
        })
        .collect()
}

/// A slab's keys in their storage dtype.
#[derive(Clone, Copy)]
enum Keys<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// 8-bit rows (signed byte + 128), scaled by [`RowScales`].
    Q8(&'a [u8]),
}

/// Where 8-bit rows' scales lie: head `g`'s `tokens` scales start at `start
/// + g * head_stride`.
struct RowScales<'a> {
    scales: &'a [f32],
    start: usize,
    head_stride: usize,
}

/// Where a slab's keys lie: head `g`'s `tokens` rows of `d` values start at
/// `start + g * head_stride`.
struct SlabView<'a> {
    keys: Keys<'a>,
    row_scales: Option<RowScales<'a>>,
    start: usize,
    head_stride: usize,
    kv_heads: usize,
    tokens: usize,
    /// Values per key row.
    d: usize,
}

/// The CPU kernel: one task per slab and KV head, each reading its keys
/// once and computing every row's logits against a key while it is in
/// cache.
fn host_partials(
    views: &[SlabView<'_>],
    block_size: usize,
    rows: &[f32],
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let kv_heads = views.first().map_or(0, |v| v.kv_heads);
    let m = rows.len() / (kv_heads.max(1) * d);
    let tasks: Vec<(usize, usize)> = (0..views.len())
        .flat_map(|s| (0..kv_heads).map(move |g| (s, g)))
        .collect();
    let pieces: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(s, g)| {
            let view = &views[s];
            let head_rows = &rows[g * m * d..(g + 1) * m * d];
            view_partials(view, g, 0..view.tokens, block_size, head_rows, scale)
        })
        .collect();
    let blocks: usize = views.iter().map(|v| v.tokens / block_size).sum();
    let mut partials = vec![0f32; blocks * kv_heads * m * 2];
    let mut first_block = 0;
    for (s, view) in views.iter().enumerate() {
        let slab_blocks = view.tokens / block_size;
        for g in 0..kv_heads {
            let piece = &pieces[s * kv_heads + g];
            for b in 0..slab_blocks {
                let to = ((first_block + b) * kv_heads + g) * m * 2;
                partials[to..to + m * 2].copy_from_slice(&piece[b * m * 2..(b + 1) * m * 2]);
            }
        }
        first_block += slab_blocks;
    }
    partials
}

/// One KV head's partials over the whole blocks of `tokens` (a range of a
/// slab's tokens) against that head's rows.
fn view_partials(
    view: &SlabView<'_>,
    g: usize,
    tokens: std::ops::Range<usize>,
    block_size: usize,
    head_rows: &[f32],
    scale: f32,
) -> Vec<f32> {
    let d = view.d;
    let at = view.start + g * view.head_stride + tokens.start * d;
    let len = tokens.len() * d;
    let row_scales = view.row_scales.as_ref().map(|s| {
        let at = s.start + g * s.head_stride + tokens.start;
        &s.scales[at..at + tokens.len()]
    });
    // One monomorphised kernel per storage dtype.
    macro_rules! partials {
        ($keys:expr) => {
            head_partials(
                &$keys[at..at + len],
                row_scales,
                block_size,
                head_rows,
                d,
                scale,
            )
        };
    }
    match view.keys {
        Keys::F32(k) => partials!(k),
        Keys::Bf16(k) => partials!(k),
        Keys::F16(k) => partials!(k),
        Keys::Q8(k) => partials!(k),
    }
}

/// A key value the kernel reads in its storage dtype.
trait KeyValue: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// The keys themselves where they are f32 already (no copy).
    fn as_f32(_keys: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl KeyValue for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    fn as_f32(keys: &[f32]) -> Option<&[f32]> {
        Some(keys)
    }
}

impl KeyValue for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl KeyValue for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// The byte of an 8-bit row, unscaled: the row's scale multiplies its
/// logits instead of every value.
impl KeyValue for u8 {
    fn to_f32(self) -> f32 {
        f32::from(self) - Q8_ZERO
    }
}

/// One KV head's partials over consecutive blocks: `keys` holds their
/// tokens' rows of `d` (for 8-bit rows unscaled, each row's scale in
/// `row_scales`), `rows` the head's `m` query rows. Returns `[m, s]` per
/// block and row, laid out `[block][row][2]`.
fn head_partials<K: KeyValue>(
    keys: &[K],
    row_scales: Option<&[f32]>,
    block_size: usize,
    rows: &[f32],
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let m = rows.len() / d;
    let blocks = keys.len() / (d * block_size);
    let mut out = Vec::with_capacity(blocks * m * 2);
    // One block's keys in f32 (filled only for other dtypes: f32 keys are
    // read in place), then its logits row-major per row:
    // `logits[r * block_size + t]`.
    let mut converted = Vec::new();
    let mut logits = vec![0f32; m * block_size];
    for (b, block) in keys.chunks_exact(d * block_size).enumerate() {
        let block_keys = K::as_f32(block).unwrap_or_else(|| {
            converted.clear();
            converted.extend(block.iter().map(|k| k.to_f32()));
            &converted
        });
        row_key_logits(block_keys, rows, d, &mut logits);
        if let Some(row_scales) = row_scales {
            let block_scales = &row_scales[b * block_size..(b + 1) * block_size];
            for row_logits in logits.chunks_exact_mut(block_size) {
                for (logit, s) in row_logits.iter_mut().zip(block_scales) {
                    *logit *= s;
                }
            }
        }
        for row_logits in logits.chunks_exact_mut(block_size) {
            let (max, sum) = max_and_exp_sum(row_logits, scale);
            out.push(max);
            out.push(sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use crate::attention::reference::{assert_close, attention_mass_slow, random};
    use crate::attention::Q8Rows;

    use super::*;

    /// Slabs of `(kv_heads, 16 * bs, d)` keys as the block store keeps them:
    /// views of the filled part of `(1, kv_heads, capacity, d)` tensors, in
    /// `dtype`, or as 8-bit rows for `None`.
    fn slabs(keys: &Tensor, bs: usize, dtype: Option<DType>) -> Vec<KeySlab> {
        let (_, kv_heads, tokens, d) = keys.dims4().unwrap();
        let per_slab = 16 * bs;
        (0..tokens.div_ceil(per_slab))
            .map(|s| {
                let n = per_slab.min(tokens - s * per_slab);
                let part = keys.narrow(2, s * per_slab, n).unwrap();
                let shape = (1, kv_heads, per_slab, d);
                match dtype {
                    Some(dtype) => {
                        let slab = Tensor::zeros(shape, dtype, &Device::Cpu).unwrap();
                        let part = part.to_dtype(dtype).unwrap().contiguous().unwrap();
                        slab.slice_set(&part, 2, 0).unwrap();
                        KeySlab::Float(slab.narrow(2, 0, n).unwrap().squeeze(0).unwrap())
                    }
                    None => {
                        let slab =
                            Q8Rows::zeros(&[1, kv_heads, per_slab, d], &Device::Cpu).unwrap();
                        slab.slice_set(&Q8Rows::quantize(&part).unwrap(), 2, 0)
                            .unwrap();
                        KeySlab::Q8(slab.narrow(2, 0, n).unwrap().squeeze(0).unwrap())
                    }
                }
            })
            .collect()
    }

    #[test]
    fn the_cpu_kernel_gives_the_partials_of_the_tensor_ops_in_every_storage_dtype() {
        // 37 blocks of 4 tokens: two full slabs and a part-filled one; head
        // size 8; 3 rows per KV head.
        let (blocks, bs, kv_heads, d, m) = (37, 4, 2, 8, 3);
        let keys = random((1, kv_heads, blocks * bs, d), 31, 1.5);
        let rows = random((1, kv_heads, m, d), 32, 2.0).squeeze(0).unwrap();
        for (dtype, tol) in [
            (Some(DType::F32), 1e-5),
            (Some(DType::BF16), 1e-4),
            (Some(DType::F16), 1e-4),
            (None, 1e-4),
        ] {
            let slabs = slabs(&keys, bs, dtype);
            let last = match &slabs[2] {
                KeySlab::Float(keys) => keys.clone(),
                KeySlab::Q8(rows) => rows.values.clone(),
            };
            assert!(!last.is_contiguous(), "views into a part-filled slab");
            let fast = host_block_partials(&slabs, bs, &rows, 0.5)
                .unwrap()
                .expect("the CPU kernel reads the store's slabs in place");
            let reference = block_partials_by_tensors(&slabs, bs, &rows, 0.5).unwrap();
            assert_eq!(fast.len(), blocks * kv_heads * m * 2, "{dtype:?}");
            assert_close(&fast, &reference, tol);
        }
    }

    #[test]
    fn candidate_partials_of_the_cpu_kernel_and_the_tensor_ops_agree_in_every_storage_dtype() {
        // 37 blocks in three slabs; each KV head reads other blocks, some in
        // the part-filled last slab.
        let (blocks, bs, kv_heads, d, m) = (37, 4, 2, 8, 3);
        let keys = random((1, kv_heads, blocks * bs, d), 35, 1.5);
        let rows = random((1, kv_heads, m, d), 36, 2.0).squeeze(0).unwrap();
        let candidates = vec![vec![0, 5, 16, 33, 36], vec![2, 15, 31, 32]];
        for (dtype, tol) in [
            (Some(DType::F32), 1e-5),
            (Some(DType::BF16), 1e-4),
            (Some(DType::F16), 1e-4),
            (None, 1e-4),
        ] {
            let slabs = slabs(&keys, bs, dtype);
            let rows_host = host_rows(&slabs, &rows).unwrap().unwrap();
            let fast = with_slab_views(&slabs, d, |views| {
                host_candidate_partials(views, bs, &rows_host, d, 0.5, &candidates)
            })
            .unwrap()
            .expect("the CPU kernel reads the store's slabs in place");
            let reference =
                candidate_partials_by_tensors(&slabs, bs, &rows, 0.5, &candidates).unwrap();
            // The partials of the candidates are those of all blocks, picked.
            let all = block_partials_by_tensors(&slabs, bs, &rows, 0.5).unwrap();
            for g in 0..kv_heads {
                assert_eq!(fast[g].len(), candidates[g].len() * m * 2, "{dtype:?}");
                assert_close(&fast[g], &reference[g], tol);
                let picked: Vec<f32> = candidates[g]
                    .iter()
                    .flat_map(|&b| {
                        let at = (b * kv_heads + g) * m * 2;
                        all[at..at + m * 2].to_vec()
                    })
                    .collect();
                assert_close(&fast[g], &picked, tol);
            }
        }
    }

    #[test]
    fn candidates_covering_every_block_score_as_all_blocks_do() {
        let (blocks, bs, kv_heads, d, m) = (21, 3, 2, 4, 4);
        let keys = random((1, kv_heads, blocks * bs, d), 37, 1.0);
        let rows = random((1, kv_heads, m, d), 38, 2.0).squeeze(0).unwrap();
        let slabs = slabs(&keys, bs, Some(DType::F32));
        let every = Candidates {
            blocks: vec![(0..blocks).collect::<Vec<_>>(); kv_heads],
            shares: vec![vec![1.0; m]; kv_heads],
        };
        let partials = candidate_partials(&slabs, bs, &rows, 0.5, &every.blocks).unwrap();
        let got = combine_candidate_partials(&partials, &every, (m, blocks), &[1.0], 0.5);
        let all = combine_partials(
            &block_partials(&slabs, bs, &rows, 0.5).unwrap(),
            (kv_heads, m),
            &[1.0],
            0.5,
        );
        for g in 0..kv_heads {
            assert_close(&got[g], &all[g], 1e-5);
        }
    }

    #[test]
    fn combined_partials_are_each_rows_softmax_summed_per_block() {
        // Written out: per KV head, row and block, the block's share of the
        // row's softmax over every key, weighted and summed over rows.
        let (blocks, bs, kv_heads, d, m) = (21, 3, 2, 4, 4);
        let keys = random((1, kv_heads, blocks * bs, d), 33, 1.0);
        let rows = random((1, kv_heads, m, d), 34, 2.0).squeeze(0).unwrap();
        let (weights, scale) = ([1.0, 3.0], 0.5);
        let partials =
            block_partials(&slabs(&keys, bs, Some(DType::F32)), bs, &rows, scale).unwrap();
        let got = combine_partials(&partials, (kv_heads, m), &weights, scale);
        let expected = attention_mass_slow(&keys, &rows, bs, &weights, scale);
        for g in 0..kv_heads {
            assert_close(&got[g], &expected[g], 1e-5);
        }
    }
}

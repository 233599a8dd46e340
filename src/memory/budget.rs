//! An upper bound on the state a sequence will hold, beside the growth rules
//! it bounds, so that a request over a memory cap is refused before any
//! work.

use candle_core::DType;

use super::block_store::SLAB_BLOCKS;
use super::kv_buffer::grown_capacity;
use crate::config::{Boundaries, EngineSettings, Mode, Policy, Positions};

/// The shape of a loaded model, as far as the hook's memory depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// The model's own prompt length limit (its trained context).
    pub max_seq_len: usize,
    /// Attention layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key and value heads.
    pub num_kv_heads: usize,
    /// Size of a key head.
    pub k_head_dim: usize,
    /// Size of a value head.
    pub v_head_dim: usize,
    /// The dtype the model computes in.
    pub dtype: DType,
}

/// Largest capacity, in tokens, of a KV buffer that has held at most
/// `tokens` (see [`super::KvBuffer::append`]).
fn kv_capacity(tokens: usize) -> usize {
    if tokens == 0 {
        0
    } else {
        grown_capacity(tokens)
    }
}

/// Most bytes of state one sequence of `tokens` tokens (prompt and generated)
/// can hold under `config`, fed by `engine`, with `model`: what
/// [`super::LayerMemory::bytes`] summed over layers (or the dense KV) would
/// report at its largest, never less.
pub fn sequence_bytes_bound(
    config: &Policy,
    engine: &EngineSettings,
    model: &ModelShape,
    tokens: usize,
) -> usize {
    let kv_token = |dtype: DType| {
        model.num_kv_heads * (model.k_head_dim + model.v_head_dim) * dtype.size_in_bytes()
    };
    let layer = match config.mode {
        // One buffer with every token.
        Mode::Dense => kv_capacity(tokens) * kv_token(model.dtype),
        Mode::Streaming | Mode::Qllm | Mode::Infllm => {
            let heads = model.num_attention_heads;
            let init = config.n_init.min(tokens);
            // Tokens not yet in a block: the window, the execution block being
            // read and the block about to be formed.
            let recent = (config.n_local
                + config.exc_block_size.max(engine.prefill_chunk_size)
                + config.block_size)
                .min(tokens);
            // The window's keys kept rotated, f32, with fixed positions.
            let rotated = if config.positions == Positions::Fixed {
                kv_capacity(config.positions_needed().min(tokens))
                    * model.num_kv_heads
                    * model.k_head_dim
                    * 4
            } else {
                0
            };
            let window = (kv_capacity(init) + kv_capacity(recent)) * kv_token(model.dtype)
                + rotated
                // f32 attention received per recent token and query head.
                + 2 * recent * heads * 4;
            if config.mode == Mode::Streaming {
                window
            } else {
                // Blocks may begin half a block apart (`sentence`
                // boundaries), each holding `block_size` tokens.
                let blocks = tokens.saturating_sub(init) / config.min_block_advance();
                let slabs = blocks.div_ceil(SLAB_BLOCKS);
                let storage = config.block_dtype.resolve(model.dtype);
                let block_token = model.num_kv_heads
                    * (storage.row_bytes(model.k_head_dim) + storage.row_bytes(model.v_head_dim));
                window
                    + slabs * SLAB_BLOCKS * config.block_size * block_token
                    // f32 representative key per block and query head, for
                    // the scorings that use them; the vector may hold up to
                    // twice its length.
                    + usize::from(config.scoring.uses_representatives())
                        * 2 * blocks * heads * model.k_head_dim * 4
                    // f32 per-channel key moments per block and KV head, when
                    // some retrieval reads only candidate blocks; the vector
                    // may hold up to twice its length.
                    + usize::from(config.keeps_key_moments())
                        * 2 * blocks * model.num_kv_heads * 2 * model.k_head_dim * 4
                    // Each block's first position; the vector may hold up to
                    // twice its length.
                    + 2 * blocks * std::mem::size_of::<usize>()
                    // f32 question vector.
                    + heads * model.k_head_dim * 4
            }
        }
    };
    // A byte per token (and growth slack) marks the sentence ends.
    let sentence_ends = if config.boundaries == Boundaries::Sentence {
        2 * tokens
    } else {
        0
    };
    layer * model.num_layers + sentence_ends
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SmolLM2-135M's shape with f32 activations.
    pub(crate) fn smollm2() -> ModelShape {
        ModelShape {
            max_seq_len: 8192,
            num_layers: 30,
            num_attention_heads: 9,
            num_kv_heads: 3,
            k_head_dim: 64,
            v_head_dim: 64,
            dtype: DType::F32,
        }
    }

    #[test]
    fn bound_grows_with_tokens_like_the_kv_it_stores() {
        let model = smollm2();
        let config = Policy::default();
        let engine = EngineSettings::default();
        let per_token = 30 * 3 * 128 * 4;
        let at_32k = sequence_bytes_bound(&config, &engine, &model, 32 * 1024);
        let at_64k = sequence_bytes_bound(&config, &engine, &model, 64 * 1024);
        // Block memory dominates: about one KV per token, plus bookkeeping.
        let growth = at_64k - at_32k;
        assert!(growth >= 32 * 1024 * per_token, "{growth}");
        assert!(growth <= 32 * 1024 * per_token * 11 / 10, "{growth}");
        let streaming = Policy {
            mode: Mode::Streaming,
            ..config
        };
        assert_eq!(
            sequence_bytes_bound(&streaming, &engine, &model, 32 * 1024),
            sequence_bytes_bound(&streaming, &engine, &model, 64 * 1024),
            "streaming keeps a bounded window"
        );
        let dense = Policy::dense();
        assert!(sequence_bytes_bound(&dense, &engine, &model, 1000) >= 1000 * per_token);
        // Sentence boundaries: blocks may begin half a block apart, so up to
        // twice the block bytes.
        let sentence = Policy {
            boundaries: Boundaries::Sentence,
            ..config
        };
        let sentence_growth = sequence_bytes_bound(&sentence, &engine, &model, 64 * 1024)
            - sequence_bytes_bound(&sentence, &engine, &model, 32 * 1024);
        assert!(
            sentence_growth >= 2 * 32 * 1024 * per_token,
            "{sentence_growth}"
        );
        // 8-bit blocks: 64 bytes and a 4-byte scale per row of 64 values.
        let q8 = Policy {
            block_dtype: crate::config::BlockDType::Q8_0,
            ..config
        };
        let q8_growth = sequence_bytes_bound(&q8, &engine, &model, 64 * 1024)
            - sequence_bytes_bound(&q8, &engine, &model, 32 * 1024);
        let q8_per_token = 30 * 3 * 2 * 68;
        assert!(q8_growth >= 32 * 1024 * q8_per_token, "{q8_growth}");
        assert!(
            q8_growth <= 32 * 1024 * q8_per_token * 12 / 10,
            "{q8_growth}"
        );
        // Key moments: per block of 64 tokens and KV head, 2 x 64 f32.
        let bounded = Policy {
            mass_candidates: 64,
            ..q8
        };
        let bounded_growth = sequence_bytes_bound(&bounded, &engine, &model, 64 * 1024)
            - sequence_bytes_bound(&bounded, &engine, &model, 32 * 1024);
        let ranges_per_token = 30 * 3 * 2 * 64 * 4 / 64;
        assert!(
            bounded_growth >= q8_growth + 32 * 1024 * ranges_per_token,
            "{bounded_growth}"
        );
        // Decode steps alone reading candidates keep the same moments.
        let decode_bounded = Policy {
            answer_mass_candidates: 64,
            ..q8
        };
        assert_eq!(
            sequence_bytes_bound(&decode_bounded, &engine, &model, 64 * 1024),
            sequence_bytes_bound(&bounded, &engine, &model, 64 * 1024)
        );
    }
}

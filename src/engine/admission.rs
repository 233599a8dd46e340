//! Admission: a request whose largest possible state would go over a memory
//! cap, or whose settings the model cannot run, is refused before any work.

use mistralrs_core::attention_hook::HookRequest;

use crate::config::size::format_bytes;
use crate::config::{MemoryCaps, Mode, Policy, Positions, QllmConfig};
use crate::memory::{sequence_bytes_bound, ModelShape};

/// What admission knows: the model's shape and the reservation of the
/// request admitted last, whose sequences the engine creates right after,
/// on the same thread.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    /// The shape of the loaded model (the largest per token if several).
    model: Option<ModelShape>,
    /// The request admitted last and the bytes reserved per sequence.
    admitted: Option<(usize, usize)>,
}

/// Bytes in use when a request asks to be admitted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InUse {
    /// Bytes counted against `max_memory`.
    pub charged_bytes: usize,
    /// Sequences holding them.
    pub sequences: usize,
}

/// Bytes the kept prefixes may hold once a request is admitted: what
/// `max_memory` leaves beside the live sequences and the request (`None`:
/// no cap). Kept prefixes give way to requests, never the reverse.
pub(crate) type KeptRoom = Option<usize>;

impl Admission {
    pub fn model(&self) -> Option<ModelShape> {
        self.model
    }

    /// Keeps `model`'s shape if it needs more per token than the one kept:
    /// one hook may serve several models, and requests are sized for the
    /// largest.
    pub fn model_loaded(&mut self, config: &QllmConfig, model: ModelShape) {
        let per_token =
            |m: &ModelShape| sequence_bytes_bound(&config.policy, &config.engine, m, 1 << 16);
        if self
            .model
            .is_none_or(|k| per_token(&model) >= per_token(&k))
        {
            self.model = Some(model);
        }
    }

    /// The bytes reserved per sequence for `request_id`, if it was the
    /// request admitted last.
    pub fn reservation(&self, request_id: usize) -> usize {
        match self.admitted {
            Some((id, bytes)) if id == request_id => bytes,
            _ => 0,
        }
    }

    /// Admits or refuses a request running `policy` (its own, or the
    /// server's) under the server's `config`; `registered` says whether its
    /// caller registered settings for it. `in_use` is asked only when a cap
    /// needs it.
    pub fn admit(
        &mut self,
        config: &QllmConfig,
        policy: &Policy,
        request: &HookRequest<'_>,
        question_tokens: Option<usize>,
        registered: bool,
        in_use: impl FnOnce() -> InUse,
    ) -> std::result::Result<KeptRoom, String> {
        let prompt_len = request.prompt_tokens.len();
        self.admitted = None;
        if let Some(model) = self.model.filter(|_| policy.mode == Mode::Dense) {
            if registered && prompt_len > model.max_seq_len {
                // The request runs without Q-LLM: the model's own limit and
                // upstream's message.
                return Err(format!(
                    "Prompt sequence length is greater than {}, perhaps consider using \
                     `truncate_sequence`?",
                    model.max_seq_len
                ));
            }
        }
        if let Some(question) = question_tokens.filter(|&q| q > prompt_len) {
            return Err(format!(
                "qllm: the question ({question} tokens) is longer than the prompt ({prompt_len} \
                 tokens); the question must be part of the prompt"
            ));
        }
        let Some(model) = self.model else {
            return Ok(None);
        };
        if policy.mode != Mode::Dense && policy.positions_needed() > model.max_seq_len {
            return Err(rope_table_too_small(policy, model.max_seq_len));
        }
        let tokens = prompt_len + request.max_new_tokens.unwrap_or(0);
        let per_sequence = sequence_bytes_bound(policy, &config.engine, &model, tokens);
        let sequences = request.sequences.max(1);
        let request_bytes = per_sequence.saturating_mul(sequences);
        let kept_room = check_caps(&config.caps, request_bytes, tokens, sequences, in_use)?;
        self.admitted = Some((request.id, per_sequence));
        Ok(kept_room)
    }
}

fn check_caps(
    caps: &MemoryCaps,
    request_bytes: usize,
    tokens: usize,
    sequences: usize,
    in_use: impl FnOnce() -> InUse,
) -> std::result::Result<KeptRoom, String> {
    let size = format!(
        "{} of attention state ({tokens} tokens{})",
        format_bytes(request_bytes),
        if sequences > 1 {
            format!(" x {sequences} sequences")
        } else {
            String::new()
        }
    );
    if let Some(cap) = caps.max_request_memory {
        if request_bytes > cap {
            return Err(format!(
                "qllm: the request needs up to {size}, over the per-request limit \
                 `max_request_memory` = {}",
                format_bytes(cap)
            ));
        }
    }
    if let Some(cap) = caps.max_memory {
        let in_use = in_use();
        if in_use.charged_bytes.saturating_add(request_bytes) > cap {
            return Err(format!(
                "qllm: the request needs up to {size}, but the server's limit `max_memory` \
                 = {} has {} in use by {} sequences; retry later or send a shorter prompt",
                format_bytes(cap),
                format_bytes(in_use.charged_bytes),
                in_use.sequences
            ));
        }
        return Ok(Some(cap - in_use.charged_bytes - request_bytes));
    }
    Ok(None)
}

/// The refusal of a policy whose positions the model's RoPE table does not
/// cover, naming the keys that set them.
pub(crate) fn rope_table_too_small(policy: &Policy, table: usize) -> String {
    let needed = policy.positions_needed();
    match policy.positions {
        Positions::Fixed => format!(
            "qllm: `n_local` + `exc_block_size` - 1 = {needed} positions exceed the model's RoPE \
             table ({table} positions); lower `n_local` or `exc_block_size`"
        ),
        Positions::Ordered => format!(
            "qllm: `positions = \"ordered\"` needs `n_init` + (max(`topk`, `question_topk`, \
             `answer_topk`) + 1) x `block_size` + 2 x `exc_block_size` + `n_local` = {needed} \
             positions, more than the model's RoPE table ({table} positions); lower them or use \
             `positions = \"fixed\"`"
        ),
        Positions::Interpolated => format!(
            "qllm: `positions = \"interpolated\"` needs `n_local` + `exc_block_size` = {needed} \
             positions, more than the model's RoPE table ({table} positions); lower them"
        ),
    }
}

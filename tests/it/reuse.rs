//! Follow-up requests resume from the state kept for an earlier prompt: on
//! the tiny model in f32, through mistral.rs's engine.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};
use mistralrs_core::attention_hook::{
    set_attention_hook, AttentionHook, AttentionHookCtx, HookModel, HookRequest, StepSequence,
};
use mistralrs_core::ModelDType;
use qllm::{Mode, Policy, QllmConfig, QllmHook};

use crate::engine::{engine_lock, generate_tokens, load_gguf, max_abs_diff, runtime};
use crate::tiny::{self, prompt};

const NEW_TOKENS: usize = 6;
const EOS: u32 = 2;

/// Delegates to the real hook and counts the tokens each sequence's first
/// layer reads.
struct Counting {
    inner: QllmHook,
    /// `(sequence, tokens read)`, in the order sequences first ran.
    read: Mutex<Vec<(usize, usize)>>,
}

impl Counting {
    fn new(config: QllmConfig) -> Arc<Self> {
        Arc::new(Self {
            inner: QllmHook::new(config),
            read: Mutex::default(),
        })
    }

    /// Tokens read by the last sequence that ran.
    fn last_read(&self) -> usize {
        self.read.lock().unwrap().last().expect("a sequence ran").1
    }
}

impl AttentionHook for Counting {
    fn begin_step(&self, seqs: &[StepSequence<'_>]) -> Result<()> {
        self.inner.begin_step(seqs)
    }
    fn attend(
        &self,
        ctx: &AttentionHookCtx<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        if ctx.layer_idx == 0 {
            let mut read = self.read.lock().unwrap();
            for &seq in ctx.seq_ids {
                match read.iter_mut().find(|(s, _)| *s == seq) {
                    Some((_, n)) => *n += q.dim(2)?,
                    None => read.push((seq, q.dim(2)?)),
                }
            }
        }
        self.inner.attend(ctx, q, k, v)
    }
    fn admit_request(&self, request: &HookRequest<'_>) -> Result<()> {
        self.inner.admit_request(request)
    }
    fn begin_sequence(&self, seq_id: usize, request_id: usize) {
        self.inner.begin_sequence(seq_id, request_id)
    }
    fn held_prompt_tokens(&self, seq_id: usize, prompt: &[u32]) -> usize {
        self.inner.held_prompt_tokens(seq_id, prompt)
    }
    fn end_sequence(&self, seq_id: usize) {
        self.inner.end_sequence(seq_id)
    }
    fn prefill_chunk_size(&self) -> Option<usize> {
        self.inner.prefill_chunk_size()
    }
    fn model_loaded(&self, model: &HookModel) -> Option<usize> {
        self.inner.model_loaded(model)
    }
}

/// Logits of each prompt's steps, run one after the other with `hook`.
fn run(file: &std::path::Path, hook: &Arc<Counting>, prompts: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    set_attention_hook(Some(hook.clone()));
    let out = runtime().block_on(async {
        let mistralrs = load_gguf(file, ModelDType::F32).await;
        let mut out = Vec::new();
        for p in prompts {
            out.push(generate_tokens(&mistralrs, p.clone(), NEW_TOKENS, &[EOS]).await);
            // The engine drops a sequence, and so keeps its final state,
            // just after its response.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !hook.inner.sequence_ids().is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        out
    });
    set_attention_hook(None);
    out
}

fn config(mode: Mode, topk: usize) -> QllmConfig {
    QllmConfig::from(Policy {
        mode,
        n_init: 4,
        n_local: 48,
        block_size: 8,
        exc_block_size: 16,
        topk,
        repr_topk: 2,
        ..Policy::default()
    })
    .with_prefill_chunk_size(16)
}

/// [`config`] with no prefixes kept: every prompt is read whole.
fn without_reuse(mode: Mode, topk: usize) -> QllmConfig {
    let mut config = config(mode, topk);
    config.caps.prefix_cache_memory = 0;
    config
}

#[test]
fn a_prompt_that_extends_a_kept_one_reads_only_its_new_tokens_and_gets_a_fresh_reads_logits() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write(dir.path(), 11, 0.3);
    // The first prompt's state is kept at its last chunk boundary before
    // its last token (208 of 209 tokens: chunks of 16), where execution
    // blocks of 16 begin whatever follows; the longer prompt resumes there
    // and reads the rest as a fresh read of it does, also when `topk` 2 of
    // about 20 blocks are retrieved.
    let first = prompt(209, 5);
    let longer = prompt(300, 5);
    assert!(longer.starts_with(&first));
    for (mode, topk) in [
        (Mode::Dense, 2),
        (Mode::Infllm, 2),
        (Mode::Infllm, 64),
        (Mode::Qllm, 2),
        (Mode::Streaming, 0),
    ] {
        let fresh_config = without_reuse(mode, topk);
        let fresh = Counting::new(fresh_config);
        let expected = run(&file, &fresh, std::slice::from_ref(&longer));
        assert_eq!(fresh.last_read(), 300 + NEW_TOKENS - 1, "{mode:?}");

        let hook = Counting::new(config(mode, topk));
        let got = run(&file, &hook, &[first.clone(), longer.clone()]);
        assert_eq!(hook.last_read(), 300 - 208 + NEW_TOKENS - 1, "{mode:?}");
        let diff = max_abs_diff(&expected, &got[1..]);
        assert!(
            diff <= 1e-4,
            "{mode:?} topk {topk}: max abs logit difference {diff}"
        );
        // One state per prompt: at 208 tokens, and the longer one's at 288.
        assert_eq!(hook.inner.prefix_stats().entries, 2, "{mode:?}");
        hook.inner.clear_prefixes();
        assert_eq!(hook.inner.prefix_stats().bytes, 0);
    }

    // `qllm` with a question, the same for both requests: read in line at
    // tokens 240..252 of the longer prompt (absent from the first one), the
    // kept state goes on as a fresh read with that question.
    let question = longer[240..252].to_vec();
    let fresh_config = without_reuse(Mode::Qllm, 2);
    let fresh = Counting::new(fresh_config);
    fresh.inner.set_question(Some(question.clone()));
    let expected = run(&file, &fresh, std::slice::from_ref(&longer));
    let hook = Counting::new(config(Mode::Qllm, 2));
    hook.inner.set_question(Some(question));
    let got = run(&file, &hook, &[first.clone(), longer.clone()]);
    assert_eq!(hook.last_read(), 300 - 208 + NEW_TOKENS - 1);
    let diff = max_abs_diff(&expected, &got[1..]);
    assert!(
        diff <= 1e-4,
        "qllm with a question: max abs logit difference {diff}"
    );
    // The question steers: without it the logits differ.
    let plain = Counting::new(config(Mode::Qllm, 2));
    let without = run(&file, &plain, std::slice::from_ref(&longer));
    assert!(max_abs_diff(&expected, &without) > 1e-3);
}

#[test]
fn a_follow_up_after_the_answer_resumes_and_edited_history_reads_all() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write(dir.path(), 11, 0.3);
    // The first request's answer and a new message follow its prompt, as a
    // chat's next turn sends them: it resumes at 192 of the first prompt's
    // 208 tokens and gives a fresh read's logits.
    let first = prompt(208, 7);
    let fresh_config = without_reuse(Mode::Qllm, 2);
    let fresh = Counting::new(fresh_config);
    let answered = run(&file, &fresh, std::slice::from_ref(&first));
    let answer: Vec<u32> = answered[0]
        .iter()
        .map(|logits| {
            let mut best = 0;
            for (i, &l) in logits.iter().enumerate() {
                if i as u32 != EOS && l > logits[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect();
    let mut follow_up = first.clone();
    follow_up.extend_from_slice(&answer);
    follow_up.extend(prompt(40, 9));
    // Kept states belong to the loaded model: each `run` loads it anew, so
    // the first prompt is read again in the same run.
    let hook = Counting::new(config(Mode::Qllm, 2));
    let got = run(&file, &hook, &[first.clone(), follow_up.clone()]);
    assert_eq!(hook.last_read(), follow_up.len() - 192 + NEW_TOKENS - 1);
    let expected = run(&file, &fresh, std::slice::from_ref(&follow_up));
    let diff = max_abs_diff(&expected, &got[1..]);
    assert!(diff <= 1e-4, "max abs logit difference {diff}");

    // The same history with one token of the first prompt changed: nothing
    // kept begins it.
    let mut edited = follow_up.clone();
    edited[100] = edited[100] % 200 + 3;
    assert_ne!(edited[100], follow_up[100]);
    run(&file, &hook, &[first.clone(), edited.clone()]);
    assert_eq!(hook.last_read(), edited.len() + NEW_TOKENS - 1);
    // And a new model load drops what was kept.
    run(&file, &hook, std::slice::from_ref(&follow_up));
    assert_eq!(hook.last_read(), follow_up.len() + NEW_TOKENS - 1);

    // A budget of 0 keeps nothing.
    let off = without_reuse(Mode::Qllm, 2);
    let hook = Counting::new(off);
    run(&file, &hook, &[first.clone(), follow_up.clone()]);
    assert_eq!(hook.last_read(), follow_up.len() + NEW_TOKENS - 1);
    assert_eq!(hook.inner.prefix_stats().entries, 0);
}

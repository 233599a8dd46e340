//! The `dense` hook reproduces mistral.rs's own attention exactly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor};
use mistralrs_core::attention_hook::{
    set_attention_hook, AttentionHook, AttentionHookCtx, StepSequence,
};
use mistralrs_core::{MistralRs, ModelDType};
use qllm::{QllmConfig, QllmHook};

use crate::engine::{engine_lock, generate_tokens, load_gguf, max_abs_diff, runtime};
use crate::tiny;

/// Delegates to the real hook and records the widest batch it served.
struct Recording {
    inner: QllmHook,
    max_rows: AtomicUsize,
}

impl AttentionHook for Recording {
    fn begin_step(&self, seqs: &[StepSequence<'_>]) -> Result<()> {
        self.max_rows.fetch_max(seqs.len(), Ordering::Relaxed);
        self.inner.begin_step(seqs)
    }
    fn attend(
        &self,
        ctx: &AttentionHookCtx<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        self.inner.attend(ctx, q, k, v)
    }
    fn end_sequence(&self, seq_id: usize) {
        self.inner.end_sequence(seq_id)
    }
    fn prefill_chunk_size(&self) -> Option<usize> {
        self.inner.prefill_chunk_size()
    }
}

const DECODE_STEPS: usize = 16;
const EOS: u32 = 2;

fn prompts() -> [Vec<u32>; 2] {
    let vocab = tiny::vocab_size() as u32;
    let make = |len: u32, salt: u32| {
        (0..len)
            .map(|i| 3 + (i * 37 + salt * 11) % (vocab - 3))
            .collect()
    };
    [make(45, 1), make(46, 2)]
}

/// With `together`, both prompts at the same time: the shorter one catches up
/// and the two then decode in one batch. Otherwise one after the other.
/// Returns the engine too, so callers can inspect it while it still runs.
async fn run_pair(file: &std::path::Path, together: bool) -> (Arc<MistralRs>, Vec<Vec<Vec<f32>>>) {
    let mistralrs = load_gguf(file, ModelDType::F32).await;
    let [a, b] = prompts();
    let (la, lb) = if together {
        tokio::join!(
            generate_tokens(&mistralrs, a, DECODE_STEPS + 1, &[EOS]),
            generate_tokens(&mistralrs, b, DECODE_STEPS + 1, &[EOS]),
        )
    } else {
        let la = generate_tokens(&mistralrs, a, DECODE_STEPS + 1, &[EOS]).await;
        (
            la,
            generate_tokens(&mistralrs, b, DECODE_STEPS + 1, &[EOS]).await,
        )
    };
    (mistralrs, vec![la, lb])
}

#[test]
fn dense_hook_matches_builtin_attention_for_a_batch_of_two() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write(dir.path(), 7, 0.3);
    let rt = runtime();

    // The reference runs each sequence alone: mistral.rs 0.8.1's own batched
    // decode of sequences with different histories does not reproduce its
    // single-sequence logits on CPU, so it cannot serve as the oracle.
    set_attention_hook(None);
    let (_, reference) = rt.block_on(run_pair(&file, false));
    assert_eq!(reference[0].len(), DECODE_STEPS + 1);
    assert_eq!(reference[1].len(), DECODE_STEPS + 1);

    // Small chunks, so the 45- and 46-token prompts are fed in several pieces.
    let config = QllmConfig {
        prefill_chunk_size: 16,
        ..QllmConfig::dense()
    };
    let hook = Arc::new(Recording {
        inner: QllmHook::new(config),
        max_rows: AtomicUsize::new(0),
    });
    set_attention_hook(Some(hook.clone()));
    let (engine, hooked) = rt.block_on(run_pair(&file, true));

    let diff = max_abs_diff(&reference, &hooked);
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    assert_eq!(
        hook.max_rows.load(Ordering::Relaxed),
        2,
        "the two sequences never shared a step"
    );
    // The logits must be informative, or equality would prove nothing.
    let spread = reference[0][0].iter().fold(f32::MIN, |m, &x| m.max(x))
        - reference[0][0].iter().fold(f32::MAX, |m, &x| m.min(x));
    assert!(spread > 1.0, "logit spread {spread}");
    // Finished sequences are dropped by the running engine's next scheduling
    // pass; that is when their state must go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while hook.inner.memory_stats().sequences != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        hook.inner.memory_stats().sequences,
        0,
        "state of finished sequences was not freed"
    );
    rt.block_on(async move { drop(engine) });
    set_attention_hook(None);
}

//! The `dense` hook reproduces mistral.rs's own attention exactly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};
use mistralrs_core::attention_hook::{
    set_attention_hook, AttentionHook, AttentionHookCtx, StepSequence,
};
use mistralrs_core::{MistralRs, ModelDType};
use qllm::{QllmConfig, QllmHook};

use crate::engine::{engine_lock, generate_tokens, load_gguf, max_abs_diff, runtime};
use crate::tiny::{self, Arch};

/// Delegates to the real hook and records the widest batch it served, the
/// steps each sequence took and the sequences that ended.
struct Recording {
    inner: QllmHook,
    max_rows: AtomicUsize,
    /// (prompt steps, decode steps) by sequence id.
    steps: Mutex<BTreeMap<usize, (usize, usize)>>,
    ended: Mutex<Vec<usize>>,
}

impl Recording {
    fn new(inner: QllmHook) -> Self {
        Self {
            inner,
            max_rows: AtomicUsize::new(0),
            steps: Mutex::default(),
            ended: Mutex::default(),
        }
    }
}

impl AttentionHook for Recording {
    fn begin_step(&self, seqs: &[StepSequence<'_>]) -> Result<()> {
        self.max_rows.fetch_max(seqs.len(), Ordering::Relaxed);
        let mut steps = self.steps.lock().unwrap();
        for seq in seqs {
            let (prompt, decode) = steps.entry(seq.seq_id).or_default();
            *if seq.is_prompt { prompt } else { decode } += 1;
        }
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
        self.ended.lock().unwrap().push(seq_id);
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
    for arch in Arch::ALL {
        let file = tiny::write_arch(dir.path(), arch, 7, 0.3);
        dense_hook_matches_builtin_attention(arch, &file);
    }
}

fn dense_hook_matches_builtin_attention(arch: Arch, file: &std::path::Path) {
    let rt = runtime();

    // The reference runs each sequence alone: mistral.rs 0.8.1's own batched
    // decode of sequences with different histories does not reproduce its
    // single-sequence logits on CPU, so it cannot serve as the oracle.
    set_attention_hook(None);
    let (_, reference) = rt.block_on(run_pair(file, false));
    assert_eq!(reference[0].len(), DECODE_STEPS + 1);
    assert_eq!(reference[1].len(), DECODE_STEPS + 1);

    // Small chunks, so the 45- and 46-token prompts are fed in several pieces.
    let config = QllmConfig::dense().with_prefill_chunk_size(16);
    let hook = Arc::new(Recording::new(QllmHook::new(config)));
    set_attention_hook(Some(hook.clone()));
    let (engine, hooked) = rt.block_on(run_pair(file, true));

    let diff = max_abs_diff(&reference, &hooked);
    assert!(diff <= 1e-4, "{arch:?}: max abs logit difference {diff}");
    assert_eq!(
        hook.max_rows.load(Ordering::Relaxed),
        2,
        "{arch:?}: the two sequences never shared a step"
    );
    // The logits must be informative, or equality would prove nothing.
    let spread = reference[0][0].iter().fold(f32::MIN, |m, &x| m.max(x))
        - reference[0][0].iter().fold(f32::MAX, |m, &x| m.min(x));
    assert!(spread > 1.0, "{arch:?}: logit spread {spread}");
    // Finished sequences are dropped by the running engine's next scheduling
    // pass; that is when their state must go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while hook.inner.memory_stats().sequences != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        hook.inner.memory_stats().sequences,
        0,
        "{arch:?}: state of finished sequences was not freed"
    );
    rt.block_on(async move { drop(engine) });
    set_attention_hook(None);
}

#[test]
fn each_sequence_gets_one_prompt_step_and_a_step_per_further_token() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write(dir.path(), 7, 0.3);
    let rt = runtime();
    let hook = Arc::new(Recording::new(QllmHook::new(QllmConfig::dense())));
    set_attention_hook(Some(hook.clone()));
    // Sent at once, prompts of different lengths: the engine's bucketing
    // parks one while the other runs. One request is finished by its prompt
    // step (one token); the other decodes three more.
    let [a, b] = prompts();
    let b: Vec<u32> = b.iter().chain(&b).copied().collect();
    let engine = rt.block_on(async {
        let mistralrs = load_gguf(&file, ModelDType::F32).await;
        // Only the two requests' sequences count, not any the engine ran
        // while loading.
        hook.steps.lock().unwrap().clear();
        hook.ended.lock().unwrap().clear();
        tokio::join!(
            generate_tokens(&mistralrs, a, 1, &[EOS]),
            generate_tokens(&mistralrs, b, 4, &[EOS]),
        );
        mistralrs
    });
    // Finished sequences end in the step that finishes them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while hook.ended.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut ended = hook.ended.lock().unwrap().clone();
    ended.sort_unstable();
    let stepped: Vec<usize> = hook.steps.lock().unwrap().keys().copied().collect();
    // A third request, run to its end, is the barrier: any step the engine
    // should not take of the first two would come before it is answered.
    rt.block_on(generate_tokens(&engine, prompts()[0].clone(), 1, &[EOS]));
    let steps: BTreeMap<usize, (usize, usize)> = hook
        .steps
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _)| stepped.contains(id))
        .map(|(&id, &counts)| (id, counts))
        .collect();
    rt.block_on(async move { drop(engine) });
    set_attention_hook(None);
    assert_eq!(
        ended,
        steps.keys().copied().collect::<Vec<_>>(),
        "{steps:?}"
    );
    let mut per_sequence: Vec<(usize, usize)> = steps.into_values().collect();
    per_sequence.sort_unstable();
    assert_eq!(
        per_sequence,
        [(1, 0), (1, 3)],
        "(prompt, decode) steps per sequence"
    );
}

//! The hook in every dtype mistral.rs may pick (F32, F16, BF16; `auto` picks a
//! half dtype on most CPUs) for every wired architecture: the `dense` hook
//! gives the built-in attention's logits within the dtype's tolerance,
//! `qllm` with a window covering the prompt gives `dense`'s, and `qllm` with
//! a short window runs past the model's trained context.

use std::path::Path;
use std::sync::Arc;

use mistralrs_core::attention_hook::{set_attention_hook, AttentionHook};
use mistralrs_core::ModelDType;
use qllm::{Policy, QllmConfig, QllmHook};

use crate::engine::{engine_lock, generate_tokens, load_gguf, max_abs_diff, runtime};
use crate::tiny::{self, prompt, Arch};

const DECODE_STEPS: usize = 8;
const EOS: u32 = 2;

/// Logits of each prompt (run one after the other) with `hook` installed.
fn logits(
    file: &Path,
    dtype: ModelDType,
    hook: Option<Arc<dyn AttentionHook>>,
    prompts: &[Vec<u32>],
) -> Vec<Vec<Vec<f32>>> {
    set_attention_hook(hook);
    let out = runtime().block_on(async {
        let mistralrs = load_gguf(file, dtype).await;
        let mut out = Vec::new();
        for p in prompts {
            out.push(generate_tokens(&mistralrs, p.clone(), DECODE_STEPS + 1, &[EOS]).await);
        }
        out
    });
    set_attention_hook(None);
    out
}

/// Largest logit difference allowed between two attention implementations:
/// the built-in path computes attention in the model's dtype, the hook in
/// f32, so half dtypes differ by rounding of the activations (a few units of
/// their last place over two layers), never by O(1) as a wrong position or
/// mask would.
fn tolerance(dtype: ModelDType) -> f32 {
    match dtype {
        ModelDType::F16 => 0.02,
        ModelDType::BF16 => 0.15,
        _ => 1e-4,
    }
}

fn qllm(n_local: usize) -> QllmConfig {
    QllmConfig::from(Policy {
        n_init: 4,
        n_local,
        block_size: 8,
        exc_block_size: 16,
        topk: 2,
        repr_topk: 2,
        ..Policy::default()
    })
    .with_prefill_chunk_size(16)
}

#[test]
fn the_hook_runs_in_every_dtype_for_every_architecture() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let prompts = [prompt(45, 1), prompt(30, 2)];
    let mut report = Vec::new();
    for arch in Arch::ALL {
        let file = tiny::write_arch(dir.path(), arch, 17, 0.3);
        for dtype in [ModelDType::F32, ModelDType::F16, ModelDType::BF16] {
            let tol = tolerance(dtype);
            let builtin = logits(&file, dtype, None, &prompts);
            let spread = builtin[0][0].iter().fold(f32::MIN, |m, &x| m.max(x))
                - builtin[0][0].iter().fold(f32::MAX, |m, &x| m.min(x));
            assert!(spread > 1.0, "{arch:?} {dtype:?}: logit spread {spread}");

            let dense_hook = Arc::new(QllmHook::new(
                QllmConfig::dense().with_prefill_chunk_size(16),
            ));
            let dense = logits(&file, dtype, Some(dense_hook), &prompts);
            let d_dense = max_abs_diff(&builtin, &dense);

            let covering = logits(
                &file,
                dtype,
                Some(Arc::new(QllmHook::new(qllm(64)))),
                &prompts,
            );
            let d_qllm = max_abs_diff(&dense, &covering);
            report.push(format!(
                "{arch:?} {dtype:?}: dense vs built-in {d_dense:.2e}, qllm vs dense {d_qllm:.2e}"
            ));
            assert!(
                d_dense <= tol,
                "{arch:?} {dtype:?}: dense hook vs built-in {d_dense} > {tol}"
            );
            assert!(
                d_qllm <= tol,
                "{arch:?} {dtype:?}: qllm vs dense {d_qllm} > {tol}"
            );

            // Past the trained context (512) with a 32-token window: every
            // step runs, and the logits stay finite.
            let long = [prompt(tiny::CONTEXT_LEN + 100, 3)];
            let beyond = logits(&file, dtype, Some(Arc::new(QllmHook::new(qllm(32)))), &long);
            assert_eq!(beyond[0].len(), DECODE_STEPS + 1, "{arch:?} {dtype:?}");
            assert!(
                beyond[0].iter().flatten().all(|x| x.is_finite()),
                "{arch:?} {dtype:?}: non-finite logits past the window"
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

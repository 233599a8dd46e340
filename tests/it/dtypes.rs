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

use crate::engine::{engine_lock, forced_logits, load_gguf, max_abs_diff, runtime, try_load_gguf};
use crate::tiny::{self, prompt, Arch};

const DECODE_STEPS: usize = 16;

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
            out.push(
                forced_logits(&mistralrs, p.clone(), &prompt(DECODE_STEPS as u32 + 1, 9)).await,
            );
        }
        out
    });
    set_attention_hook(None);
    out
}

/// Largest logit difference allowed between two attention implementations
/// in `dtype`, given `rounding`, how far the built-in attention in `dtype`
/// is from itself in f32. The built-in path computes attention in the
/// model's dtype, the hook in f32, so half dtypes differ by rounding of the
/// activations (a few units of their last place over two layers, more where
/// block-quantized projections requantize them, as phi3's do), never by O(1)
/// as a wrong position or mask would: at most the dtype's floor or twice the
/// built-in path's own rounding.
fn tolerance(dtype: ModelDType, rounding: f32) -> f32 {
    let floor: f32 = match dtype {
        ModelDType::F16 => 0.02,
        ModelDType::BF16 => 0.15,
        _ => return 1e-4,
    };
    floor.max(2.0 * rounding)
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
        let builtin_f32 = logits(&file, ModelDType::F32, None, &prompts);
        for dtype in [ModelDType::F32, ModelDType::F16, ModelDType::BF16] {
            let builtin = logits(&file, dtype, None, &prompts);
            let rounding = max_abs_diff(&builtin, &builtin_f32);
            let tol = tolerance(dtype, rounding);
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
                "{arch:?} {dtype:?}: dense vs built-in {d_dense:.2e}, qllm vs dense {d_qllm:.2e} \
                 (built-in vs its f32 {rounding:.2e}, bound {tol:.2e})"
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
            // Memory blocks as 8-bit rows, quantized from any model dtype.
            // With every block retrieved (no pick can flip), the logits stay
            // within the rounding of the blocks' values.
            let every_block = |block_dtype| {
                let mut config = qllm(32);
                config.policy.topk = 128;
                config.policy.block_dtype = block_dtype;
                logits(&file, dtype, Some(Arc::new(QllmHook::new(config))), &long)
            };
            let model_blocks = every_block(qllm::BlockDType::Model);
            let q8_blocks = every_block(qllm::BlockDType::Q8_0);
            assert_eq!(q8_blocks[0].len(), DECODE_STEPS + 1, "{arch:?} {dtype:?}");
            let d_q8 = max_abs_diff(&model_blocks, &q8_blocks);
            // Rounding to 8 bits (at most 0.4% of a row's largest value)
            // moves these logits by about a tenth; a lost scale or a wrong
            // row moves them by whole units, as a flipped retrieval does.
            assert!(
                d_q8 > 0.0 && d_q8 < 0.3,
                "{arch:?} {dtype:?}: 8-bit blocks moved the logits by {d_q8}"
            );
            if dtype == ModelDType::F32 {
                // A window shorter than the 45-token prompt must change the
                // logits: the policy, not only the hook's call, reaches the
                // model's attention.
                let short = logits(
                    &file,
                    dtype,
                    Some(Arc::new(QllmHook::new(qllm(32)))),
                    &prompts,
                );
                let changed = max_abs_diff(&dense, &short);
                assert!(
                    changed > 1e-2,
                    "{arch:?}: a 32-token window changed the logits by {changed}"
                );
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn an_architecture_the_hook_is_not_wired_into_is_refused_at_load_with_the_supported_list() {
    let _guard = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny::write_unwired(dir.path(), "starcoder2");
    set_attention_hook(Some(Arc::new(QllmHook::new(QllmConfig::dense()))));
    let loaded = runtime().block_on(try_load_gguf(&file, ModelDType::F32));
    set_attention_hook(None);
    let error = loaded
        .err()
        .expect("a starcoder2 GGUF must be refused while a hook is installed");
    let supported: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
    assert!(
        error.contains("GGUF `starcoder2` models (or adapters) do not support one")
            && supported.iter().all(|name| error.contains(name)),
        "{error}"
    );
}

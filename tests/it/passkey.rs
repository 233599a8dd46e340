//! SmolLM2 finds a pass key hidden in about 4K tokens of filler at depths
//! 10%, 50% and 90%, with full attention (`dense`) and with Q-LLM.

use std::sync::Arc;

use mistralrs_core::attention_hook::set_attention_hook;
use mistralrs_core::{ModelDType, RequestMessage};
use qllm::eval::EngineTokenizer;
use qllm::{passkey, Mode, QllmConfig, QllmHook};

use crate::assets;
use crate::engine::{engine_lock, greedy, load_gguf, runtime};

/// Answers for depths 10%, 50% and 90% of a prompt of about `target` tokens.
fn passkey_cells(mode: Mode, target: usize) -> Vec<(u32, usize, String)> {
    let hook = Arc::new(QllmHook::new(QllmConfig {
        mode,
        ..QllmConfig::default()
    }));
    set_attention_hook(Some(hook.clone()));
    let rt = runtime();
    let mistralrs = rt.block_on(load_gguf(&assets::smollm2(), ModelDType::F32));
    let tokenizer = EngineTokenizer::new(&mistralrs).unwrap();
    let tokens = |text: &str| tokenizer.encode(text).unwrap();
    hook.set_question(Some(tokens(passkey::QUESTION)));
    let fixed = tokens(&passkey::fixed_text(12345)).len();
    let per_unit = tokens(&passkey::FILLER.repeat(64)).len() as f64 / 64.0;
    let units = passkey::filler_units_for(target, fixed, per_unit);
    let mut cells = Vec::new();
    for (cell, depth) in [0.1, 0.5, 0.9].into_iter().enumerate() {
        let key = passkey::key(1, cell as u64);
        let prompt = passkey::prompt(units, depth, key);
        let len = tokens(&prompt).len();
        let message = RequestMessage::Completion {
            text: prompt,
            echo_prompt: false,
            best_of: None,
        };
        let answer = rt.block_on(greedy(&mistralrs, message, 8, vec![]));
        cells.push((key, len, answer));
    }
    set_attention_hook(None);
    cells
}

/// Checks the depths at which `mode` must find the key.
fn assert_found(mode: Mode, cells: &[(u32, usize, String)], must_find: [bool; 3]) {
    for ((key, len, answer), must) in cells.iter().zip(must_find) {
        assert!((3900..4300).contains(len), "prompt of {len} tokens");
        let found = answer.contains(&key.to_string());
        eprintln!("{mode:?}: {len} tokens, key {key}, found {found}, answer {answer:?}");
        if must {
            assert!(
                found,
                "{mode:?}: key {key} not in answer {answer:?} ({len} tokens)"
            );
        }
    }
}

/// Measured on this model and prompt (see the README): full attention misses
/// the key at 90% and Q-LLM (`1k` preset) at 10%. What must hold: full
/// attention finds it at 10% and 50%; Q-LLM finds it at 50%, about 2K tokens
/// before the end, outside the sinks and the 512-token window, so only
/// through a retrieved memory block, and at 90% inside the window.
#[test]
fn smollm2_finds_the_pass_key_in_4k_tokens_dense_and_qllm() {
    let _guard = engine_lock();
    assert_found(
        Mode::Dense,
        &passkey_cells(Mode::Dense, 4096),
        [true, true, false],
    );
    assert_found(
        Mode::Qllm,
        &passkey_cells(Mode::Qllm, 4096),
        [false, true, true],
    );
}

//! SmolLM2 finds a pass key hidden in about 4K tokens of filler at depths
//! 10%, 50% and 90%, with full attention (`dense`) and with Q-LLM.

use std::sync::Arc;

use either::Either;
use mistralrs_core::attention_hook::set_attention_hook;
use mistralrs_core::{MistralRs, ModelDType, Request, RequestMessage, TokenizationRequest};
use qllm::{passkey, Mode, QllmConfig, QllmHook};

use crate::assets;
use crate::engine::{engine_lock, greedy, load_gguf, runtime};

async fn tokenize(mistralrs: &MistralRs, text: &str) -> Vec<u32> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let request = TokenizationRequest {
        text: Either::Right(text.to_string()),
        tools: None,
        add_generation_prompt: false,
        add_special_tokens: false,
        enable_thinking: None,
        reasoning_effort: None,
        response: tx,
    };
    mistralrs
        .get_sender(None)
        .unwrap()
        .send(Request::Tokenize(request))
        .await
        .unwrap();
    rx.recv().await.unwrap().unwrap()
}

/// Answers for depths 10%, 50% and 90% of a prompt of about `target` tokens.
fn passkey_cells(mode: Mode, target: usize) -> Vec<(u32, usize, String)> {
    let hook = Arc::new(QllmHook::new(QllmConfig {
        mode,
        ..QllmConfig::default()
    }));
    set_attention_hook(Some(hook.clone()));
    let rt = runtime();
    let cells = rt.block_on(async {
        let mistralrs = load_gguf(&assets::smollm2(), ModelDType::F32).await;
        hook.set_question(Some(tokenize(&mistralrs, passkey::QUESTION).await));
        let fixed = tokenize(&mistralrs, &passkey::fixed_text(12345))
            .await
            .len();
        let per_unit = tokenize(&mistralrs, &passkey::FILLER.repeat(64))
            .await
            .len() as f64
            / 64.0;
        let units = passkey::filler_units_for(target, fixed, per_unit);
        let mut cells = Vec::new();
        for (cell, depth) in [0.1, 0.5, 0.9].into_iter().enumerate() {
            let key = passkey::key(1, cell as u64);
            let prompt = passkey::prompt(units, depth, key);
            let len = tokenize(&mistralrs, &prompt).await.len();
            let message = RequestMessage::Completion {
                text: prompt,
                echo_prompt: false,
                best_of: None,
            };
            let answer = greedy(&mistralrs, message, 8, vec![]).await;
            cells.push((key, len, answer));
        }
        cells
    });
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

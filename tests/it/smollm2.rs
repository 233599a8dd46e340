//! SmolLM2-135M-Instruct (GGUF Q4_1) through the `dense` hook.

use std::sync::Arc;

use indexmap::IndexMap;
use mistralrs_core::attention_hook::set_attention_hook;
use mistralrs_core::{MessageContent, ModelDType, RequestMessage};
use qllm::{QllmConfig, QllmHook};

use crate::assets;
use crate::engine::{engine_lock, greedy, load_gguf, runtime};

pub const PARIS_QUESTION: &str = "What is the capital of France? Answer in one word.";

pub fn chat(text: &str) -> RequestMessage {
    let mut message = IndexMap::new();
    message.insert("role".to_string(), MessageContent::Left("user".to_string()));
    message.insert(
        "content".to_string(),
        MessageContent::Left(text.to_string()),
    );
    RequestMessage::Chat {
        messages: vec![message],
        enable_thinking: None,
        reasoning_effort: None,
    }
}

#[test]
fn smollm2_through_the_dense_hook_completes_and_answers() {
    let _guard = engine_lock();
    let hook = Arc::new(QllmHook::new(QllmConfig::dense()));
    set_attention_hook(Some(hook.clone()));
    let rt = runtime();
    let (fox, paris) = rt.block_on(async {
        let mistralrs = load_gguf(&assets::smollm2(), ModelDType::Auto).await;
        let fox = greedy(
            &mistralrs,
            RequestMessage::Completion {
                text: "The quick brown fox jumps over the lazy".to_string(),
                echo_prompt: false,
                best_of: None,
            },
            1,
            vec![],
        )
        .await;
        let paris = greedy(&mistralrs, chat(PARIS_QUESTION), 16, vec![]).await;
        (fox, paris)
    });
    set_attention_hook(None);
    assert_eq!(fox.trim_start(), "dog", "top-1 continuation");
    assert!(paris.contains("Paris"), "answer: {paris:?}");
}

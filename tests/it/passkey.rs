//! SmolLM2 finds pass keys hidden half-way through about 4K tokens of
//! filler: 2K tokens before the question, outside the sinks and the 512-token
//! window of the `1k` preset, so Q-LLM can only read them from retrieved
//! memory blocks. The hook's needle trace says whether it did.

use std::sync::Arc;

use mistralrs_core::attention_hook::set_attention_hook;
use mistralrs_core::ModelDType;
use qllm::eval::passkey;
use qllm::eval::{complete, EngineTokenizer};
use qllm::RequestOptions;
use qllm::{Mode, Policy, QllmHook};

use crate::assets;
use crate::engine::{engine_lock, load_gguf, runtime};

/// Keys asked, one prompt each.
const KEYS: u64 = 3;

/// One answered prompt.
struct Cell {
    key: u32,
    prompt_tokens: usize,
    answer: String,
    /// Layers (of 30) whose first decode step attended the whole needle.
    layers_retrieving: Option<usize>,
}

impl Cell {
    fn found(&self) -> bool {
        self.answer.contains(&self.key.to_string())
    }
}

/// Answers under `mode` for the first `keys` keys at depth 50%, with the question
/// given to the hook (a probe pass reads it before the document) and the
/// needle traced.
fn passkey_cells(mode: Mode, keys: u64) -> Vec<Cell> {
    let hook = Arc::new(QllmHook::new(Policy {
        mode,
        ..Policy::default()
    }));
    set_attention_hook(Some(hook.clone()));
    let rt = runtime();
    let mistralrs = rt.block_on(load_gguf(&assets::smollm2(), ModelDType::F32));
    let tokenizer = EngineTokenizer::new(&mistralrs).unwrap();
    let tokens = |text: &str| tokenizer.encode(text).unwrap();
    let fixed = tokens(&passkey::fixed_text(12345)).len();
    let per_unit = tokens(&passkey::FILLER.repeat(64)).len() as f64 / 64.0;
    let units = passkey::filler_units_for(4096, fixed, per_unit);
    let mut cells = Vec::new();
    for cell in 0..keys {
        let key = passkey::key(1, cell);
        let prompt = passkey::prompt(units, 0.5, key);
        let needle = passkey::needle(key);
        let at = prompt.find(&needle).expect("the needle is in the prompt");
        let start = tokens(&prompt[..at]).len();
        let options = RequestOptions {
            question: Some(passkey::QUESTION.into()),
            needle_span: Some(start..start + tokens(&needle).len()),
            ..RequestOptions::default()
        };
        let done = rt
            .block_on(complete(&mistralrs, prompt, 8, Some((&hook, &options))))
            .unwrap();
        let needle = done.report.and_then(|r| r.needle);
        cells.push(Cell {
            key,
            prompt_tokens: done.usage.prompt_tokens,
            answer: done.text,
            layers_retrieving: needle.and_then(|n| n.at_decode.first().copied()),
        });
    }
    set_attention_hook(None);
    cells
}

/// What must hold: full attention (the model inside its 8K window) finds
/// the key, so the prompt is answerable; Q-LLM retrieves the needle's blocks
/// in most layers for every key and finds at least two of the three keys.
#[test]
fn smollm2_finds_pass_keys_2k_tokens_back_through_retrieved_blocks() {
    let _guard = engine_lock();
    let dense = passkey_cells(Mode::Dense, 1);
    let qllm = passkey_cells(Mode::Qllm, KEYS);
    for (mode, cell) in dense
        .iter()
        .map(|c| ("dense", c))
        .chain(qllm.iter().map(|c| ("qllm", c)))
    {
        eprintln!(
            "{mode}: {} tokens, key {}, found {}, needle retrieved by {:?} of 30 layers, \
             answer {:?}",
            cell.prompt_tokens,
            cell.key,
            cell.found(),
            cell.layers_retrieving,
            cell.answer
        );
        assert!((3900..4300).contains(&cell.prompt_tokens));
    }
    assert!(dense[0].found(), "dense: {:?}", dense[0].answer);
    for cell in &qllm {
        let layers = cell.layers_retrieving.expect("the needle is traced");
        assert!(
            layers >= 20,
            "key {}: needle retrieved by {layers} of 30 layers at the first decode step",
            cell.key
        );
    }
    let found = qllm.iter().filter(|c| c.found()).count();
    assert!(found >= 2, "qllm found {found} of {KEYS} keys");
}

//! `mistralrs --qllm serve` with the `qllm` request extension, over real HTTP.

use mistralrs_core::ModelDType;
use qllm::eval::passkey;
use qllm::eval::{self, Corpus, EngineTokenizer, Placement, Task};
use serde_json::{json, Value};

use crate::assets;
use crate::cli::{self, http, Server};
use crate::engine::{engine_lock, load_gguf, runtime};

/// Filler units for a chat prompt of about 12K tokens (SmolLM2: about 25
/// tokens per unit).
const UNITS_12K: usize = 480;

fn start_server() -> (Server, u16) {
    cli::start_server(&[], &[], &assets::smollm2(), true)
}

/// The question of the chat tests: SmolLM2 answers the pass key in chat
/// when asked for the number only (even with full attention at 2K tokens it
/// does not when asked "What is the pass key?" alone).
const QUESTION: &str = "What is the pass key? Answer with the number only.";

/// A chat message with the pass key in the middle of about `units` filler
/// units and the question last.
fn needle_chat(units: usize, key: u32) -> String {
    let half = units / 2;
    format!(
        "{}{}{}{}\n\n{QUESTION}",
        passkey::INTRO,
        passkey::FILLER.repeat(half),
        passkey::needle(key),
        passkey::FILLER.repeat(units - half),
    )
}

fn chat_body(content: &str, max_tokens: usize, stream: bool, extension: Value) -> String {
    let mut body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    });
    if !extension.is_null() {
        body["qllm"] = extension;
    }
    body.to_string()
}

fn post_json(port: u16, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = http(port, "POST", path, body).expect("request answered");
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, value)
}

/// The text of an SSE chat stream.
fn streamed_text(raw: &str) -> String {
    raw.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn serve_answers_a_12k_needle_question_streaming_and_not() {
    let (_server, port) = start_server();

    let key = passkey::key(5, 0);
    let (status, reply) = post_json(
        port,
        "/v1/chat/completions",
        &chat_body(
            &needle_chat(UNITS_12K, key),
            16,
            false,
            json!({ "needle": passkey::needle(key).trim() }),
        ),
    );
    assert_eq!(status, 200, "{reply}");
    let answer = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let report = &reply["qllm"];
    assert!(answer.contains(&key.to_string()), "{answer:?} {report}");
    let prompt_tokens = report["prompt_tokens"].as_u64().unwrap();
    assert!(
        (11_000..13_500).contains(&prompt_tokens),
        "{prompt_tokens} tokens, beyond SmolLM2's 8192"
    );
    // The question, asked at the end, is copied before the document and
    // read there, in line.
    assert_eq!(report["question_copied"], true, "{report}");
    assert_eq!(report["question_vectors"], "in line", "{report}");
    let span = &report["question_span"];
    assert!(
        span[1].as_u64().unwrap() < 64,
        "question read from its copy at the start: {span} of {prompt_tokens}"
    );
    // The needle sits near the middle, far outside the window: most layers
    // retrieve the blocks that hold it when the answer is read out.
    let needle = &report["needle"];
    let span = &needle["span"];
    let needle_start = span[0].as_u64().unwrap();
    assert!(
        prompt_tokens / 3 < needle_start && needle_start < prompt_tokens * 2 / 3,
        "{needle}"
    );
    let layers = needle["layers"].as_u64().unwrap();
    let at_decode = needle["at_decode"][0].as_u64().unwrap();
    assert!(
        layers == 30 && 2 * at_decode > layers,
        "the needle's blocks were retrieved by {at_decode} of {layers} layers at the first \
         decode step: {needle}"
    );

    let key = passkey::key(5, 1);
    let (status, raw) = http(
        port,
        "POST",
        "/v1/chat/completions",
        &chat_body(&needle_chat(UNITS_12K, key), 16, true, Value::Null),
    )
    .unwrap();
    assert_eq!(status, 200, "{raw}");
    let answer = streamed_text(&raw);
    assert!(answer.contains(&key.to_string()), "{answer:?}");
}

#[test]
fn serve_extension_question_override_off_switch_and_bad_options() {
    let (_server, port) = start_server();
    let content = "The capital of France is Paris. The capital of Italy is Rome.\n\n\
                   What is the capital of Italy? Answer in one word.";

    // The question found at the end of the message, then an explicit one.
    let (status, found) = post_json(
        port,
        "/v1/chat/completions",
        &chat_body(content, 4, false, Value::Null),
    );
    assert_eq!(status, 200, "{found}");
    let (status, explicit) = post_json(
        port,
        "/v1/chat/completions",
        &chat_body(
            content,
            4,
            false,
            json!({"question": "The capital of France is Paris."}),
        ),
    );
    assert_eq!(status, 200, "{explicit}");
    let found_span = &found["qllm"]["question_span"];
    let explicit_span = &explicit["qllm"]["question_span"];
    assert!(
        explicit_span[1].as_u64().unwrap() < found_span[0].as_u64().unwrap(),
        "explicit question {explicit_span} lies before the found one {found_span}"
    );

    // Q-LLM off: full attention, and the model's own length limit.
    let (status, off) = post_json(
        port,
        "/v1/chat/completions",
        &chat_body(content, 8, false, json!({"enabled": false})),
    );
    assert_eq!(status, 200, "{off}");
    assert_eq!(off["qllm"]["mode"], "dense");
    assert!(
        off["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Rome"),
        "{off}"
    );
    let long = needle_chat(400, 12345);
    let (status, refused) = post_json(
        port,
        "/v1/chat/completions",
        &chat_body(&long, 4, false, json!({"enabled": false})),
    );
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused.to_string().contains("greater than 8192"),
        "{refused}"
    );

    // Bad options name the key, and the server keeps serving.
    for (extension, key) in [
        (json!({"topk": -1}), "`topk`"),
        (json!({"n_local": 16}), "`exc_block_size`"),
        (json!({"question": ""}), "`question`"),
        (json!({"top_k": 3}), "top_k"),
        (json!({"preset": "8k"}), "8k"),
    ] {
        let (status, error) = post_json(
            port,
            "/v1/chat/completions",
            &chat_body(content, 4, false, extension.clone()),
        );
        assert_eq!(status, 400, "{extension}: {error}");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(key),
            "{extension}: {error}"
        );
    }
    let (status, again) = post_json(
        port,
        "/v1/completions",
        &json!({"model": "default", "prompt": "The capital of France is", "max_tokens": 2,
                "temperature": 0, "qllm": {"mode": "infllm"}})
        .to_string(),
    );
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["qllm"]["mode"], "infllm");
}

/// The `fact` task's prompt at 12K tokens with the needle at 10% (a
/// village's founding year in Paul Graham's essays, the question last),
/// built by the evaluation's generator with SmolLM2's tokenizer.
fn fact_prompt_12k() -> eval::Sample {
    fact_prompt(12_288)
}

/// The `fact` task's prompt at `tokens` tokens, needle at 10%.
fn fact_prompt(tokens: usize) -> eval::Sample {
    eval_prompt(Task::Fact, tokens, 0.1)
}

/// A prompt of the evaluation's `task` (seed 1, as `examples/eval`'s first
/// sample), question last, with SmolLM2's tokenizer.
fn eval_prompt(task: Task, tokens: usize, depth: f64) -> eval::Sample {
    let _lock = engine_lock();
    let mistralrs = runtime().block_on(load_gguf(&assets::smollm2(), ModelDType::F32));
    let tokenizer = EngineTokenizer::new(&mistralrs).unwrap();
    let corpus = Corpus::load(&assets::root().join("assets"), true, false, false)
        .expect("scripts/test.sh fetches the essays");
    eval::generate(task, tokens, depth, 1, Placement::Last, &corpus, &tokenizer).unwrap()
}

/// Asks `sample` through `/v1/completions` with the server's defaults and
/// checks the answer, and that the needle ends more than `tokens_behind`
/// tokens before the prompt's end (far behind the hook's 512-token window).
/// The defaults copy the question before the document: the report says so.
fn assert_answered_beyond_the_window(sample: &eval::Sample, tokens_behind: u64) {
    let (_server, port) = start_server();
    let (status, reply) = post_json(
        port,
        "/v1/completions",
        &json!({"model": "default", "prompt": sample.prompt, "max_tokens": 8,
                "temperature": 0})
        .to_string(),
    );
    assert_eq!(status, 200, "{reply}");
    let answer = reply["choices"][0]["text"].as_str().unwrap_or_default();
    let report = &reply["qllm"];
    assert!(
        eval::score(&sample.answers, answer) > 0.99,
        "answered {answer:?}, expected {:?}; {report}",
        sample.answers
    );
    let prompt_tokens = report["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > 12_000,
        "{prompt_tokens} tokens, beyond SmolLM2's 8192"
    );
    // Only retrieval can read it. The copy moves the needle by the
    // question's tokens (fewer than 64); `needle_end` is from before it.
    assert!(
        prompt_tokens - sample.needle_end as u64 > tokens_behind + 64,
        "{report}"
    );
    assert_eq!(report["question_copied"], true, "{report}");
    assert_eq!(report["question_vectors"], "in line", "{report}");
    assert!(
        report["question_span"][1].as_u64().unwrap() < 64,
        "{report}"
    );
}

#[test]
fn serve_answers_a_fact_in_prose_beyond_the_window_with_the_defaults() {
    assert_answered_beyond_the_window(&fact_prompt_12k(), 10_000);
}

/// RULER's essay needle (a 7-digit magic number) half-way into 12K tokens:
/// the paper's retrieval (`dot`, shared) misses it, the default finds it
/// (README, "Facts and essay needles from 2K to 64K").
#[test]
fn serve_finds_rulers_essay_needle_beyond_the_window_with_the_defaults() {
    assert_answered_beyond_the_window(&eval_prompt(Task::NiahSingle, 12_288, 0.5), 5_000);
}

/// A count in prose half-way into 12K tokens, the question last: with the
/// question copied before the document (the default) it is answered; read
/// only where it stands, the same retrieval answers "100 goats" for 69
/// (README, "Facts and essay needles from 2K to 64K").
#[test]
fn serve_answers_a_count_in_prose_beyond_the_window_with_the_question_copied_first() {
    let sample = eval_prompt(Task::Fact, 12_288, 0.5);
    assert_eq!(sample.answers, ["69"], "the grid's prompt");
    assert_answered_beyond_the_window(&sample, 5_000);
}

/// `"boundaries": "sentence"` through the server: the sentence ends come
/// from SmolLM2's own tokenizer, and blocks that begin after them overlap,
/// so the same prose fills more blocks while every token is still counted
/// once.
#[test]
fn serve_cuts_memory_blocks_at_sentence_ends_on_request() {
    let sample = fact_prompt(4096);
    let (_server, port) = start_server();
    let ask = |extension: Value| {
        let (status, reply) = post_json(
            port,
            "/v1/completions",
            &json!({"model": "default", "prompt": sample.prompt, "max_tokens": 4,
                    "temperature": 0, "qllm": extension})
            .to_string(),
        );
        assert_eq!(status, 200, "{extension}: {reply}");
        reply["qllm"].clone()
    };
    let fixed = ask(json!({}));
    let sentence = ask(json!({"boundaries": "sentence"}));
    let count = |report: &Value, key: &str| report[key].as_u64().unwrap();
    // 128 sinks, a 512-token window, blocks of 64; up to 3 answer tokens
    // read after the prompt.
    let prompt_tokens = count(&fixed, "prompt_tokens");
    assert!(prompt_tokens > 4000, "{fixed}");
    let fixed_blocks = count(&fixed, "blocks");
    assert!(
        ((prompt_tokens - 640) / 64..=(prompt_tokens + 3 - 640) / 64).contains(&fixed_blocks),
        "{fixed}"
    );
    assert!(
        count(&sentence, "blocks") > fixed_blocks + 5,
        "{sentence} against {fixed}"
    );
    assert!(
        count(&sentence, "tokens_in_memory") < count(&sentence, "blocks") * 64,
        "{sentence}"
    );
    // Both keep a window and less than a block outside the blocks (the
    // prompt's count, give or take the answer tokens read after it).
    for report in [&fixed, &sentence] {
        let outside = prompt_tokens - 128 - count(report, "tokens_in_memory");
        assert!((512 - 3..512 + 64).contains(&outside), "{report}");
    }
    let (status, error) = post_json(
        port,
        "/v1/completions",
        &json!({"model": "default", "prompt": "Hello.", "max_tokens": 1,
                "qllm": {"boundaries": "words"}})
        .to_string(),
    );
    assert_eq!(status, 400, "{error}");
    assert!(error.to_string().contains("words"), "{error}");
}

/// A two-turn chat about one document with two facts in it: the second
/// turn, which resends the first turn and its answer, resumes from the
/// state the first one kept and reads only the rest.
#[test]
fn serve_answers_a_follow_up_question_from_the_kept_state_of_the_first_turn() {
    let (_server, port) = start_server();
    let key = passkey::key(9, 0);
    let city = "Quillmoor";
    let units = UNITS_12K;
    let document = format!(
        "{}{}{}{}The secret city is called {city}. Remember it. {city} is the secret city. {}",
        passkey::INTRO,
        passkey::FILLER.repeat(units * 3 / 10),
        passkey::needle(key),
        passkey::FILLER.repeat(units * 4 / 10),
        passkey::FILLER.repeat(units * 3 / 10),
    );
    let first_question = format!("{document}\n\n{QUESTION}");
    let turn = |messages: &Value| {
        let body = json!({
            "model": "default", "messages": messages, "max_tokens": 12, "temperature": 0,
        });
        let (status, reply) = post_json(port, "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 200, "{reply}");
        let answer = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (answer, reply["qllm"].clone())
    };
    let mut messages = json!([{"role": "user", "content": first_question}]);
    let (first, report) = turn(&messages);
    assert!(
        first.contains(&key.to_string()),
        "{first:?} for {key}: {report}"
    );
    assert_eq!(report["reused_prompt_tokens"], 0, "{report}");
    let first_tokens = report["prompt_tokens"].as_u64().unwrap();
    assert!(first_tokens > 11_000, "{report}");

    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": first}),
        json!({"role": "user", "content": "What is the secret city called? Answer with its name only."}),
    ]);
    let (second, report) = turn(&messages);
    assert!(second.contains(city), "{second:?} {report}");
    // The first prompt up to its last 512-token chunk boundary was taken
    // over, not read again.
    let reused = report["reused_prompt_tokens"].as_u64().unwrap();
    let prompt_tokens = report["prompt_tokens"].as_u64().unwrap();
    assert!(
        reused + 512 > first_tokens && reused % 512 == 0 && prompt_tokens - reused < 512 + 64,
        "{reused} of {prompt_tokens} prompt tokens reused: {report}"
    );
    assert_eq!(report["question_vectors"], "probe", "{report}");

    // The same conversation with `reuse` off reads everything.
    let body = json!({
        "model": "default", "messages": messages, "max_tokens": 12, "temperature": 0,
        "qllm": {"reuse": false},
    });
    let (status, reply) = post_json(port, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["qllm"]["reused_prompt_tokens"], 0, "{reply}");
}

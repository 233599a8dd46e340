//! `mistralrs --qllm serve` under bad input, cancellation, memory caps and
//! concurrent requests, with the tiny model: its random weights answer
//! nonsense, but deterministically and fast enough for a hundred requests.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli::{http_bytes, start_server, Server};
use crate::tiny;

struct TinyServer {
    port: u16,
    _server: Server,
    _dir: tempfile::TempDir,
}

/// Sizes of the Q-LLM settings the tiny model is served with: the `512`
/// preset, whose window fits the model's 512 positions.
const N_INIT: usize = 128;
const N_LOCAL: usize = 256;
const BLOCK: usize = 64;
const EXC_BLOCK: usize = 256;
const CHUNK: usize = 512;

/// Serves the tiny model with `--qllm`, `extra` global flags and `serve`
/// flags.
fn serve_tiny(extra: &[&str], serve: &[&str]) -> TinyServer {
    let dir = tempfile::tempdir().unwrap();
    // Weights whose greedy answers to these prompts include vocabulary
    // words (not only byte tokens that decode to nothing).
    let model = tiny::write(dir.path(), 2, 0.3);
    let config = dir.path().join("qllm.toml");
    std::fs::write(&config, "preset = \"512\"\n").unwrap();
    let mut global = vec!["--qllm-config".to_string(), config.to_string_lossy().into()];
    global.extend(extra.iter().map(|s| s.to_string()));
    let (server, port) = start_server(&global, serve, &model, false);
    TinyServer {
        port,
        _server: server,
        _dir: dir,
    }
}

/// Posts a completion request; the reply's status and JSON (or text, for a
/// stream).
fn complete(port: u16, body: &Value) -> (u16, String) {
    http_bytes(port, "POST", "/v1/completions", body.to_string().as_bytes())
        .expect("request answered")
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `words` words of the tiny vocabulary: one token each.
fn prompt(words: usize) -> String {
    let vocab: Vec<&str> = tiny::VOCAB_WORDS
        .iter()
        .map(|w| w.trim_start_matches('▁'))
        .collect();
    (0..words)
        .map(|i| vocab[(i * 5 + i / 8) % vocab.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn completion(words: usize, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "default",
        "prompt": prompt(words),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// The text of an SSE completion stream.
fn streamed_text(raw: &str) -> String {
    raw.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| chunk["choices"][0]["text"].as_str().map(String::from))
        .collect()
}

fn stats(port: u16) -> Value {
    let (status, text) = http_bytes(port, "GET", "/v1/qllm/stats", b"").unwrap();
    assert_eq!(status, 200, "{text}");
    json_of(&text)
}

/// Waits until the server holds no sequence and no request state; returns
/// its stats then.
fn settled(port: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = stats(port);
        if stats["sequences"] == 0 && stats["tracked_requests"] == 0 {
            assert_eq!(stats["bytes"], 0, "{stats}");
            return stats;
        }
        assert!(Instant::now() < deadline, "state not freed: {stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a streaming request and hangs up after the first chunk.
fn cancel_after_first_chunk(port: u16, body: &Value) {
    let body = body.to_string();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if line.starts_with("data: ") {
            return;
        }
        line.clear();
    }
    panic!("the stream ended before its first chunk");
}

fn assert_refused(reply: (u16, String), status: u16, words: &[&str]) {
    let (got, text) = reply;
    assert_eq!(got, status, "{text}");
    let reply = json_of(&text);
    // mistral.rs's own errors carry `message` at the top level.
    let message = reply["error"]["message"]
        .as_str()
        .or_else(|| reply["message"].as_str())
        .unwrap_or_else(|| panic!("no error message: {text}"));
    for word in words {
        assert!(message.contains(word), "{word:?} not in {message:?}");
    }
}

#[test]
fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let server = serve_tiny(&[], &[]);
    let port = server.port;
    let with = |options: Value| {
        let mut body = completion(200, 4, false);
        body["qllm"] = options;
        complete(port, &body)
    };
    // Unknown and invalid settings, zero, negative and absurd sizes.
    assert_refused(with(json!({"n_lcoal": 4})), 400, &["n_lcoal"]);
    assert_refused(with(json!({"mode": "sparse"})), 400, &["sparse"]);
    assert_refused(with(json!({"n_local": 0})), 400, &["`n_local`", "positive"]);
    assert_refused(with(json!({"topk": -1})), 400, &["`topk`", "non-negative"]);
    assert_refused(with(json!({"topk": 100000})), 400, &["`topk`", "too large"]);
    assert_refused(
        with(json!({"question_weight": -2.0})),
        400,
        &["`question_weight`"],
    );
    assert_refused(
        with(json!({"question": "  "})),
        400,
        &["`question`", "empty"],
    );
    assert_refused(
        with(json!({"question": prompt(300)})),
        422,
        &["the question (", "bytes) is longer than the prompt ("],
    );
    // Bytes that are not JSON in UTF-8, and JSON that is not a request.
    let mut body = br#"{"model":"default","prompt":"the "#.to_vec();
    body.extend([0xff, 0xfe]);
    body.extend(br#"","max_tokens":4}"#);
    let reply = http_bytes(port, "POST", "/v1/completions", &body).unwrap();
    assert_refused(reply, 400, &["not valid JSON in UTF-8"]);
    let reply = http_bytes(port, "POST", "/v1/completions", br#"{"model":"default"}"#).unwrap();
    assert_refused(reply, 422, &["prompt"]);
    let mut body = completion(0, 4, false);
    body["prompt"] = json!("");
    assert_refused(complete(port, &body), 422, &["empty prompt"]);
    // A chat without messages, as the OpenAI API answers it.
    for messages in [json!([]), json!(" ")] {
        let body = json!({"model": "default", "messages": messages, "max_tokens": 4});
        let reply = http_bytes(
            port,
            "POST",
            "/v1/chat/completions",
            body.to_string().as_bytes(),
        )
        .unwrap();
        assert_refused(reply, 400, &["`messages` must not be empty"]);
    }

    // Control characters are text like any other.
    let mut body = completion(50, 4, false);
    body["prompt"] = json!(format!("{}\u{0}\u{7}\u{1b}[2J\r{}", prompt(20), prompt(20)));
    let (status, text) = complete(port, &body);
    assert_eq!(status, 200, "{text}");

    // One token; around the block, sink, window, execution block and
    // prefill chunk sizes, and the tiny model's own window (512, lifted).
    let mut lengths = vec![1, 2, 3];
    for edge in [
        BLOCK,
        N_INIT,
        EXC_BLOCK,
        N_INIT + N_LOCAL,
        N_INIT + N_LOCAL + BLOCK,
        CHUNK,
        N_INIT + N_LOCAL + EXC_BLOCK,
        2 * CHUNK,
    ] {
        lengths.extend([edge - 1, edge, edge + 1]);
    }
    for tokens in lengths {
        // One token per word (no BOS).
        let (status, text) = complete(port, &completion(tokens, 3, false));
        assert_eq!(status, 200, "{tokens} tokens: {text}");
        let reply = json_of(&text);
        assert_eq!(reply["usage"]["prompt_tokens"], tokens, "{text}");
        let report = &reply["qllm"];
        // After the prompt and two decode steps, every whole block of
        // tokens past the sinks and the window is in memory, nothing else.
        let processed = tokens + 2;
        let blocks = processed.saturating_sub(N_INIT + N_LOCAL) / BLOCK;
        assert_eq!(report["blocks"], blocks, "{tokens} tokens: {report}");
        assert_eq!(
            report["tokens_in_memory"],
            blocks * BLOCK,
            "{tokens} tokens: {report}"
        );
    }
    let (status, text) = complete(port, &completion(300, 4, false));
    assert_eq!(status, 200, "the server still serves: {text}");
    settled(port);
}

#[test]
fn requests_over_the_memory_caps_are_refused_before_any_work() {
    // The tiny model's state: 2 layers x 2 KV heads x 16 values x 2 bytes
    // per key and per value, 256 bytes per token in blocks, plus about
    // 0.7 MB of windows and bookkeeping.
    let server = serve_tiny(
        &[
            "--qllm-max-request-memory",
            "1.5MiB",
            "--qllm-max-memory",
            "2MiB",
        ],
        &[],
    );
    let port = server.port;
    let limits = stats(port);
    assert_eq!(limits["max_request_memory"], 3 << 19);
    assert_eq!(limits["max_memory"], 2 << 20);
    let (status, text) = complete(port, &completion(1000, 4, false));
    assert_eq!(status, 200, "{text}");
    for stream in [false, true] {
        let reply = complete(port, &completion(4000, 4, stream));
        assert_refused(
            reply,
            422,
            &[
                "4004 tokens",
                "over the per-request limit `max_request_memory` = 1.5 MiB",
            ],
        );
    }
    // A long generation limit counts too.
    let reply = complete(port, &completion(1000, 3000, false));
    assert_refused(reply, 422, &["4000 tokens", "`max_request_memory`"]);
    settled(port);

    // Two requests that fit alone but not together: the second is refused
    // while the first holds its memory, and served once it is gone.
    let first = std::thread::spawn(move || complete(port, &completion(1500, 400, false)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats(port)["sequences"] == 0 {
        assert!(Instant::now() < deadline, "the first request did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let reply = complete(port, &completion(2000, 4, false));
    assert_refused(reply, 422, &["the server's limit `max_memory` = 2.0 MiB"]);
    assert_eq!(first.join().unwrap().0, 200);
    settled(port);
    let (status, text) = complete(port, &completion(2000, 4, false));
    assert_eq!(status, 200, "{text}");
    settled(port);
}

#[test]
fn state_is_freed_after_finished_stopped_cancelled_and_refused_requests() {
    // Shorter prompts begin the longer ones: the kept prefixes are reused
    // and fill their budget, which bounds them.
    let budget: u64 = 8 << 20;
    let server = serve_tiny(&["--qllm-prefix-cache-memory", "8MiB"], &[]);
    let port = server.port;
    let stop_words: Vec<&str> = tiny::VOCAB_WORDS
        .iter()
        .map(|w| w.trim_start_matches('▁'))
        .collect();
    let mut resident_after_first = 0;
    for i in 0..100 {
        let words = 3900 + (i * 37) % 300;
        match i % 5 {
            0 => {
                let (status, text) = complete(port, &completion(words, 8, false));
                assert_eq!(status, 200, "{text}");
            }
            1 => {
                let (status, text) = complete(port, &completion(words, 8, true));
                assert_eq!(status, 200, "{text}");
                assert!(text.contains("data: [DONE]"), "{text}");
            }
            2 => cancel_after_first_chunk(port, &completion(words, 200, true)),
            3 => {
                // Read whole: resumed from a prefix read with another
                // question (each prompt's last paragraph), the random
                // model's answer may hold no vocabulary word to stop at.
                let mut body = completion(words, 50, false);
                body["stop"] = json!(stop_words);
                body["qllm"] = json!({"reuse": false});
                let (status, text) = complete(port, &body);
                assert_eq!(status, 200, "{text}");
                assert_eq!(json_of(&text)["choices"][0]["finish_reason"], "stop");
            }
            _ => {
                let mut body = completion(words, 8, false);
                body["qllm"] = json!({"question": prompt(words + 10)});
                assert_eq!(complete(port, &body).0, 422);
            }
        }
        let stats = settled(port);
        assert!(
            stats["kept_prefix_bytes"].as_u64().unwrap() <= budget,
            "{stats}"
        );
        if i == 0 {
            resident_after_first = stats["resident_bytes"].as_u64().unwrap();
            // The first request's state, freed, is still the high-water mark.
            assert!(stats["peak_bytes"].as_u64().unwrap() > 0, "{stats}");
        }
    }
    let stats = settled(port);
    assert!(stats["kept_prefixes"].as_u64().unwrap() > 0, "{stats}");
    let resident = stats["resident_bytes"].as_u64().unwrap();
    eprintln!(
        "resident memory after the first request {resident_after_first} B, after 100: {resident} B"
    );
    assert!(
        resident * 10 <= resident_after_first * 11 + budget * 10,
        "resident memory grew from {resident_after_first} to {resident} bytes"
    );
}

/// Sends each request alone, then all at once; the answers (text and the
/// `qllm` report of non-streaming ones) of both rounds.
fn alone_and_together(port: u16, requests: &[Value]) -> (Vec<Answer>, Vec<Answer>) {
    let answer = |body: &Value| {
        let (status, text) = complete(port, body);
        assert_eq!(status, 200, "{text}");
        if body["stream"] == true {
            Answer {
                text: streamed_text(&text),
                report: Value::Null,
            }
        } else {
            let reply = json_of(&text);
            Answer {
                text: reply["choices"][0]["text"].as_str().unwrap().to_string(),
                report: reply["qllm"].clone(),
            }
        }
    };
    let alone: Vec<Answer> = requests.iter().map(answer).collect();
    settled(port);
    let together: Vec<Answer> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|body| scope.spawn(move || answer(body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    settled(port);
    (alone, together)
}

#[derive(Debug)]
struct Answer {
    text: String,
    report: Value,
}

#[test]
fn concurrent_requests_keep_their_own_memory() {
    let server = serve_tiny(&[], &[]);
    let requests: Vec<Value> = [(900, false), (1700, true), (2600, false), (3500, false)]
        .iter()
        .map(|&(words, stream)| completion(words, 24, stream))
        .collect();
    let (alone, together) = alone_and_together(server.port, &requests);
    for (i, (alone, together)) in alone.iter().zip(&together).enumerate() {
        if alone.report.is_null() {
            continue;
        }
        // The tiny model's near-tied logits let its words depend on which
        // requests share a step (last-bit differences of batched
        // matmuls); what each request holds must not.
        for key in [
            "prompt_tokens",
            "tokens_in_memory",
            "blocks",
            "question_span",
        ] {
            assert_eq!(
                alone.report[key], together.report[key],
                "request {i}: {key}"
            );
        }
    }
}

#[test]
fn concurrent_requests_answer_as_they_do_one_by_one() {
    // SmolLM2 (f32): pass keys at different depths of 1K-2.5K-token
    // prompts, two of the four requests streaming.
    let (_server, port) = start_server(&[], &[], &crate::assets::smollm2(), true);
    let requests: Vec<Value> = [
        (40, 0.2, false),
        (60, 0.5, true),
        (80, 0.8, false),
        (100, 0.4, true),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(units, depth, stream))| {
        json!({
            "model": "default",
            "prompt": qllm::eval::passkey::prompt(units, depth, qllm::eval::passkey::key(7, i as u64)),
            "max_tokens": 10,
            "temperature": 0,
            "stream": stream,
        })
    })
    .collect();
    let (alone, together) = alone_and_together(port, &requests);
    for (i, (alone, together)) in alone.iter().zip(&together).enumerate() {
        let key = qllm::eval::passkey::key(7, i as u64).to_string();
        assert!(alone.text.contains(&key), "request {i}: {alone:?}");
        assert_eq!(alone.text, together.text, "request {i}");
        if !alone.report.is_null() {
            for key in ["prompt_tokens", "tokens_in_memory", "blocks"] {
                assert_eq!(
                    alone.report[key], together.report[key],
                    "request {i}: {key}"
                );
            }
        }
    }
}

/// The `needle` extension through the server: the passage is found in the
/// prompt, mapped to the block that holds it, and traced in every layer; the
/// per-layer verdicts agree with the counts and with the blocks the
/// response reports as retrieved.
#[test]
fn a_needle_passage_is_traced_per_layer() {
    let tiny = serve_tiny(&[], &[]);
    // The tiny vocabulary's words repeat with a period of 64; letters
    // outside it (byte tokens) make the passage unique.
    let words = prompt(1000);
    let words: Vec<&str> = words.split(' ').collect();
    let needle = "fox QZJ lazy QZK dog";
    let text = format!(
        "{} {needle} {}",
        words[..300].join(" "),
        words[300..].join(" ")
    );
    let mut body = json!({
        "model": "default",
        "prompt": text,
        "max_tokens": 2,
        "temperature": 0,
        "qllm": {"needle": needle},
    });
    let (status, reply) = complete(tiny.port, &body);
    assert_eq!(status, 200, "{reply}");
    let report = json_of(&reply)["qllm"].clone();
    let traced = &report["needle"];
    // One token per word before it; its edges may merge with neighbours.
    let span = |i: usize| traced["span"][i].as_u64().unwrap() as usize;
    let (start, end) = (span(0), span(1));
    assert!((299..=301).contains(&start) && end > start + 5, "{traced}");
    // `512` preset: 128 sinks, blocks of 64.
    let blocks: Vec<usize> = ((start - 128) / 64..=(end - 1 - 128) / 64).collect();
    assert_eq!(traced["blocks"], json!(blocks), "{traced}");
    assert_eq!(traced["layers"], tiny::SHAPE.layers, "{traced}");
    let first_decode = traced["per_layer_first_decode"].as_str().unwrap();
    assert_eq!(first_decode.len(), tiny::SHAPE.layers, "{traced}");
    let whole = first_decode.chars().filter(|&c| c == '+').count();
    assert_eq!(traced["at_decode"][0], whole, "{traced}");
    let retrieved: Vec<u64> = report["retrieved_blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    let all_retrieved = blocks.iter().all(|b| retrieved.contains(&(*b as u64)));
    assert_eq!(whole > 0, all_retrieved, "{report}");
    // Ranks are reported for every layer once the needle's block exists.
    assert!(
        traced["ranks_at_first_decode"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.as_u64().is_some_and(|r| r < 20)),
        "{traced}"
    );

    // A passage that is not in the prompt is not traced.
    body["qllm"] = json!({"needle": "zebra quokka narwhal"});
    let (status, reply) = complete(tiny.port, &body);
    assert_eq!(status, 200, "{reply}");
    assert!(json_of(&reply)["qllm"].get("needle").is_none(), "{reply}");
}

/// With the question both before and after the document (the paper's
/// layout), the early copy is the one used: read before any retrieval and
/// captured in line, as the paper does. Asked only last, the default copies
/// it before the document and reads that copy in line; with
/// `question_first` off, the last copy is used, from the probe.
#[test]
fn a_question_asked_first_and_last_is_read_in_line_from_its_first_copy() {
    let tiny = serve_tiny(&[], &[]);
    let question = "the lazy dog jumps over the fox?";
    let asked_last = format!("{}\n\n{question}", prompt(900));
    for (text, extension, span_before, vectors, copied) in [
        (
            format!("{question}\n\n{}\n\n{question}", prompt(900)),
            json!({}),
            20,
            "in line",
            false,
        ),
        (asked_last.clone(), json!({}), 20, "in line", true),
        // The ablation: copied first, but retrieval keeps the probe's vectors.
        (
            asked_last.clone(),
            json!({"question_vectors": "probe"}),
            20,
            "probe",
            true,
        ),
        (
            asked_last,
            json!({"question_first": false}),
            usize::MAX,
            "probe",
            false,
        ),
    ] {
        let body = json!({
            "model": "default",
            "prompt": text,
            "max_tokens": 2,
            "temperature": 0,
            "qllm": extension,
        });
        let (status, reply) = complete(tiny.port, &body);
        assert_eq!(status, 200, "{reply}");
        let report = json_of(&reply)["qllm"].clone();
        assert_eq!(report["question_vectors"], vectors, "{report}");
        assert_eq!(report["question_copied"], copied, "{report}");
        let start = report["question_span"][0].as_u64().unwrap() as usize;
        if span_before == usize::MAX {
            assert!(start > 800, "{report}");
        } else {
            assert!(start < span_before, "{report}");
        }
    }
}

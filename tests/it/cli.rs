//! The patched `mistralrs` binary with `--qllm`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::assets;
use crate::smollm2::PARIS_QUESTION;

pub fn model_args(model: &Path) -> Vec<String> {
    vec![
        "--cpu".into(),
        "--token-source".into(),
        "none".into(),
        "--format".into(),
        "gguf".into(),
        "-m".into(),
        model.parent().unwrap().to_string_lossy().into(),
        "-f".into(),
        model.file_name().unwrap().to_string_lossy().into(),
    ]
}

fn run_cli(args: &[&str], extra: &[String]) -> Output {
    Command::new(assets::mistralrs_bin())
        .args(args)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("mistralrs starts")
}

#[test]
fn run_with_qllm_answers_a_one_shot_prompt() {
    let out = run_cli(
        &["--qllm", "run", "-i", PARIS_QUESTION],
        &model_args(&assets::smollm2()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(
        stdout.contains("Paris"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // mistral.rs logs to stdout.
    assert!(
        stdout.contains("Q-LLM attention hook installed"),
        "stdout: {stdout}"
    );
    // The prompt's question is found and probed, as `serve` does it: the
    // one-paragraph message as a whole; short, it is not copied first.
    let found = stdout
        .lines()
        .find(|l| l.contains("question from the last user message, one paragraph"));
    assert!(
        found.is_some_and(|l| l.contains(&format!("{PARIS_QUESTION:?}"))),
        "stdout: {stdout}"
    );
    assert!(
        stdout.contains("question copied first: AlreadyFirst"),
        "stdout: {stdout}"
    );
}

fn bad_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qllm.toml");
    std::fs::write(&path, text).unwrap();
    let out = run_cli(
        &[
            "--qllm",
            "--qllm-config",
            path.to_str().unwrap(),
            "run",
            "-i",
            "hi",
        ],
        &model_args(&assets::smollm2()),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_qllm_config_exits_with_a_message_naming_the_key() {
    let (ok, stderr) = bad_config("prefill_chunk_sise = 64\n");
    assert!(!ok);
    assert!(stderr.contains("prefill_chunk_sise"), "{stderr}");
    let (ok, stderr) = bad_config("prefill_chunk_size = -64\n");
    assert!(!ok);
    assert!(
        stderr.contains("`prefill_chunk_size` must be a positive integer, got -64"),
        "{stderr}"
    );
    let out = run_cli(
        &[
            "--qllm",
            "--qllm-config",
            "/nonexistent/qllm.toml",
            "run",
            "-i",
            "hi",
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/qllm.toml"), "{stderr}");
}

pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago and that no other server of this test
/// process was given: the kernel may hand a just-released port out again.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

pub fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http_bytes(port, method, path, body.as_bytes())
}

/// An HTTP/1.1 request whose body may be any bytes; the status and the body
/// of the reply (decoded lossily).
pub fn http_bytes(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(900)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Starts `mistralrs --qllm GLOBAL... serve SERVE...` on a free port of
/// 127.0.0.1 with `model` and waits until it is healthy; f32 weights when
/// `dequantize` (long prompts read about twice as fast on CPU).
pub fn start_server(
    global: &[String],
    serve: &[&str],
    model: &Path,
    dequantize: bool,
) -> (Server, u16) {
    // Another process may take the port between our check and the server's
    // bind: the server then exits, and it is started again on another port.
    for _ in 0..5 {
        if let Some(started) = try_start_server(global, serve, model, dequantize) {
            return started;
        }
    }
    panic!(
        "the server exited before it became healthy, 5 times (a taken port, or a start \
         failure: QLLM_TEST_SERVER_LOG=DIR keeps its log)"
    );
}

/// [`start_server`] on one port: `None` if the server exited before it
/// became healthy (its port was taken).
fn try_start_server(
    global: &[String],
    serve: &[&str],
    model: &Path,
    dequantize: bool,
) -> Option<(Server, u16)> {
    let port = free_port();
    let mut args: Vec<String> = vec!["--qllm".into()];
    args.extend(global.iter().cloned());
    args.extend(["serve", "--host", "127.0.0.1", "-p"].map(String::from));
    args.push(port.to_string());
    args.extend(serve.iter().map(|s| s.to_string()));
    args.extend(model_args(model));
    let mut command = Command::new(assets::mistralrs_bin());
    command.args(&args);
    // QLLM_TEST_SERVER_LOG=<dir> keeps each server's log there, for
    // debugging; by default it is discarded.
    match std::env::var_os("QLLM_TEST_SERVER_LOG") {
        Some(dir) => {
            let log = Path::new(&dir).join(format!("server-{port}.log"));
            let file = std::fs::File::create(&log).expect("server log file");
            let stderr = file.try_clone().expect("server log file");
            command.stdout(file).stderr(stderr);
        }
        None => {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    if dequantize {
        command.env("CANDLE_DEQUANTIZE_ALL", "1");
    }
    let mut server = Server(command.spawn().expect("server starts"));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // Exited: it could not bind (or failed to start, which the retry
        // reports the same way after its tries).
        if server.0.try_wait().expect("server status").is_some() {
            return None;
        }
        if matches!(http(port, "GET", "/health", ""), Ok((200, _))) {
            return Some((server, port));
        }
        assert!(Instant::now() < deadline, "server did not become healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serve_with_qllm_answers_a_chat_completion_over_http() {
    let (server, port) = start_server(&[], &[], &assets::smollm2(), false);
    let body = format!(
        r#"{{"model":"default","messages":[{{"role":"user","content":"{PARIS_QUESTION}"}}],"max_tokens":16,"temperature":0}}"#
    );
    let (status, reply) = http(port, "POST", "/v1/chat/completions", &body).unwrap();
    drop(server);
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("Paris"), "{reply}");
}

/// mistral.rs picks F16 for this model on CPUs without a `--dtype`; GGUF
/// qwen2 keeps its RoPE tables in f32, which the hook used to reject
/// ("unsupported dtype for rope F16 F32 F32") on every request.
#[test]
fn serve_with_qllm_answers_with_a_qwen2_model_at_the_default_dtype() {
    let (server, port) = start_server(&[], &[], &assets::qwen15b(), false);
    for extension in [
        "",
        r#","qllm":{"enabled":false}"#,
        r#","qllm":{"mode":"dense"}"#,
    ] {
        let body = format!(
            r#"{{"model":"default","messages":[{{"role":"user","content":"{PARIS_QUESTION}"}}],"max_tokens":8,"temperature":0{extension}}}"#
        );
        let (status, reply) = http(port, "POST", "/v1/chat/completions", &body).unwrap();
        assert_eq!(status, 200, "{extension}: {reply}");
        assert!(reply.contains("Paris"), "{extension}: {reply}");
    }
    drop(server);
}

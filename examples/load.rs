//! Load test of `mistralrs --qllm serve` over loopback: concurrent clients,
//! each sending a series of passkey completions of growing length; reports
//! requests served, errors, latency percentiles, answers found and the
//! server's peak resident memory. Bounded in count (clients x lengths) and
//! in time (`--timeout-s`).
//!
//! ```text
//! cargo run --release --example load -- [--model FILE.gguf] [--clients 4]
//!     [--lengths 1024,2048,4096,8192,16384] [--max-tokens 12] [--timeout-s 3600]
//!     [--bin target/release/mistralrs]
//! ```
//!
//! The server runs with f32 weights (`CANDLE_DEQUANTIZE_ALL=1`), as the
//! evaluation does, on a free port of 127.0.0.1, and is stopped at the end.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qllm::eval::passkey;
use serde_json::{json, Value};

struct Args {
    model: PathBuf,
    bin: PathBuf,
    clients: usize,
    lengths: Vec<usize>,
    max_tokens: usize,
    timeout: Duration,
}

const USAGE: &str = "usage: load [--model FILE.gguf] [--clients N] [--lengths LIST] \
                     [--max-tokens N] [--timeout-s N] [--bin PATH]";

/// How long the server may take to free the last requests' state.
const STATE_FREED_WITHIN: Duration = Duration::from_secs(60);

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: PathBuf::from("assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
        bin: PathBuf::from("target/release/mistralrs"),
        clients: 4,
        lengths: vec![1024, 2048, 4096, 8192, 16384],
        max_tokens: 12,
        timeout: Duration::from_secs(3600),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?.into(),
            "--bin" => args.bin = value()?.into(),
            "--clients" => args.clients = value()?.parse().context("--clients")?,
            "--lengths" => {
                args.lengths = value()?
                    .split(',')
                    .map(|s| s.trim().parse().context("--lengths"))
                    .collect::<Result<_>>()?;
            }
            "--max-tokens" => args.max_tokens = value()?.parse().context("--max-tokens")?,
            "--timeout-s" => {
                args.timeout = Duration::from_secs(value()?.parse().context("--timeout-s")?);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if args.clients == 0 || args.lengths.is_empty() || args.max_tokens == 0 {
        bail!("--clients, --lengths and --max-tokens must not be empty or zero");
    }
    if args.lengths.iter().any(|&l| l < 256) {
        bail!("--lengths: each length must be at least 256 tokens");
    }
    for (path, what) in [(&args.model, "model file"), (&args.bin, "mistralrs binary")] {
        if !path.exists() {
            bail!(
                "{what} {} does not exist (scripts/test.sh builds and fetches both)",
                path.display()
            );
        }
    }
    Ok(args)
}

/// Kills the server when dropped, also on an early error.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn post(port: u16, path: &str, body: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    read_response(stream)
}

fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    read_response(stream)
}

fn read_response(mut stream: TcpStream) -> Result<(u16, String)> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let bytes = qllm::system::proc_bytes(&format!("/proc/{pid}/status"), "VmHWM")?;
    #[allow(clippy::cast_precision_loss)] // Display only.
    Some(bytes as f64 / (1024.0 * 1024.0))
}

#[derive(Debug)]
struct Outcome {
    length: usize,
    latency: Duration,
    error: Option<String>,
    found: bool,
}

/// One passkey completion of about `length` tokens (SmolLM2: about 25
/// tokens per filler unit).
fn run_one(port: u16, length: usize, key: u32, args: &Args) -> Outcome {
    let units = (length - 60) / 25;
    let body = json!({
        "model": "default",
        "prompt": passkey::prompt(units, 0.5, key),
        "max_tokens": args.max_tokens,
        "temperature": 0,
    })
    .to_string();
    let start = Instant::now();
    let reply = post(port, "/v1/completions", &body, args.timeout);
    let latency = start.elapsed();
    let (error, found) = match reply {
        Ok((200, text)) => {
            let answer = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["choices"][0]["text"].as_str().map(String::from))
                .unwrap_or_default();
            (None, answer.contains(&key.to_string()))
        }
        Ok((status, text)) => (Some(format!("HTTP {status}: {text}")), false),
        Err(e) => (Some(format!("{e:#}")), false),
    };
    Outcome {
        length,
        latency,
        error,
        found,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((p * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1);
    sorted[i]
}

fn main() -> Result<()> {
    let args = Arc::new(parse_args()?);
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let model_dir = args.model.parent().context("--model has no directory")?;
    let model_file = args.model.file_name().context("--model has no file name")?;
    let server = Server(
        Command::new(&args.bin)
            .args([
                "--qllm",
                "serve",
                "--host",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["--cpu", "--token-source", "none", "--format", "gguf", "-m"])
            .arg(model_dir)
            .arg("-f")
            .arg(model_file)
            .env("CANDLE_DEQUANTIZE_ALL", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", args.bin.display()))?,
    );
    let pid = server.0.id();
    let ready_by = Instant::now() + Duration::from_secs(300);
    while !matches!(get(port, "/health"), Ok((200, _))) {
        if Instant::now() > ready_by {
            bail!("the server did not answer /health within 300 s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let idle_rss = peak_rss_mib(pid).unwrap_or(f64::NAN);
    println!(
        "server ready on 127.0.0.1:{port} ({idle_rss:.0} MiB); {} clients x lengths {:?}",
        args.clients, args.lengths
    );

    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + args.timeout;
    let started = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|client| {
            let (args, outcomes) = (args.clone(), outcomes.clone());
            std::thread::spawn(move || {
                for (i, &length) in args.lengths.iter().enumerate() {
                    if Instant::now() > deadline {
                        break;
                    }
                    let key = passkey::key(client as u64, i as u64);
                    let outcome = run_one(port, length, key, &args);
                    println!(
                        "client {client}: {length:>6} tokens  {:>7.1} s  {}",
                        outcome.latency.as_secs_f64(),
                        match (&outcome.error, outcome.found) {
                            (Some(e), _) => format!("error: {e}"),
                            (None, true) => "key found".into(),
                            (None, false) => "key missed".into(),
                        }
                    );
                    outcomes.lock().unwrap().push(outcome);
                }
            })
        })
        .collect();
    for client in clients {
        client
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))?;
    }
    let wall = started.elapsed();
    // The engine frees finished sequences at the end of the step that
    // finished them, just after their answers went out: wait for that.
    let answered = Instant::now();
    let state_of = || {
        get(port, "/v1/qllm/stats")
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .unwrap_or(Value::Null)
    };
    let is_empty = |stats: &Value| stats["sequences"] == 0 && stats["tracked_requests"] == 0;
    let mut stats = state_of();
    while !is_empty(&stats) && answered.elapsed() < STATE_FREED_WITHIN {
        std::thread::sleep(Duration::from_millis(50));
        stats = state_of();
    }
    let state_freed = is_empty(&stats);
    let freed_after = answered.elapsed();
    let peak_rss = peak_rss_mib(pid).unwrap_or(f64::NAN);
    drop(server);

    let outcomes = outcomes.lock().unwrap();
    let served = outcomes.iter().filter(|o| o.error.is_none()).count();
    let errors = outcomes.len() - served;
    let found = outcomes.iter().filter(|o| o.found).count();
    let mut latencies: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.error.is_none())
        .map(|o| o.latency.as_secs_f64())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let planned = args.clients * args.lengths.len();
    println!();
    println!("requests planned        {planned}");
    println!("requests served         {served}");
    println!("errors                  {errors}");
    println!("keys found              {found}/{served}");
    println!(
        "latency p50             {:.1} s",
        percentile(&latencies, 0.5)
    );
    println!(
        "latency p95             {:.1} s",
        percentile(&latencies, 0.95)
    );
    println!("wall time               {:.0} s", wall.as_secs_f64());
    println!("server peak RSS         {peak_rss:.0} MiB (idle {idle_rss:.0} MiB)");
    println!(
        "q-llm state at the end  {stats} ({} {:.1} s after the last answer)",
        if state_freed { "empty" } else { "still held" },
        freed_after.as_secs_f64()
    );
    for &length in &args.lengths {
        let mut at: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.length == length && o.error.is_none())
            .map(|o| o.latency.as_secs_f64())
            .collect();
        at.sort_by(f64::total_cmp);
        println!(
            "  {length:>6} tokens: {} served, p50 {:.1} s",
            at.len(),
            percentile(&at, 0.5)
        );
    }
    if errors > 0 || served < planned {
        bail!("{errors} errors, {served} of {planned} requests served");
    }
    if !state_freed {
        bail!(
            "the server still held Q-LLM state {} s after the last answer",
            STATE_FREED_WITHIN.as_secs()
        );
    }
    Ok(())
}

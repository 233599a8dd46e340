//! The evaluation tasks sized with SmolLM2's own tokenizer, and the `eval`
//! example end to end on the tiny model.

use std::path::PathBuf;
use std::process::Command;

use mistralrs_core::ModelDType;
use qllm::eval::{self, Corpus, EngineTokenizer, Placement, Task, TokenCount};

use crate::engine::{engine_lock, load_gguf, runtime};
use crate::{assets, tiny};

#[test]
fn tasks_meet_length_and_depth_with_the_real_tokenizer() {
    let _lock = engine_lock();
    let rt = runtime();
    let mistralrs = rt.block_on(load_gguf(&assets::smollm2(), ModelDType::F32));
    let tokenizer = EngineTokenizer::new(&mistralrs).unwrap();
    let corpus = Corpus::load(&assets::root().join("assets"), true, true, true)
        .expect("scripts/test.sh fetches the essays, HotpotQA and the Jargon File");
    for task in Task::ALL {
        for target in [4096, 8192] {
            for depth in [0.1, 0.5, 0.9] {
                let sample =
                    eval::generate(task, target, depth, 1, Placement::Last, &corpus, &tokenizer)
                        .unwrap();
                let cell = format!("{} at {target} tokens, depth {depth}", task.name());
                assert_eq!(
                    tokenizer.count(&sample.prompt).unwrap(),
                    sample.prompt_tokens
                );
                assert!(
                    sample.prompt_tokens <= target && sample.prompt_tokens * 50 >= target * 49,
                    "{cell}: {} tokens",
                    sample.prompt_tokens
                );
                // QA keeps documents whole: the gold paragraphs go between
                // two documents, within about one paragraph of the target.
                let tolerance = if task == Task::Hotpotqa {
                    150
                } else {
                    target / 100
                };
                assert!(
                    sample.needle_token.abs_diff(sample.needle_target) <= tolerance,
                    "{cell}: needle at token {}, asked for {}",
                    sample.needle_token,
                    sample.needle_target
                );
                // Head, tail and needle are short except in QA.
                #[allow(clippy::cast_precision_loss)]
                let measured = sample.needle_token as f64 / sample.prompt_tokens as f64;
                if task != Task::Hotpotqa {
                    assert!(
                        (measured - depth).abs() < 0.05,
                        "{cell}: needle at {measured}"
                    );
                }
            }
        }
    }
}

/// The `eval` example, built next to this test binary by `cargo test`.
fn eval_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples/eval"))
        .unwrap();
    assert!(
        path.exists(),
        "{} is missing: cargo test builds it",
        path.display()
    );
    path
}

#[test]
fn eval_runs_a_small_grid_and_resumes() {
    let _lock = engine_lock();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny::write(dir.path(), 5, 0.3);
    let config = dir.path().join("qllm.toml");
    std::fs::write(
        &config,
        "n_init = 4\nn_local = 64\nblock_size = 16\nexc_block_size = 32\ntopk = 2\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let run = || {
        Command::new(eval_bin())
            .current_dir(assets::root())
            .args(["--model", model.to_str().unwrap()])
            .args([
                "--tasks",
                "passkey",
                "--lengths",
                "400",
                "--depths",
                "0.25,0.75",
            ])
            .args(["--modes", "qllm,dense", "--max-new-tokens", "4"])
            .args(["--config", config.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let first = run();
    let log = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{log}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let cells = results["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4, "2 depths x 2 modes");
    for cell in cells {
        assert_eq!(cell["task"], "passkey");
        assert!(cell["error"].is_null(), "{cell}");
        let score = cell["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
        assert!(cell["prefill_tok_s"].as_f64().unwrap() > 0.0);
        assert!(cell["peak_rss_mib"].as_f64().unwrap() > 0.0);
        let tokens = cell["prompt_tokens"].as_u64().unwrap();
        assert!((380..=402).contains(&tokens), "{tokens} prompt tokens");
    }
    let png = std::fs::read(out.join("heatmap-passkey-qllm.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let svg = std::fs::read_to_string(out.join("accuracy-passkey.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("qllm") && svg.contains("dense"));

    // Finished cells are not run again.
    let again = run();
    assert!(again.status.success());
    let log = String::from_utf8_lossy(&again.stdout);
    assert!(log.contains("0 cells to run (4 done)"), "{log}");
}

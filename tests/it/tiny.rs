//! Tiny GGUFs of every architecture the hook is wired into, with random f32
//! weights and an embedded unigram tokenizer, written with candle's GGUF
//! writer and read back by mistral.rs's real loader.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub const FILE_NAME: &str = "tiny-llama.gguf";
pub const VOCAB_WORDS: &[&str] = &[
    "▁the", "▁quick", "▁brown", "▁fox", "▁jumps", "▁over", "▁lazy", "▁dog",
];
/// The trained context the file declares.
pub const CONTEXT_LEN: u32 = 512;

pub struct TinyShape {
    pub layers: usize,
    pub embd: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
}

pub const SHAPE: TinyShape = TinyShape {
    layers: 2,
    embd: 64,
    heads: 4,
    kv_heads: 2,
    ffn: 128,
};

fn vocab() -> Vec<String> {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.extend(VOCAB_WORDS.iter().map(|w| w.to_string()));
    tokens
}

/// Number of tokens in the tiny vocabulary.
pub fn vocab_size() -> usize {
    vocab().len()
}

/// A deterministic token prompt of `len` tokens over the words and bytes of
/// the vocabulary (no special tokens).
pub fn prompt(len: u32, salt: u32) -> Vec<u32> {
    let vocab = vocab_size() as u32;
    (0..len)
        .map(|i| 3 + (i * 37 + salt * 11 + i * i % 7) % (vocab - 3))
        .collect()
}

/// The GGUF architectures the hook is wired into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Interleaved RoPE, no attention biases.
    Llama,
    /// Llama's tensors under `mistral3.` metadata (mistral.rs loads it with
    /// its llama model).
    Mistral3,
    /// GPT-NeoX RoPE (tables kept in f32 by mistral.rs), q/k/v biases.
    Qwen2,
    /// Per-head q/k RMSNorm before RoPE, and a head size that is not
    /// `embedding_length / head_count` (`attention.key_length`).
    Qwen3,
    /// Qwen3's attention; no experts (`expert_count` 0), so every layer
    /// keeps a dense MLP: mistral.rs 0.8.1 runs GGUF experts on CUDA only.
    Qwen3Moe,
    /// Fused qkv and gate/up projections, RoPE tables of its own.
    Phi3,
}

impl Arch {
    pub const ALL: [Arch; 6] = [
        Arch::Llama,
        Arch::Mistral3,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Qwen3Moe,
        Arch::Phi3,
    ];

    /// `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral3 => "mistral3",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Phi3 => "phi3",
        }
    }

    /// Size of one attention head.
    fn head_dim(self, s: &TinyShape) -> usize {
        match self {
            Arch::Qwen3 | Arch::Qwen3Moe => 2 * s.embd / s.heads,
            _ => s.embd / s.heads,
        }
    }
}

/// Writes the llama model into `dir` and returns its path. `scale` sets the
/// spread of the random weights (larger makes attention peakier).
pub fn write(dir: &Path, seed: u64, scale: f32) -> PathBuf {
    write_arch(dir, Arch::Llama, seed, scale)
}

/// [`write`] for any wired architecture.
pub fn write_arch(dir: &Path, arch: Arch, seed: u64, scale: f32) -> PathBuf {
    write_file(dir, arch, arch.name(), seed, scale)
}

/// A llama model that declares itself `architecture`, for one the hook is
/// not wired into.
pub fn write_unwired(dir: &Path, architecture: &str) -> PathBuf {
    write_file(dir, Arch::Llama, architecture, 1, 0.3)
}

/// `arch`'s tensors, under `architecture`'s metadata keys and name.
fn write_file(dir: &Path, arch: Arch, architecture: &str, seed: u64, scale: f32) -> PathBuf {
    let device = Device::Cpu;
    let tokens = vocab();
    let n_vocab = tokens.len();
    let s = &SHAPE;
    let head_dim = arch.head_dim(s);
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut random = |shape: &[usize], scale: f32| -> QTensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                // xorshift64*: deterministic and dependency-free.
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                let u =
                    (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
                (u * 2.0 - 1.0) * scale
            })
            .collect();
        let t = Tensor::from_vec(data, shape, &device).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    };
    // mistral.rs's GGUF phi3 takes only block-quantized projections (f32 ones
    // hit an `unreachable!`), as every published phi3 GGUF has.
    let projection = |t: QTensor| -> QTensor {
        if arch != Arch::Phi3 {
            return t;
        }
        let t = t.dequantize(&device).unwrap();
        QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()
    };
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &device).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };

    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), random(&[n_vocab, s.embd], 1.0)),
        ("output_norm.weight".into(), ones(s.embd)),
        ("output.weight".into(), random(&[n_vocab, s.embd], scale)),
    ];
    for l in 0..s.layers {
        let p = format!("blk.{l}");
        let (q_rows, kv_rows) = (s.heads * head_dim, s.kv_heads * head_dim);
        tensors.push((format!("{p}.attn_norm.weight"), ones(s.embd)));
        tensors.push((format!("{p}.ffn_norm.weight"), ones(s.embd)));
        if arch == Arch::Phi3 {
            tensors.push((
                format!("{p}.attn_qkv.weight"),
                projection(random(&[q_rows + 2 * kv_rows, s.embd], scale)),
            ));
        } else {
            tensors.push((
                format!("{p}.attn_q.weight"),
                random(&[q_rows, s.embd], scale),
            ));
            tensors.push((
                format!("{p}.attn_k.weight"),
                random(&[kv_rows, s.embd], scale),
            ));
            tensors.push((
                format!("{p}.attn_v.weight"),
                random(&[kv_rows, s.embd], scale),
            ));
        }
        if arch == Arch::Qwen2 {
            tensors.push((format!("{p}.attn_q.bias"), random(&[q_rows], scale)));
            tensors.push((format!("{p}.attn_k.bias"), random(&[kv_rows], scale)));
            tensors.push((format!("{p}.attn_v.bias"), random(&[kv_rows], scale)));
        }
        if matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe) {
            // Not all ones, so a norm applied in the wrong place shows.
            tensors.push((format!("{p}.attn_q_norm.weight"), random(&[head_dim], 2.0)));
            tensors.push((format!("{p}.attn_k_norm.weight"), random(&[head_dim], 2.0)));
        }
        tensors.push((
            format!("{p}.attn_output.weight"),
            projection(random(&[s.embd, q_rows], scale)),
        ));
        if arch == Arch::Phi3 {
            tensors.push((
                format!("{p}.ffn_up.weight"),
                projection(random(&[2 * s.ffn, s.embd], scale)),
            ));
        } else {
            tensors.push((
                format!("{p}.ffn_gate.weight"),
                random(&[s.ffn, s.embd], scale),
            ));
            tensors.push((
                format!("{p}.ffn_up.weight"),
                random(&[s.ffn, s.embd], scale),
            ));
        }
        tensors.push((
            format!("{p}.ffn_down.weight"),
            projection(random(&[s.embd, s.ffn], scale)),
        ));
        if arch == Arch::Qwen3Moe {
            // Read by the loader's size estimate only (`expert_count` is 0).
            tensors.push((
                format!("{p}.ffn_gate_inp.weight"),
                random(&[1, s.embd], scale),
            ));
            for name in ["gate", "up"] {
                tensors.push((
                    format!("{p}.ffn_{name}_exps.weight"),
                    random(&[1, s.ffn, s.embd], scale),
                ));
            }
            tensors.push((
                format!("{p}.ffn_down_exps.weight"),
                random(&[1, s.embd, s.ffn], scale),
            ));
        }
    }

    let u32v = |v: usize| Value::U32(v as u32);
    let scores: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Value::F32(if t.starts_with('▁') {
                -1.0
            } else {
                -10.0 - i as f32 * 1e-3
            })
        })
        .collect();
    let types: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Value::I32(match i {
                0 => 2,
                1 | 2 => 3,
                _ if t.starts_with("<0x") => 6,
                _ => 1,
            })
        })
        .collect();
    let a = architecture;
    let key = |k: &str| format!("{a}.{k}");
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(format!("tiny-{a}"))),
        (key("context_length"), Value::U32(CONTEXT_LEN)),
        (key("embedding_length"), u32v(s.embd)),
        (key("block_count"), u32v(s.layers)),
        (key("feed_forward_length"), u32v(s.ffn)),
        (key("attention.head_count"), u32v(s.heads)),
        (key("attention.head_count_kv"), u32v(s.kv_heads)),
        (key("rope.dimension_count"), u32v(head_dim)),
        (key("rope.freq_base"), Value::F32(10000.0)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect())),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(),
            Value::String(
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}".into(),
            ),
        ),
    ];
    match arch {
        Arch::Qwen3 | Arch::Qwen3Moe => {
            metadata.push((key("attention.key_length"), u32v(head_dim)));
            metadata.push((key("attention.value_length"), u32v(head_dim)));
        }
        _ => {}
    }
    if arch == Arch::Qwen3Moe {
        metadata.push((key("expert_count"), u32v(0)));
        metadata.push((key("expert_used_count"), u32v(0)));
        metadata.push((key("expert_feed_forward_length"), u32v(s.ffn)));
    }
    let path = dir.join(match a {
        "llama" => FILE_NAME.to_string(),
        _ => format!("tiny-{a}.gguf"),
    });
    let mut file = std::fs::File::create(&path).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts).unwrap();
    path
}

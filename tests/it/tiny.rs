//! Tiny GGUFs (llama or qwen2) with random f32 weights and an embedded
//! unigram tokenizer, written with candle's GGUF writer and read back by
//! mistral.rs's real loader.

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
    /// GPT-NeoX RoPE (tables kept in f32 by mistral.rs), q/k/v biases.
    Qwen2,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Llama, Arch::Qwen2];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
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
    let device = Device::Cpu;
    let tokens = vocab();
    let n_vocab = tokens.len();
    let s = &SHAPE;
    let head_dim = s.embd / s.heads;
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
        tensors.push((format!("{p}.attn_norm.weight"), ones(s.embd)));
        tensors.push((format!("{p}.ffn_norm.weight"), ones(s.embd)));
        tensors.push((
            format!("{p}.attn_q.weight"),
            random(&[s.heads * head_dim, s.embd], scale),
        ));
        tensors.push((
            format!("{p}.attn_k.weight"),
            random(&[s.kv_heads * head_dim, s.embd], scale),
        ));
        tensors.push((
            format!("{p}.attn_v.weight"),
            random(&[s.kv_heads * head_dim, s.embd], scale),
        ));
        if arch == Arch::Qwen2 {
            tensors.push((
                format!("{p}.attn_q.bias"),
                random(&[s.heads * head_dim], scale),
            ));
            tensors.push((
                format!("{p}.attn_k.bias"),
                random(&[s.kv_heads * head_dim], scale),
            ));
            tensors.push((
                format!("{p}.attn_v.bias"),
                random(&[s.kv_heads * head_dim], scale),
            ));
        }
        tensors.push((
            format!("{p}.attn_output.weight"),
            random(&[s.embd, s.heads * head_dim], scale),
        ));
        tensors.push((
            format!("{p}.ffn_gate.weight"),
            random(&[s.ffn, s.embd], scale),
        ));
        tensors.push((
            format!("{p}.ffn_up.weight"),
            random(&[s.ffn, s.embd], scale),
        ));
        tensors.push((
            format!("{p}.ffn_down.weight"),
            random(&[s.embd, s.ffn], scale),
        ));
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
    let a = arch.name();
    let key = |k: &str| format!("{a}.{k}");
    let metadata: Vec<(String, Value)> = vec![
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
    let path = dir.join(match arch {
        Arch::Llama => FILE_NAME.to_string(),
        Arch::Qwen2 => format!("tiny-{a}.gguf"),
    });
    let mut file = std::fs::File::create(&path).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts).unwrap();
    path
}

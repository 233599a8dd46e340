//! Long-context evaluation tasks: prompts generated from a seed, sized with
//! the model's own tokenizer, and their scoring.
//!
//! Tasks (see [`Task`]): InfiniteBench's passkey, number string and
//! key-value retrieval, RULER's single and multi-key needles in Paul
//! Graham's essays, and multi-hop QA from HotpotQA with the gold paragraphs
//! padded by distractors. Each prompt is a head (the instruction), a
//! document of haystack units with the needle(s) inserted, and a tail (the
//! question and the start of the answer). The question follows the
//! document; [`Placement::First`] also puts it before, as the Q-LLM paper
//! writes its prompts.
//!
//! Sizing: the number of haystack units is the largest whose prompt stays
//! within the target, and the needle goes to the unit boundary whose token
//! position is nearest `depth` of the way through the document.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use mistralrs_core::{
    MistralRs, NormalRequest, Request, RequestMessage, Response, SamplingParams, Usage,
};
use serde::{Deserialize, Serialize};

use crate::client::{engine_gone, no_model};
pub use crate::client::{tokenize, EngineTokenizer};
use crate::config::RequestOptions;
use crate::question::probe::prepare;
use crate::{Error, QllmHook, RequestReport, Result};

pub mod passkey;

/// Counts the tokens of a text with the model's tokenizer.
pub trait TokenCount {
    /// Tokens of `text`, without special tokens.
    fn count(&self, text: &str) -> Result<usize>;
}

impl TokenCount for EngineTokenizer {
    fn count(&self, text: &str) -> Result<usize> {
        Ok(self.encode(text)?.len())
    }
}

/// A finished completion.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The generated text.
    pub text: String,
    /// mistral.rs's usage figures.
    pub usage: Usage,
    /// What the hook did, for a request prepared with it.
    pub report: Option<RequestReport>,
}

/// Greedy completion of `prompt` (no chat template) with at most
/// `max_new_tokens` new tokens. With `qllm`, the request is first prepared
/// with the hook and options given (its question found and probed, see
/// [`crate::question::probe::prepare`]), and the hook's report is returned.
pub async fn complete(
    mistralrs: &MistralRs,
    prompt: String,
    max_new_tokens: usize,
    qllm: Option<(&Arc<QllmHook>, &RequestOptions)>,
) -> Result<Completion> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let params = SamplingParams {
        max_len: Some(max_new_tokens),
        ..SamplingParams::deterministic()
    };
    let mut request = NormalRequest::new_simple(
        RequestMessage::Completion {
            text: prompt,
            echo_prompt: false,
            best_of: None,
        },
        params,
        tx,
        mistralrs.next_request_id(),
        None,
        None,
    );
    let request_id = request.id;
    let prepared = match qllm {
        Some((hook, options)) => {
            Some((hook, prepare(mistralrs, hook, &mut request, options).await?))
        }
        None => None,
    };
    mistralrs
        .get_sender(None)
        .map_err(no_model)?
        .send(Request::Normal(Box::new(request)))
        .await
        .map_err(|_| engine_gone())?;
    let response = rx.recv().await.ok_or_else(engine_gone)?;
    // Read before the guard in `prepared` forgets the request.
    let report = prepared
        .as_ref()
        .and_then(|(hook, _)| hook.request_report(request_id));
    match response {
        Response::CompletionDone(done) => Ok(Completion {
            text: done.choices[0].text.clone(),
            usage: done.usage,
            report,
        }),
        Response::InternalError(e) | Response::ValidationError(e) => {
            Err(Error::Eval(format!("request failed: {e}")))
        }
        Response::CompletionModelError(e, _) => Err(Error::Eval(format!("model error: {e}"))),
        _ => Err(Error::Eval("unexpected response to a completion".into())),
    }
}

/// The evaluation tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// A 5-digit key in "The grass is green..." filler (InfiniteBench).
    Passkey,
    /// A 10-digit number in the same filler (InfiniteBench).
    Number,
    /// One key of a JSON object of UUID pairs (InfiniteBench).
    KvRetrieval,
    /// One "special magic number" in the essays (RULER `niah_single_2`).
    NiahSingle,
    /// One of four magic numbers with different keys (RULER `niah_multikey_1`).
    NiahMultikey,
    /// A HotpotQA question over its gold paragraphs and distractors (RULER `qa_2`).
    Hotpotqa,
    /// One invented, self-contained sentence (a person and a place, a year,
    /// an object or a number) in the essays, asked about in plain words.
    Fact,
    /// The same fact in the Jargon File instead of the essays.
    FactJargon,
}

impl Task {
    /// Every task, in a fixed order.
    pub const ALL: [Task; 8] = [
        Task::Passkey,
        Task::Number,
        Task::KvRetrieval,
        Task::NiahSingle,
        Task::NiahMultikey,
        Task::Hotpotqa,
        Task::Fact,
        Task::FactJargon,
    ];

    /// The task's name, as on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Task::Passkey => "passkey",
            Task::Number => "number",
            Task::KvRetrieval => "kv_retrieval",
            Task::NiahSingle => "niah_single",
            Task::NiahMultikey => "niah_multikey",
            Task::Hotpotqa => "hotpotqa",
            Task::Fact => "fact",
            Task::FactJargon => "fact_jargon",
        }
    }

    /// Whether the task reads Paul Graham's essays.
    pub fn needs_essays(self) -> bool {
        matches!(self, Task::NiahSingle | Task::NiahMultikey | Task::Fact)
    }

    /// Whether the task reads the Jargon File.
    pub fn needs_jargon(self) -> bool {
        self == Task::FactJargon
    }
}

impl FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
                format!("unknown task `{s}` (known: {})", names.join(", "))
            })
    }
}

/// Where the question goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// After the document only, as users write prompts.
    #[default]
    Last,
    /// Before the document as well, as the Q-LLM paper writes them.
    First,
}

/// One HotpotQA question with its paragraphs.
#[derive(Debug, Clone, Deserialize)]
pub struct HotpotItem {
    /// The question.
    pub question: String,
    /// The gold answer.
    pub answer: String,
    /// `(title, sentence index)` of the supporting facts.
    pub supporting_facts: Vec<(String, usize)>,
    /// `(title, sentences)` of the gold and distractor paragraphs.
    pub context: Vec<(String, Vec<String>)>,
}

/// The texts the tasks draw on; load only what the chosen tasks need.
#[derive(Debug, Default)]
pub struct Corpus {
    /// Paul Graham's essays, split into haystack units.
    essay_units: Vec<String>,
    /// The Jargon File's entries and appendices, split the same way.
    jargon_units: Vec<String>,
    /// HotpotQA questions whose answer is not yes or no.
    hotpot: Vec<HotpotItem>,
}

impl Corpus {
    /// Loads the essays (`essays_dir/*.txt`, in name order) if `essays`,
    /// the HotpotQA file if `hotpot` and the Jargon File if `jargon`; errors
    /// name the missing file and the command that fetches it.
    pub fn load(assets: &Path, essays: bool, hotpot: bool, jargon: bool) -> Result<Self> {
        let mut corpus = Corpus::default();
        if jargon {
            let path = assets.join("jargon.txt");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::Eval(format!(
                    "cannot read {}: {e} (run scripts/fetch-assets.sh jargon)",
                    path.display()
                ))
            })?;
            corpus.jargon_units = jargon_units(&text);
            if corpus.jargon_units.is_empty() {
                return Err(Error::Eval(format!(
                    "no glossary entries in {}",
                    path.display()
                )));
            }
        }
        if essays {
            let dir = assets.join("PaulGrahamEssays");
            let missing = |e: std::io::Error| {
                Error::Eval(format!(
                    "cannot read the essays in {}: {e} (run scripts/fetch-assets.sh essays)",
                    dir.display()
                ))
            };
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .map_err(missing)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "txt"))
                .collect();
            files.sort();
            let mut text = String::new();
            for file in files {
                text.push_str(&std::fs::read_to_string(&file).map_err(missing)?);
                text.push('\n');
            }
            corpus.essay_units = split_units(&text);
            if corpus.essay_units.is_empty() {
                return Err(Error::Eval(format!("no essays in {}", dir.display())));
            }
        }
        if hotpot {
            let path = assets.join("hotpotqa.json");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::Eval(format!(
                    "cannot read {}: {e} (run scripts/fetch-assets.sh hotpotqa)",
                    path.display()
                ))
            })?;
            let items: Vec<HotpotItem> = serde_json::from_str(&text)
                .map_err(|e| Error::Eval(format!("{}: {e}", path.display())))?;
            corpus.hotpot = items
                .into_iter()
                .filter(|i| !matches!(i.answer.to_lowercase().as_str(), "yes" | "no"))
                .collect();
        }
        Ok(corpus)
    }

    /// A corpus from given prose (as both haystacks) and HotpotQA items,
    /// for tests.
    pub fn from_parts(prose: &str, hotpot: Vec<HotpotItem>) -> Self {
        Corpus {
            essay_units: split_units(prose),
            jargon_units: split_units(prose),
            hotpot,
        }
    }
}

/// One generated prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// The whole prompt (a plain completion).
    pub prompt: String,
    /// The question, as it appears in the prompt (for the hook).
    pub question: String,
    /// What a right answer contains.
    pub answers: Vec<String>,
    /// Token position where the asked needle ends.
    pub needle_end: usize,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Token position where the asked needle starts.
    pub needle_token: usize,
    /// Token position the depth asked for.
    pub needle_target: usize,
}

/// A deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for one (seed, stream) pair.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        usize::try_from(self.next_u64() % n).expect("below n")
    }

    /// A number of exactly `digits` digits, as text.
    pub fn digits(&mut self, digits: usize) -> String {
        let mut s = String::with_capacity(digits);
        s.push(char::from(b'1' + u8::try_from(self.below(9)).expect("< 9")));
        for _ in 1..digits {
            s.push(char::from(
                b'0' + u8::try_from(self.below(10)).expect("< 10"),
            ));
        }
        s
    }

    /// A random UUID-shaped string.
    pub fn uuid(&mut self) -> String {
        let a = self.next_u64();
        let b = self.next_u64();
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }
}

const NIAH_WORDS: [&str; 24] = [
    "amber-falcon",
    "quiet-harbor",
    "silver-meadow",
    "crimson-lantern",
    "hollow-summit",
    "velvet-river",
    "frozen-orchard",
    "golden-compass",
    "rustic-anchor",
    "hidden-glacier",
    "lunar-thicket",
    "copper-beacon",
    "misty-canyon",
    "scarlet-pebble",
    "ancient-willow",
    "brisk-tundra",
    "dusty-citadel",
    "emerald-quarry",
    "fragile-mosaic",
    "gentle-volcano",
    "ivory-parade",
    "jagged-lagoon",
    "nimble-sparrow",
    "obsidian-kettle",
];

/// Characters of haystack generated per target token: twice what English
/// text or UUIDs need, so a prompt never runs out of units.
const HAYSTACK_CHARS_PER_TOKEN: usize = 8;

/// A prompt's parts before sizing.
struct Spec {
    head: String,
    /// Haystack units, at least as many as the longest prompt needs.
    units: Vec<String>,
    /// Needles: text and depth; the first is the one asked for, its depth
    /// set by [`generate`].
    needles: Vec<(String, f64)>,
    tail: String,
    question: String,
    answers: Vec<String>,
    /// Whether the last unit may be cut at a word to meet the length
    /// (not in JSON, which must stay valid).
    cut_last_unit: bool,
}

impl Spec {
    /// The prompt with `n` units and needle `j` before unit `at[j]`; returns
    /// it with the byte offset of the asked needle.
    fn assemble(&self, n: usize, at: &[usize]) -> (String, usize) {
        let mut text = self.head.clone();
        let mut asked = 0;
        for i in 0..=n {
            for (j, (needle, _)) in self.needles.iter().enumerate() {
                if at[j] == i {
                    if j == 0 {
                        asked = text.len();
                    }
                    text.push_str(needle);
                }
            }
            if i < n {
                text.push_str(&self.units[i]);
            }
        }
        text.push_str(&self.tail);
        (text, asked)
    }

    fn positions(&self, n: usize) -> Vec<usize> {
        self.needles.iter().map(|(_, d)| unit_at(n, *d)).collect()
    }
}

#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn unit_at(n: usize, depth: f64) -> usize {
    ((n as f64) * depth.clamp(0.0, 1.0)).round() as usize
}

/// Generates the prompt of `task` with about `target_tokens` tokens and the
/// asked needle at `depth` (0 = start of the document, 1 = end).
pub fn generate(
    task: Task,
    target_tokens: usize,
    depth: f64,
    seed: u64,
    placement: Placement,
    corpus: &Corpus,
    tokenizer: &dyn TokenCount,
) -> Result<Sample> {
    generate_drawn_as(
        task,
        target_tokens,
        target_tokens,
        depth,
        seed,
        placement,
        corpus,
        tokenizer,
    )
}

/// [`generate`] with the needle, question and haystack drawn as for a cell
/// of `drawn_as` tokens (at least `target_tokens`), then cut to
/// `target_tokens`: the same fact at the same depth of a shorter document,
/// so full attention inside the model's window can be asked what Q-LLM was
/// asked beyond it.
#[allow(clippy::too_many_arguments)]
pub fn generate_drawn_as(
    task: Task,
    target_tokens: usize,
    drawn_as: usize,
    depth: f64,
    seed: u64,
    placement: Placement,
    corpus: &Corpus,
    tokenizer: &dyn TokenCount,
) -> Result<Sample> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(Error::Eval(format!("depth {depth} is not between 0 and 1")));
    }
    if drawn_as < target_tokens {
        return Err(Error::Eval(format!(
            "a {target_tokens}-token prompt cannot be drawn as a shorter one ({drawn_as} tokens)"
        )));
    }
    // One stream per cell so every cell is reproducible on its own.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let stream = (task as u64) << 48 ^ (drawn_as as u64) << 16 ^ (depth * 1000.0) as u64;
    let mut rng = Rng::new(seed, stream);
    // Generous: no unit is shorter than one token.
    let max_units = drawn_as + 16;
    let mut spec = build_spec(task, max_units, &mut rng, placement, corpus)?;
    spec.needles[0].1 = depth;

    let count = |text: &str| tokenizer.count(text);
    let fixed = count(&spec.assemble(0, &spec.positions(0)).0)?;
    if fixed > target_tokens {
        return Err(Error::Eval(format!(
            "{}: {target_tokens} tokens is below the prompt's fixed text ({fixed} tokens)",
            task.name()
        )));
    }
    // Largest unit count whose prompt fits the target.
    let (mut lo, mut hi) = (0, spec.units.len());
    if count(&spec.assemble(hi, &spec.positions(hi)).0)? <= target_tokens {
        return Err(Error::Eval(format!(
            "{}: the haystack is too small for {target_tokens} tokens",
            task.name()
        )));
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if count(&spec.assemble(mid, &spec.positions(mid)).0)? <= target_tokens {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut n = lo;
    if spec.cut_last_unit && n < spec.units.len() {
        n = fill_with_partial_unit(&mut spec, n, target_tokens, tokenizer)?;
    }

    // The asked needle: the unit boundary nearest the target token position.
    let mut at = spec.positions(n);
    let head_tokens = count(&spec.head)?;
    let tail_tokens = count(&spec.tail)?;
    let needle_tokens = count(&spec.needles[0].0)?;
    let full = count(&spec.assemble(n, &at).0)?;
    // The haystack around the asked needle: depth 1 puts the needle after it.
    let document = full.saturating_sub(head_tokens + tail_tokens + needle_tokens);
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let needle_target = head_tokens + (document as f64 * depth).round() as usize;
    let position = |at: &[usize]| -> Result<usize> {
        let (text, offset) = spec.assemble(n, at);
        count(&text[..offset])
    };
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        at[0] = mid;
        if position(&at)? < needle_target {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    at[0] = lo;
    let after = position(&at)?;
    if lo > 0 {
        at[0] = lo - 1;
        let before = position(&at)?;
        if needle_target.abs_diff(before) > needle_target.abs_diff(after) {
            at[0] = lo;
        }
    }
    let (prompt, offset) = spec.assemble(n, &at);
    Ok(Sample {
        prompt_tokens: count(&prompt)?,
        needle_token: count(&prompt[..offset])?,
        needle_end: count(&prompt[..offset + spec.needles[0].0.len()])?,
        needle_target,
        prompt,
        question: spec.question,
        answers: spec.answers,
    })
}

fn build_spec(
    task: Task,
    max_units: usize,
    rng: &mut Rng,
    placement: Placement,
    corpus: &Corpus,
) -> Result<Spec> {
    let first = placement == Placement::First;
    let filler_units = || -> Vec<String> {
        let sentences: Vec<String> = passkey::FILLER
            .split_inclusive(". ")
            .map(str::to_string)
            .collect();
        sentences.iter().cycle().take(max_units).cloned().collect()
    };
    let ask_first = |question: &str| {
        if first {
            format!("{question}\n\n")
        } else {
            String::new()
        }
    };
    Ok(match task {
        Task::Passkey => {
            let key = 10_000 + u32::try_from(rng.below(90_000)).expect("< 90000");
            Spec {
                head: format!("{}{}", passkey::INTRO, ask_first(passkey::QUESTION)),
                units: filler_units(),
                needles: vec![(passkey::needle(key), 0.0)],
                tail: format!("\n\n{}{}", passkey::QUESTION, passkey::ANSWER_PREFIX),
                question: passkey::QUESTION.into(),
                answers: vec![key.to_string()],
                cut_last_unit: true,
            }
        }
        Task::Number => {
            let number = rng.digits(10);
            let question = "What is the sequence of digits?";
            Spec {
                head: format!("{}{}", passkey::INTRO, ask_first(question)),
                units: filler_units(),
                needles: vec![(
                    format!(
                        "The sequence of digits is {number}. Remember it. {number} is the \
                         sequence of digits. "
                    ),
                    0.0,
                )],
                tail: format!("\n\n{question} The sequence of digits is"),
                question: question.into(),
                answers: vec![number],
                cut_last_unit: true,
            }
        }
        Task::KvRetrieval => {
            let (key, value) = (rng.uuid(), rng.uuid());
            let question = format!("Key: \"{key}\"");
            let (k0, v0) = (rng.uuid(), rng.uuid());
            Spec {
                head: format!(
                    "Extract the value corresponding to the specified key in the JSON object \
                     below.\n\n{}JSON data:\n{{\"{k0}\": \"{v0}\"",
                    ask_first(&question)
                ),
                // A pair is 80 characters.
                units: (0..max_units * HAYSTACK_CHARS_PER_TOKEN / 80 + 2)
                    .map(|_| format!(", \"{}\": \"{}\"", rng.uuid(), rng.uuid()))
                    .collect(),
                needles: vec![(format!(", \"{key}\": \"{value}\""), 0.0)],
                tail: format!("}}\n\n{question}\nThe value associated with the specified key is: "),
                question,
                answers: vec![value],
                cut_last_unit: false,
            }
        }
        Task::NiahSingle | Task::NiahMultikey => {
            if corpus.essay_units.is_empty() {
                return Err(Error::Eval(format!(
                    "{} needs the essays (run scripts/fetch-assets.sh essays)",
                    task.name()
                )));
            }
            let keys = if task == Task::NiahMultikey { 4 } else { 1 };
            let mut words: Vec<&str> = NIAH_WORDS.to_vec();
            let mut needles = Vec::new();
            let mut asked = (String::new(), String::new());
            for i in 0..keys {
                let word = words.swap_remove(rng.below(words.len()));
                let number = rng.digits(7);
                let text = format!(" One of the special magic numbers for {word} is: {number}. ");
                // Distractors anywhere; the asked needle is placed by depth.
                #[allow(clippy::cast_precision_loss)]
                let depth = rng.below(1001) as f64 / 1000.0;
                needles.push((text, depth));
                if i == 0 {
                    asked = (word.to_string(), number);
                }
            }
            let (word, number) = asked;
            let question = format!(
                "What is the special magic number for {word} mentioned in the provided text?"
            );
            let start = rng.below(corpus.essay_units.len());
            Spec {
                head: format!(
                    "Some special magic numbers are hidden within the following text. Make sure \
                     to memorize it. I will quiz you about the numbers afterwards.\n{}",
                    ask_first(&question)
                ),
                units: corpus
                    .essay_units
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(max_units)
                    .cloned()
                    .collect(),
                needles,
                tail: format!(
                    "\n{question} The special magic number for {word} mentioned in the provided \
                     text is"
                ),
                question,
                answers: vec![number],
                cut_last_unit: true,
            }
        }
        Task::Fact | Task::FactJargon => {
            let (haystack, asset) = if task == Task::Fact {
                (&corpus.essay_units, "essays")
            } else {
                (&corpus.jargon_units, "jargon")
            };
            if haystack.is_empty() {
                return Err(Error::Eval(format!(
                    "{} needs the {asset} (run scripts/fetch-assets.sh {asset})",
                    task.name()
                )));
            }
            let fact = invented_fact(rng);
            let start = rng.below(haystack.len());
            Spec {
                head: format!(
                    "Read the following text carefully. A question about it follows.\n\n{}",
                    ask_first(&fact.question)
                ),
                units: haystack
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(max_units)
                    .cloned()
                    .collect(),
                needles: vec![(format!(" {}", fact.sentence), 0.0)],
                tail: fact_tail(&fact.question, &fact.answer_prefix),
                question: fact.question,
                answers: vec![fact.answer],
                cut_last_unit: true,
            }
        }
        Task::Hotpotqa => {
            if corpus.hotpot.is_empty() {
                return Err(Error::Eval(
                    "hotpotqa needs the HotpotQA file (run scripts/fetch-assets.sh hotpotqa)"
                        .into(),
                ));
            }
            let item = &corpus.hotpot[rng.below(corpus.hotpot.len())];
            let gold: Vec<&str> = item
                .supporting_facts
                .iter()
                .map(|(title, _)| title.as_str())
                .collect();
            let paragraph = |(title, sentences): &(String, Vec<String>)| {
                format!("Document: {title}\n{}\n\n", sentences.concat().trim())
            };
            let mut seen = HashSet::new();
            let needle: String = item
                .context
                .iter()
                .filter(|(t, _)| gold.contains(&t.as_str()) && seen.insert(t.as_str()))
                .map(paragraph)
                .collect();
            // Distractors: the question's own, then other questions' paragraphs.
            let mut units: Vec<String> = item
                .context
                .iter()
                .filter(|(t, _)| !gold.contains(&t.as_str()))
                .map(paragraph)
                .collect();
            let mut chars: usize = units.iter().map(String::len).sum();
            let mut guard = 0;
            while chars < max_units * HAYSTACK_CHARS_PER_TOKEN && guard < max_units {
                let before = units.len();
                let other = &corpus.hotpot[rng.below(corpus.hotpot.len())];
                units.extend(
                    other
                        .context
                        .iter()
                        .filter(|(t, _)| !gold.contains(&t.as_str()))
                        .map(paragraph),
                );
                chars += units[before..].iter().map(String::len).sum::<usize>();
                guard += 1;
            }
            let instruction = "Answer the question based on the given documents. Only give me \
                               the answer and do not output any other words.";
            let question = format!("Question: {}", item.question);
            Spec {
                head: format!(
                    "{instruction}\n\n{}The following are given documents.\n\n",
                    ask_first(&question)
                ),
                units,
                needles: vec![(needle, 0.0)],
                tail: format!("\n\n{instruction}\n\n{question} Answer:"),
                question,
                answers: vec![item.answer.clone()],
                cut_last_unit: true,
            }
        }
    })
}

/// A made-up sentence, its question, the start of the answer and what the
/// answer must contain.
#[derive(Debug, Clone)]
pub struct Fact {
    /// The sentence hidden in the haystack.
    pub sentence: String,
    /// Its question.
    pub question: String,
    /// The start of the answer, given after the question.
    pub answer_prefix: String,
    /// What a right answer contains.
    pub answer: String,
}

/// The fact the `fact` task would draw from `seed`'s fact stream (for
/// prompts that hold more than one).
pub fn draw_fact(seed: u64) -> Fact {
    invented_fact(&mut Rng::new(seed, 0xFAC7))
}

/// The end of a `fact` prompt: the question after the text, then the start
/// of the answer.
pub fn fact_tail(question: &str, answer_prefix: &str) -> String {
    format!("\n\nAnswer the question using the text above.\nQuestion: {question}\nAnswer: {answer_prefix}")
}

const FIRST_NAMES: [&str; 12] = [
    "Orvel", "Maribeth", "Tamsin", "Leopold", "Ysolde", "Barnaby", "Imelda", "Casimir", "Odette",
    "Fenwick", "Rosalind", "Thaddeus",
];
const LAST_NAMES: [&str; 12] = [
    "Danquist",
    "Fairweather",
    "Holloway",
    "Brennick",
    "Castellane",
    "Mortimer",
    "Ashgrove",
    "Pennywhistle",
    "Valdane",
    "Quillfeather",
    "Strand",
    "Okonkwo",
];
const PLACES: [&str; 12] = [
    "Lisbon",
    "Tromso",
    "Cartagena",
    "Nagasaki",
    "Valparaiso",
    "Marrakesh",
    "Reykjavik",
    "Dubrovnik",
    "Hobart",
    "Quebec",
    "Tbilisi",
    "Zanzibar",
];
const OBJECTS: [&str; 12] = [
    "teapot",
    "violin case",
    "flowerpot",
    "biscuit tin",
    "rain boot",
    "birdhouse",
    "hatbox",
    "toolbox",
    "piano bench",
    "fishing basket",
    "clock tower",
    "umbrella stand",
];
const TOWNS: [&str; 8] = [
    "Bramblecote",
    "Eastwinter",
    "Harrowmere",
    "Kestrelford",
    "Millhaven",
    "Pellingworth",
    "Stonebridge Ash",
    "Wexcombe",
];

fn invented_fact(rng: &mut Rng) -> Fact {
    let pick = |rng: &mut Rng, list: &[&str]| list[rng.below(list.len())].to_string();
    let name = format!("{} {}", pick(rng, &FIRST_NAMES), pick(rng, &LAST_NAMES));
    match rng.below(4) {
        0 => {
            let city = pick(rng, &PLACES);
            Fact {
                sentence: format!(
                    "My old friend {name} moved to {city} last spring to open a small bakery."
                ),
                question: format!("Which city did {name} move to?"),
                answer_prefix: format!("{name} moved to"),
                answer: city,
            }
        }
        1 => {
            let object = pick(rng, &OBJECTS);
            Fact {
                sentence: format!(
                    "{name} always hides the spare key to the cottage inside the {object}."
                ),
                question: format!("Where does {name} hide the spare key to the cottage?"),
                answer_prefix: format!("{name} hides the spare key inside the"),
                answer: object,
            }
        }
        2 => {
            let town = pick(rng, &TOWNS);
            let year = 1700 + rng.below(250);
            Fact {
                sentence: format!(
                    "The village of {town} was founded in the year {year} by a family of weavers."
                ),
                question: format!("In which year was the village of {town} founded?"),
                answer_prefix: format!("The village of {town} was founded in the year"),
                answer: year.to_string(),
            }
        }
        _ => {
            let count = 12 + rng.below(80);
            Fact {
                sentence: format!("{name} keeps exactly {count} goats on a farm near the river."),
                question: format!("How many goats does {name} keep?"),
                answer_prefix: format!("{name} keeps exactly"),
                answer: count.to_string(),
            }
        }
    }
}

/// Appends the longest word prefix of unit `n` that keeps the prompt within
/// `target_tokens`; returns the new unit count.
fn fill_with_partial_unit(
    spec: &mut Spec,
    n: usize,
    target_tokens: usize,
    tokenizer: &dyn TokenCount,
) -> Result<usize> {
    let unit = spec.units[n].clone();
    let cuts: Vec<usize> = unit
        .char_indices()
        .filter(|&(i, c)| c == ' ' && i > 0)
        .map(|(i, _)| i)
        .collect();
    let fits = |spec: &mut Spec, k: usize| -> Result<bool> {
        spec.units[n] = unit[..cuts[k]].to_string();
        let at = spec.positions(n + 1);
        Ok(tokenizer.count(&spec.assemble(n + 1, &at).0)? <= target_tokens)
    };
    // Largest k with the first k cuts fitting; -1 when none does.
    let (mut lo, mut hi) = (0, cuts.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fits(spec, mid)? {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        spec.units[n] = unit;
        return Ok(n);
    }
    spec.units[n] = unit[..cuts[lo - 1]].to_string();
    Ok(n + 1)
}

/// Splits prose into haystack units: sentences, long ones cut at spaces so
/// a needle can sit within about 30 tokens of any position.
/// The Jargon File's glossary and appendices (from its first entry on),
/// cross-reference braces removed, split into units.
fn jargon_units(text: &str) -> Vec<String> {
    let Some(first_entry) = text.find("\n   :") else {
        return Vec::new();
    };
    split_units(&text[first_entry..].replace(['{', '}'], ""))
}

fn split_units(text: &str) -> Vec<String> {
    const MAX: usize = 160;
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut units = Vec::new();
    for sentence in text.split_inclusive(['.', '?', '!']) {
        let mut rest = sentence;
        while rest.len() > MAX {
            // The last char boundary within `MAX` bytes: a char is at most 4.
            let limit = (MAX - 3..=MAX)
                .rev()
                .find(|&i| rest.is_char_boundary(i))
                .unwrap_or(MAX);
            let cut = rest[..limit].rfind(' ').filter(|&c| c > 0).unwrap_or(limit);
            units.push(rest[..cut].to_string());
            rest = &rest[cut..];
        }
        if !rest.is_empty() {
            units.push(rest.to_string());
        }
    }
    units
}

/// The share of `answers` found in `output`, each matched as whole words
/// after normalisation (lower case, punctuation and articles removed), so
/// "81849" does not match "181849" and "Paris." matches "paris".
pub fn score(answers: &[String], output: &str) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let output = format!(" {} ", normalize(output));
    let found = answers
        .iter()
        .filter(|a| {
            let a = normalize(a);
            !a.is_empty() && output.contains(&format!(" {a} "))
        })
        .count();
    #[allow(clippy::cast_precision_loss)]
    let share = found as f64 / answers.len() as f64;
    share
}

/// SQuAD-style answer normalisation.
pub fn normalize(text: &str) -> String {
    let lower: String = text
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_lowercase().next().unwrap_or(c)
            } else {
                ' '
            }
        })
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scorer_matches_whole_normalised_answers() {
        let key = vec!["81849".to_string()];
        assert_eq!(score(&key, " 81849. Remember it."), 1.0);
        assert_eq!(score(&key, "181849"), 0.0);
        assert_eq!(score(&key, "8184 9"), 0.0);
        assert_eq!(score(&key, "the pass key. The grass"), 0.0);
        let city = vec!["The Paris".to_string()];
        assert_eq!(score(&city, "It is paris, France."), 1.0);
        assert_eq!(score(&city, "Parisian"), 0.0);
        let two = vec!["12".to_string(), "34".to_string()];
        assert_eq!(score(&two, "12 and 56"), 0.5);
        assert_eq!(score(&[], "anything"), 0.0);
    }

    #[test]
    fn uuids_and_digits_have_their_shape() {
        let mut rng = Rng::new(3, 1);
        let uuid = rng.uuid();
        let parts: Vec<usize> = uuid.split('-').map(str::len).collect();
        assert_eq!(parts, vec![8, 4, 4, 4, 12]);
        let digits = rng.digits(10);
        assert_eq!(digits.len(), 10);
        assert!(!digits.starts_with('0'));
        assert_eq!(Rng::new(3, 1).uuid(), uuid);
    }

    /// One token per four bytes, about what English text gets, for tests
    /// without a model.
    struct Quarters;

    impl TokenCount for Quarters {
        fn count(&self, text: &str) -> Result<usize> {
            Ok(text.len().div_ceil(4))
        }
    }

    fn corpus() -> Corpus {
        let essays: String = (0..400)
            .map(|i| format!("Essay sentence number {i} says little of note. "))
            .collect();
        let item = |i: usize| HotpotItem {
            question: format!("Which town did person {i} move to?"),
            answer: format!("Town{i}"),
            supporting_facts: vec![(format!("Gold {i}"), 0)],
            context: vec![
                (
                    format!("Gold {i}"),
                    vec![format!("Person {i} moved to Town{i}.")],
                ),
                (
                    format!("Other {i}"),
                    vec!["A paragraph about something else entirely.".into()],
                ),
            ],
        };
        Corpus::from_parts(&essays, (0..50).map(item).collect())
    }

    #[test]
    fn generators_are_sized_placed_and_reproducible() {
        let corpus = corpus();
        for task in Task::ALL {
            for depth in [0.0, 0.3, 1.0] {
                let sample =
                    generate(task, 2000, depth, 7, Placement::Last, &corpus, &Quarters).unwrap();
                let name = task.name();
                assert!(
                    (1960..=2000).contains(&sample.prompt_tokens),
                    "{name}: {} tokens",
                    sample.prompt_tokens
                );
                assert!(
                    sample.needle_token.abs_diff(sample.needle_target) <= 20,
                    "{name} at {depth}: needle at {} for {}",
                    sample.needle_token,
                    sample.needle_target
                );
                assert_eq!(
                    Quarters.count(&sample.prompt).unwrap(),
                    sample.prompt_tokens
                );
                assert!(sample.answers.iter().all(|a| sample.prompt.contains(a)));
                assert_eq!(sample.prompt.matches(&sample.question).count(), 1, "{name}");
                let again = generate(task, 2000, depth, 7, Placement::Last, &corpus, &Quarters);
                assert_eq!(again.unwrap(), sample, "{name}: not reproducible");
                let other = generate(task, 2000, depth, 8, Placement::Last, &corpus, &Quarters);
                assert_ne!(other.unwrap().prompt, sample.prompt, "{name}: seed ignored");
                let first = generate(task, 2000, depth, 7, Placement::First, &corpus, &Quarters);
                assert_eq!(first.unwrap().prompt.matches(&sample.question).count(), 2);
            }
        }
    }

    #[test]
    fn a_prompt_drawn_as_a_longer_one_asks_the_same_at_the_same_depth() {
        let corpus = corpus();
        for task in Task::ALL {
            let name = task.name();
            let long = generate(task, 4000, 0.3, 7, Placement::Last, &corpus, &Quarters).unwrap();
            let short = generate_drawn_as(
                task,
                1000,
                4000,
                0.3,
                7,
                Placement::Last,
                &corpus,
                &Quarters,
            )
            .unwrap();
            assert_eq!(short.question, long.question, "{name}");
            assert_eq!(short.answers, long.answers, "{name}");
            assert!((960..=1000).contains(&short.prompt_tokens), "{name}");
            assert!(
                short.answers.iter().all(|a| short.prompt.contains(a)),
                "{name}"
            );
            // The tail (question and answer prefix) is the same text.
            let tail = |p: &str| p[p.rfind(&long.question).unwrap()..].to_string();
            assert_eq!(tail(&short.prompt), tail(&long.prompt), "{name}");
            let own = generate(task, 1000, 0.3, 7, Placement::Last, &corpus, &Quarters).unwrap();
            assert_eq!(
                generate_drawn_as(
                    task,
                    1000,
                    1000,
                    0.3,
                    7,
                    Placement::Last,
                    &corpus,
                    &Quarters
                )
                .unwrap(),
                own,
                "{name}"
            );
        }
        let err = generate_drawn_as(
            Task::Fact,
            2000,
            1000,
            0.5,
            1,
            Placement::Last,
            &corpus,
            &Quarters,
        );
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("cannot be drawn as a shorter one"));
    }

    #[test]
    fn impossible_lengths_and_depths_are_refused() {
        let corpus = corpus();
        let err = generate(
            Task::Passkey,
            10,
            0.5,
            1,
            Placement::Last,
            &corpus,
            &Quarters,
        );
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("below the prompt's fixed text"));
        let err = generate(
            Task::Passkey,
            1000,
            1.5,
            1,
            Placement::Last,
            &corpus,
            &Quarters,
        );
        assert!(err.unwrap_err().to_string().contains("depth 1.5"));
        let err = generate(
            Task::NiahSingle,
            1000,
            0.5,
            1,
            Placement::Last,
            &Corpus::default(),
            &Quarters,
        );
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("fetch-assets.sh essays"));
    }

    #[test]
    fn long_sentences_are_cut_into_units() {
        let long = "word ".repeat(100);
        let units = split_units(&format!("Short one. {long}end."));
        assert_eq!(units[0], "Short one.");
        assert!(units.iter().all(|u| u.len() <= 160));
        assert_eq!(units.concat().split_whitespace().count(), 103);
        // Multi-byte characters across the cut (the Jargon File's tables).
        let table = format!("a{}", "─".repeat(200));
        let units = split_units(&table);
        assert!(units.iter().all(|u| u.len() <= 160), "{units:?}");
        assert_eq!(units.concat(), table);
    }

    #[test]
    fn the_jargon_file_starts_at_its_first_entry_without_braces() {
        let text = "The Jargon File\n\nFront matter.\n\n   :cruft: n.\n\n   \
                    Excess; see {kluge}. More text.\n";
        let units = jargon_units(text);
        assert_eq!(units, [":cruft: n.", " Excess; see kluge.", " More text."]);
        assert!(jargon_units("no entries here").is_empty());
    }
}

//! A debug instrument: for a known span of the prompt (a needle), whether
//! the memory blocks holding it were retrieved, per layer, at the execution
//! block that reads the question, at the prompt's last token (which gives
//! the answer's first token) and at the first decode steps.
//!
//! Blocks are cut at fixed offsets (`n_init + b * block_size`), the same in
//! every layer, so where the needle lies in blocks is known from its span
//! alone; which blocks a layer retrieved is what it reports after each
//! execution block.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Decode steps traced after the prompt.
pub const TRACED_DECODE_STEPS: usize = 4;

/// Whether an execution block saw the needle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sight {
    /// Every needle token was attended: its blocks were all retrieved (or it
    /// was not in blocks yet: in the sinks or the recent tokens).
    Whole,
    /// Some of its blocks were retrieved, not all.
    Part,
    /// None of its blocks were retrieved.
    Missed,
}

impl Sight {
    fn symbol(self) -> char {
        match self {
            Sight::Whole => '+',
            Sight::Part => '~',
            Sight::Missed => '-',
        }
    }
}

/// Memory blocks holding tokens of `span`: block `b` holds tokens
/// `n_init + b * block_size .. n_init + (b + 1) * block_size`.
pub fn blocks_of(span: &Range<usize>, n_init: usize, block_size: usize) -> Range<usize> {
    let first = span.start.max(n_init);
    if span.end <= first || block_size == 0 {
        return 0..0;
    }
    (first - n_init) / block_size..(span.end - 1 - n_init) / block_size + 1
}

/// What one execution block saw of the needle, given the blocks it retrieved
/// (ascending) and how many blocks existed.
pub fn sight(needle_blocks: &Range<usize>, retrieved: &[usize], blocks: usize) -> Sight {
    let formed = needle_blocks.start..needle_blocks.end.min(blocks);
    let hits = formed
        .clone()
        .filter(|b| retrieved.binary_search(b).is_ok())
        .count();
    if hits == formed.len() {
        Sight::Whole
    } else if hits > 0 {
        Sight::Part
    } else {
        Sight::Missed
    }
}

/// Rank (0 = best) of the needle's best-scoring formed block among all
/// blocks, by the row of `scores` (one per retrieval: shared, or per KV
/// head) that ranks it best; `None` before any of its blocks exists.
pub fn rank(needle_blocks: &Range<usize>, scores: &[Vec<f32>]) -> Option<usize> {
    scores
        .iter()
        .filter_map(|row| {
            let best = needle_blocks
                .clone()
                .filter(|&b| b < row.len())
                .map(|b| row[b])
                .max_by(f32::total_cmp)?;
            Some(row.iter().filter(|&&s| s > best).count())
        })
        .min()
}

#[derive(Debug, Clone, Default)]
struct LayerTrace {
    at_question: Option<Sight>,
    /// At the prompt's last token, whose execution block gives the answer's
    /// first token.
    at_answer: Option<Sight>,
    rank_at_question: Option<usize>,
    rank_at_first_decode: Option<usize>,
    decode: Vec<Sight>,
    /// Prefill execution blocks after the needle's first block was formed,
    /// and how many of them saw it whole.
    prefill_chances: usize,
    prefill_whole: usize,
}

/// The trace of one sequence.
#[derive(Debug, Clone)]
pub struct NeedleTrace {
    span: Range<usize>,
    blocks: Range<usize>,
    /// Position whose execution block reads the question.
    question_at: usize,
    prompt_len: usize,
    layers: Vec<LayerTrace>,
}

impl NeedleTrace {
    /// A trace of `span` in a prompt of `prompt_len` tokens whose question
    /// ends at `question_end` (the prompt's end when unknown).
    pub fn new(
        span: Range<usize>,
        question_end: Option<usize>,
        prompt_len: usize,
        n_init: usize,
        block_size: usize,
    ) -> Self {
        let blocks = blocks_of(&span, n_init, block_size);
        let question_at = question_end
            .unwrap_or(prompt_len)
            .clamp(1, prompt_len.max(1))
            - 1;
        Self {
            span,
            blocks,
            question_at,
            prompt_len,
            layers: Vec::new(),
        }
    }

    /// Records the execution block `positions` of `layer`, which retrieved
    /// `retrieved` (ascending) out of `blocks` blocks.
    pub fn observe(
        &mut self,
        layer: usize,
        positions: Range<usize>,
        retrieved: &[usize],
        scores: &[Vec<f32>],
        blocks: usize,
    ) {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, LayerTrace::default);
        }
        let seen = sight(&self.blocks, retrieved, blocks);
        let rank = rank(&self.blocks, scores);
        let trace = &mut self.layers[layer];
        if positions.start >= self.prompt_len {
            if trace.decode.is_empty() {
                trace.rank_at_first_decode = rank;
            }
            if trace.decode.len() < TRACED_DECODE_STEPS {
                trace.decode.push(seen);
            }
            return;
        }
        if positions.contains(&self.question_at) {
            trace.at_question = Some(seen);
            trace.rank_at_question = rank;
        }
        if positions.contains(&(self.prompt_len.max(1) - 1)) {
            trace.at_answer = Some(seen);
        }
        if !self.blocks.is_empty() && blocks > self.blocks.start {
            trace.prefill_chances += 1;
            trace.prefill_whole += usize::from(seen == Sight::Whole);
        }
    }

    /// The report so far.
    pub fn report(&self) -> NeedleReport {
        let count = |pick: &dyn Fn(&LayerTrace) -> Option<Sight>, want: Sight| {
            self.layers.iter().filter(|l| pick(l) == Some(want)).count()
        };
        let steps = self
            .layers
            .iter()
            .map(|l| l.decode.len())
            .min()
            .unwrap_or(0);
        let at_decode = (0..steps)
            .map(|s| count(&|l| l.decode.get(s).copied(), Sight::Whole))
            .collect();
        let chances: usize = self.layers.iter().map(|l| l.prefill_chances).sum();
        let whole: usize = self.layers.iter().map(|l| l.prefill_whole).sum();
        #[allow(clippy::cast_precision_loss)] // counts of execution blocks
        let prefill_share = (chances > 0).then(|| whole as f64 / chances as f64);
        NeedleReport {
            span: (self.span.start, self.span.end),
            blocks: self.blocks.clone().collect(),
            layers: self.layers.len(),
            at_question: count(&|l| l.at_question, Sight::Whole),
            at_question_partly: count(&|l| l.at_question, Sight::Part),
            at_answer: count(&|l| l.at_answer, Sight::Whole),
            at_decode,
            prefill_share,
            per_layer_at_question: self
                .layers
                .iter()
                .map(|l| l.at_question.map_or('?', Sight::symbol))
                .collect(),
            per_layer_at_answer: self
                .layers
                .iter()
                .map(|l| l.at_answer.map_or('?', Sight::symbol))
                .collect(),
            per_layer_first_decode: self
                .layers
                .iter()
                .map(|l| l.decode.first().map_or('?', |s| s.symbol()))
                .collect(),
            ranks_at_question: self.layers.iter().map(|l| l.rank_at_question).collect(),
            ranks_at_first_decode: self.layers.iter().map(|l| l.rank_at_first_decode).collect(),
        }
    }
}

/// Whether the needle's blocks were retrieved: the `needle` part of a
/// request's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NeedleReport {
    /// Token span of the needle in the prompt.
    pub span: (usize, usize),
    /// Memory blocks holding its tokens (more than one: cut across a block
    /// boundary; none: it lies in the sinks).
    pub blocks: Vec<usize>,
    /// Layers traced.
    pub layers: usize,
    /// Layers that attended the whole needle at the execution block reading
    /// the question's last token.
    pub at_question: usize,
    /// Layers that attended part of it there.
    pub at_question_partly: usize,
    /// Layers that attended all of it at the prompt's last token, whose
    /// execution block gives the answer's first token.
    #[serde(default)]
    pub at_answer: usize,
    /// Per decode step (the first few): layers that attended all of it.
    pub at_decode: Vec<usize>,
    /// Share of (layer, prefill execution block) pairs after the needle's
    /// first block was formed that attended all of it.
    pub prefill_share: Option<f64>,
    /// One character per layer at the question: `+` whole, `~` part, `-`
    /// missed, `?` not traced.
    pub per_layer_at_question: String,
    /// The same at the prompt's last token.
    #[serde(default)]
    pub per_layer_at_answer: String,
    /// The same at the first decode step (the answer's second token).
    pub per_layer_first_decode: String,
    /// Per layer, the rank (0 = best) of the needle's best block by the
    /// retrieval score at the question: how far scoring was from picking it.
    #[serde(default)]
    pub ranks_at_question: Vec<Option<usize>>,
    /// The same at the first decode step.
    #[serde(default)]
    pub ranks_at_first_decode: Vec<Option<usize>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_needle_maps_to_the_blocks_its_tokens_fall_in() {
        // n_init 4, blocks of 8: block 0 is tokens 4..12, block 1 12..20.
        assert_eq!(blocks_of(&(5..9), 4, 8), 0..1);
        assert_eq!(blocks_of(&(10..14), 4, 8), 0..2, "cut across a boundary");
        assert_eq!(blocks_of(&(0..3), 4, 8), 0..0, "in the sinks");
        assert_eq!(blocks_of(&(2..6), 4, 8), 0..1, "partly in the sinks");
        assert_eq!(blocks_of(&(12..20), 4, 8), 1..2);
    }

    #[test]
    fn sight_counts_only_blocks_that_exist() {
        assert_eq!(sight(&(1..3), &[1, 2, 5], 6), Sight::Whole);
        assert_eq!(sight(&(1..3), &[2, 5], 6), Sight::Part);
        assert_eq!(sight(&(1..3), &[0, 5], 6), Sight::Missed);
        // Block 2 not formed yet: its tokens are still recent, so attended.
        assert_eq!(sight(&(1..3), &[1], 2), Sight::Whole);
        assert_eq!(sight(&(0..0), &[], 0), Sight::Whole);
    }

    #[test]
    fn layers_that_retrieve_the_needle_are_counted_and_others_not() {
        // Needle at tokens 20..30: blocks 2 and 3 (n_init 4, blocks of 8).
        // Prompt of 100 tokens, question at 90..99, execution blocks of 16.
        let mut trace = NeedleTrace::new(20..30, Some(99), 100, 4, 8);
        let layers: [&[usize]; 3] = [&[2, 3], &[3, 7], &[0, 1]];
        // Scores consistent with those picks: block 3 is 2nd, then 4th best.
        let scores = [
            [0.0, 0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 9.0, 0.0],
            [9.0, 8.0, 1.0, 2.0, 7.0, 6.0, 0.0, 0.0, 0.0],
        ];
        for (layer, retrieved) in layers.iter().enumerate() {
            for start in (0..96usize).step_by(16) {
                // Blocks exist once their tokens have left a 16-token window.
                let blocks = start.saturating_sub(20) / 8;
                trace.observe(layer, start..start + 16, retrieved, &[], blocks);
            }
            trace.observe(layer, 96..99, retrieved, &[scores[layer].to_vec()], 9);
            // The prompt's last token: layer 1 now sees all of the needle.
            let last: &[usize] = if layer == 1 { &[2, 3] } else { retrieved };
            trace.observe(layer, 99..100, last, &[scores[layer].to_vec()], 9);
            trace.observe(layer, 100..101, retrieved, &[scores[layer].to_vec()], 9);
        }
        let report = trace.report();
        assert_eq!(report.blocks, vec![2, 3]);
        assert_eq!(report.layers, 3);
        assert_eq!(report.at_question, 1);
        assert_eq!(report.at_question_partly, 1);
        assert_eq!(report.per_layer_at_question, "+~-");
        assert_eq!(report.at_answer, 2);
        assert_eq!(report.per_layer_at_answer, "++-");
        assert_eq!(report.at_decode, vec![1]);
        assert_eq!(report.per_layer_first_decode, "+~-");
        assert_eq!(report.ranks_at_question, vec![Some(0), Some(1), Some(4)]);
        assert_eq!(report.ranks_at_first_decode, report.ranks_at_question);
        // Five chances per layer: layer 0 saw it whole at every one, layer 1
        // at the last, layer 2 never.
        let share = report.prefill_share.unwrap();
        assert!((share - 6.0 / 15.0).abs() < 1e-9, "{share}");
    }
}

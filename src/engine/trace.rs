//! A debug instrument: for a known span of the prompt (a needle), whether
//! the memory blocks holding it were retrieved, per layer, at the execution
//! block that reads the question, at the prompt's last token (which gives
//! the answer's first token) and at the first decode steps.
//!
//! Every layer cuts its blocks at the same places (fixed offsets, or after
//! the same sentence ends); each execution block reports where its blocks
//! begin and which it retrieved, and the needle's tokens are checked against
//! them.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::memory::BlockRead;

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

/// Memory blocks holding tokens of `span`, ascending: block `b` holds the
/// `block_size` tokens from `block_starts[b]` (ascending), so they are a
/// run found by two binary searches, not a scan of every block.
pub fn blocks_of(span: &Range<usize>, block_starts: &[usize], block_size: usize) -> Vec<usize> {
    let first = block_starts.partition_point(|&s| s + block_size <= span.start);
    let end = block_starts.partition_point(|&s| s < span.end);
    (first..end.max(first)).collect()
}

/// What one execution block saw of the needle `span`, given the blocks it
/// retrieved and where its memory's blocks begin: every needle token behind
/// a block (from the first block's start up to `recent_start`) must lie in
/// a retrieved block for the needle to be seen whole; tokens in the sinks
/// or still recent are attended anyway.
pub fn sight(
    span: &Range<usize>,
    retrieved: &[usize],
    block_starts: &[usize],
    block_size: usize,
    recent_start: usize,
) -> Sight {
    let Some(&first) = block_starts.first() else {
        return Sight::Whole;
    };
    let behind = span.start.max(first)..span.end.min(recent_start);
    let covered = behind
        .clone()
        .filter(|&t| {
            retrieved.iter().any(|&b| {
                block_starts
                    .get(b)
                    .is_some_and(|&s| s <= t && t < s + block_size)
            })
        })
        .count();
    if covered == behind.len() {
        Sight::Whole
    } else if covered > 0 {
        Sight::Part
    } else {
        Sight::Missed
    }
}

/// Rank (0 = best) of the needle's best-scoring formed block among all
/// blocks, by the row of `scores` (one per retrieval: shared, or per KV
/// head) that ranks it best; `None` before any of its blocks exists.
pub fn rank(needle_blocks: &[usize], scores: &[Vec<f32>]) -> Option<usize> {
    scores
        .iter()
        .filter_map(|row| {
            let best = needle_blocks
                .iter()
                .filter(|&&b| b < row.len())
                .map(|&b| row[b])
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
    block_size: usize,
    /// Blocks holding needle tokens, as far as formed.
    blocks: Vec<usize>,
    /// Whether the needle's tokens beyond the sinks lie in no single block.
    cut: bool,
    /// Position whose execution block reads the question.
    question_at: usize,
    prompt_len: usize,
    layers: Vec<LayerTrace>,
}

impl NeedleTrace {
    /// A trace of `span` in a prompt of `prompt_len` tokens whose question
    /// ends at `question_end` (the prompt's end when unknown).
    /// Blocks hold `block_size` tokens each.
    pub fn new(
        span: Range<usize>,
        question_end: Option<usize>,
        prompt_len: usize,
        block_size: usize,
    ) -> Self {
        let question_at = question_end
            .unwrap_or(prompt_len)
            .clamp(1, prompt_len.max(1))
            - 1;
        Self {
            span,
            block_size,
            blocks: Vec::new(),
            cut: false,
            question_at,
            prompt_len,
            layers: Vec::new(),
        }
    }

    /// Records what an execution block of `layer` read and retrieved.
    pub fn observe(&mut self, layer: usize, read: &BlockRead<'_>) {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, LayerTrace::default);
        }
        let (starts, size) = (read.block_starts, self.block_size);
        let needle_blocks = blocks_of(&self.span, starts, size);
        if needle_blocks.len() > self.blocks.len() {
            let beyond_sinks = self.span.start.max(starts[0])..self.span.end;
            self.cut = !needle_blocks
                .iter()
                .any(|&b| starts[b] <= beyond_sinks.start && beyond_sinks.end <= starts[b] + size);
            self.blocks.clone_from(&needle_blocks);
        }
        let positions = read.positions.clone();
        let seen = sight(&self.span, read.retrieved, starts, size, read.recent_start);
        let rank = rank(&needle_blocks, read.scores);
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
        // A question read before the needle (copied first) cannot retrieve
        // it: nothing is recorded there.
        if positions.contains(&self.question_at) && self.question_at >= self.span.end {
            trace.at_question = Some(seen);
            trace.rank_at_question = rank;
        }
        if positions.contains(&(self.prompt_len.max(1) - 1)) {
            trace.at_answer = Some(seen);
        }
        if !needle_blocks.is_empty() {
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
            blocks: self.blocks.clone(),
            cut: self.cut,
            question_before: self.question_at < self.span.end,
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
    /// Memory blocks holding its tokens (none: it lies in the sinks, or no
    /// block holding it was formed).
    pub blocks: Vec<usize>,
    /// Whether no single block holds all of it beyond the sinks: it was cut
    /// across a block boundary (with overlapping `sentence` blocks, it may
    /// lie in two blocks and still whole in one of them).
    #[serde(default)]
    pub cut: bool,
    /// Whether the question whose span the sequence uses is read before the
    /// needle (copied first, or asked first only); nothing is then counted
    /// at the question.
    #[serde(default)]
    pub question_before: bool,
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

    /// Block starts with `n_init` 4 and fixed blocks of 8: block `b` holds
    /// tokens `4 + 8b .. 12 + 8b`.
    fn fixed_starts(blocks: usize) -> Vec<usize> {
        (0..blocks).map(|b| 4 + 8 * b).collect()
    }

    #[test]
    fn a_needle_maps_to_the_blocks_its_tokens_fall_in() {
        let starts = fixed_starts(4);
        assert_eq!(blocks_of(&(5..9), &starts, 8), vec![0]);
        assert_eq!(
            blocks_of(&(10..14), &starts, 8),
            vec![0, 1],
            "cut across a boundary"
        );
        assert_eq!(
            blocks_of(&(0..3), &starts, 8),
            Vec::<usize>::new(),
            "in the sinks"
        );
        assert_eq!(
            blocks_of(&(2..6), &starts, 8),
            vec![0],
            "partly in the sinks"
        );
        assert_eq!(blocks_of(&(12..20), &starts, 8), vec![1]);
        // Overlapping blocks (sentence boundaries): 4..12, 9..17, 15..23.
        assert_eq!(blocks_of(&(10..14), &[4, 9, 15], 8), vec![0, 1]);
    }

    #[test]
    fn sight_counts_only_tokens_behind_blocks() {
        let starts = fixed_starts(6);
        // Needle 12..28: blocks 1 and 2.
        assert_eq!(sight(&(12..28), &[1, 2, 5], &starts, 8, 52), Sight::Whole);
        assert_eq!(sight(&(12..28), &[2, 5], &starts, 8, 52), Sight::Part);
        assert_eq!(sight(&(12..28), &[0, 5], &starts, 8, 52), Sight::Missed);
        // Block 2 not formed yet: its tokens are still recent, so attended.
        assert_eq!(sight(&(12..28), &[1], &starts[..2], 8, 20), Sight::Whole);
        assert_eq!(sight(&(12..28), &[], &[], 8, 0), Sight::Whole);
        // Overlapping blocks 4..12, 9..17, 15..23: a needle at 10..14 lies
        // whole in block 1, partly in block 0.
        let overlapping = [4, 9, 15];
        assert_eq!(sight(&(10..14), &[1], &overlapping, 8, 21), Sight::Whole);
        assert_eq!(sight(&(10..14), &[0], &overlapping, 8, 21), Sight::Part);
        assert_eq!(sight(&(10..14), &[2], &overlapping, 8, 21), Sight::Missed);
    }

    #[test]
    fn a_needle_whole_in_one_overlapping_block_is_not_cut() {
        let mut trace = NeedleTrace::new(10..14, None, 100, 8);
        let read = BlockRead {
            positions: &(40..48),
            retrieved: &[1],
            scores: &[],
            blocks: 3,
            block_starts: &[4, 9, 15],
            recent_start: 21,
        };
        trace.observe(0, &read);
        let report = trace.report();
        assert_eq!((report.blocks, report.cut), (vec![0, 1], false));
        let mut trace = NeedleTrace::new(10..14, None, 100, 8);
        trace.observe(
            0,
            &BlockRead {
                block_starts: &[4, 12],
                recent_start: 20,
                ..read
            },
        );
        let report = trace.report();
        assert_eq!((report.blocks, report.cut), (vec![0, 1], true));
    }

    #[test]
    fn layers_that_retrieve_the_needle_are_counted_and_others_not() {
        // Needle at tokens 20..30: blocks 2 and 3 (n_init 4, blocks of 8).
        // Prompt of 100 tokens, question at 90..99, execution blocks of 16.
        let mut trace = NeedleTrace::new(20..30, Some(99), 100, 8);
        let layers: [&[usize]; 3] = [&[2, 3], &[3, 7], &[0, 1]];
        // Scores consistent with those picks: block 3 is 2nd, then 4th best.
        let scores = [
            [0.0, 0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 9.0, 0.0],
            [9.0, 8.0, 1.0, 2.0, 7.0, 6.0, 0.0, 0.0, 0.0],
        ];
        let all = fixed_starts(9);
        for (layer, retrieved) in layers.iter().enumerate() {
            let row = [scores[layer].to_vec()];
            for start in (0..96usize).step_by(16) {
                // Blocks exist once their tokens have left a 16-token window.
                let formed = &all[..start.saturating_sub(20) / 8];
                trace.observe(
                    layer,
                    &trace_read(&(start..start + 16), retrieved, &[], formed),
                );
            }
            trace.observe(layer, &trace_read(&(96..99), retrieved, &row, &all));
            // The prompt's last token: layer 1 now sees all of the needle.
            let last: &[usize] = if layer == 1 { &[2, 3] } else { retrieved };
            trace.observe(layer, &trace_read(&(99..100), last, &row, &all));
            trace.observe(layer, &trace_read(&(100..101), retrieved, &row, &all));
        }
        let report = trace.report();
        assert_eq!(report.blocks, vec![2, 3]);
        assert!(report.cut);
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
        assert!(!report.question_before);
    }

    #[test]
    fn a_question_read_before_the_needle_counts_nothing_there() {
        // Question at 0..10, needle at 20..30, prompt of 100 tokens.
        let mut trace = NeedleTrace::new(20..30, Some(10), 100, 8);
        let all = fixed_starts(9);
        trace.observe(0, &trace_read(&(0..16), &[], &[], &[]));
        trace.observe(0, &trace_read(&(99..100), &[2, 3], &[], &all));
        let report = trace.report();
        assert!(report.question_before);
        assert_eq!((report.at_question, report.at_question_partly), (0, 0));
        assert_eq!(report.per_layer_at_question, "?");
        assert_eq!(
            (report.at_answer, report.per_layer_at_answer.as_str()),
            (1, "+")
        );
    }

    /// An execution block's read with fixed blocks of 8 beginning at
    /// `starts`.
    fn trace_read<'a>(
        positions: &'a Range<usize>,
        retrieved: &'a [usize],
        scores: &'a [Vec<f32>],
        starts: &'a [usize],
    ) -> BlockRead<'a> {
        BlockRead {
            positions,
            retrieved,
            scores,
            blocks: starts.len(),
            block_starts: starts,
            recent_start: starts.last().map_or(4, |s| s + 8),
        }
    }
}

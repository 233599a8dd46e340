//! Where memory blocks begin: at fixed offsets (the paper's) or right after
//! a sentence end, so that a one-sentence fact lands whole in one block.

use crate::config::{Boundaries, Policy};

/// Tokens the memory moves past when it forms the block that begins at
/// position `start`: `block_size` with `fixed` boundaries; with `sentence`
/// boundaries, up to and including the last sentence end among the block's
/// tokens `start + min_block_advance - 1 ..= start + block_size - 1`
/// (`sentence_ends[p]`: whether token `p` ends a sentence; positions past
/// its end are not), else `block_size`. The block itself always holds
/// `block_size` tokens; the next one begins where this advance ends.
pub fn block_advance(policy: &Policy, sentence_ends: &[bool], start: usize) -> usize {
    let size = policy.block_size;
    if policy.boundaries == Boundaries::Fixed {
        return size;
    }
    let first = start + policy.min_block_advance() - 1;
    (first..start + size)
        .rev()
        .find(|&p| sentence_ends.get(p).copied().unwrap_or(false))
        .map_or(size, |p| p + 1 - start)
}

/// Texts that end a sentence or a line, to look up with the model's own
/// tokenizer: those it encodes as a single token are its sentence ends
/// (a `.` between digits counts too: a block cut there is still a block).
pub const SENTENCE_END_TEXTS: &[&str] = &[
    ".",
    "?",
    "!",
    "\n",
    "\n\n",
    "\n\n\n",
    ".\n",
    ".\n\n",
    "?\n",
    "?\n\n",
    "!\n",
    "!\n\n",
    ".\"",
    "?\"",
    "!\"",
    ".)",
    ".'",
    ".\u{201d}",
    " .",
    ":\n",
    ":\n\n",
    "...",
    "\u{3002}",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn sentence_policy(block_size: usize) -> Policy {
        Policy {
            block_size,
            boundaries: Boundaries::Sentence,
            ..Policy::default()
        }
    }

    #[test]
    fn fixed_boundaries_advance_a_whole_block() {
        let policy = Policy {
            block_size: 8,
            ..Policy::default()
        };
        assert_eq!(block_advance(&policy, &[true; 64], 3), 8);
    }

    #[test]
    fn a_block_ends_after_the_last_sentence_end_in_its_second_half() {
        let policy = sentence_policy(8);
        let mut ends = vec![false; 40];
        // Block at 10 holds 10..18; its second half is 13..=17.
        ends[11] = true; // first half: too early to cut
        ends[14] = true;
        ends[16] = true;
        assert_eq!(block_advance(&policy, &ends, 10), 7, "after token 16");
        ends[16] = false;
        assert_eq!(block_advance(&policy, &ends, 10), 5, "after token 14");
        ends[14] = false;
        assert_eq!(
            block_advance(&policy, &ends, 10),
            8,
            "no end in the second half"
        );
        ends[17] = true;
        assert_eq!(
            block_advance(&policy, &ends, 10),
            8,
            "the block's last token"
        );
        // Positions past the known tokens are not sentence ends.
        assert_eq!(block_advance(&policy, &ends[..12], 10), 8);
    }

    #[test]
    fn every_short_sentence_lies_whole_in_some_block() {
        // Sentences of 3 to 10 tokens (block_size 20: at most 10 are
        // guaranteed), blocks formed one after another as the memory does.
        let policy = sentence_policy(20);
        let lengths = [7, 3, 10, 9, 4, 10, 10, 5, 8, 6, 10, 3, 3, 9, 7, 10, 2];
        let mut ends = Vec::new();
        let mut sentences = Vec::new();
        for &len in &lengths {
            sentences.push(ends.len()..ends.len() + len);
            ends.extend((0..len).map(|i| i + 1 == len));
        }
        let mut starts = vec![0];
        while starts.last().unwrap() + 20 <= ends.len() {
            let s = *starts.last().unwrap();
            let advance = block_advance(&policy, &ends, s);
            assert!((10..=20).contains(&advance), "{advance}");
            starts.push(s + advance);
        }
        starts.pop();
        let covered_end = starts.last().unwrap() + 20;
        for sentence in sentences.iter().filter(|s| s.end <= covered_end) {
            assert!(
                starts
                    .iter()
                    .any(|&s| s <= sentence.start && sentence.end <= s + 20),
                "{sentence:?} is cut by every block: {starts:?}"
            );
        }
    }
}

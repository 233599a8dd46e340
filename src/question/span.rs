//! Where the question sits in a prompt's tokens.

use std::ops::Range;

use crate::config::Policy;

/// The last occurrence of `question` in `tokens`; when the whole does not
/// occur, the last occurrence of its inner tokens, widened by one token on
/// each side (its first and last tokens may merge with their neighbours).
pub fn find_question_span(tokens: &[u32], question: &[u32]) -> Option<Range<usize>> {
    find_span(tokens, question, Occurrence::Last)
}

/// Which occurrence of a span [`find_span`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    /// The first.
    First,
    /// The last.
    Last,
}

/// `question` in `tokens` as [`find_question_span`] finds it, at the first
/// or the last occurrence.
pub fn find_span(tokens: &[u32], question: &[u32], which: Occurrence) -> Option<Range<usize>> {
    let find = |needle: &[u32]| -> Option<usize> {
        if needle.is_empty() || needle.len() > tokens.len() {
            return None;
        }
        let mut windows = tokens.windows(needle.len());
        match which {
            Occurrence::First => windows.position(|w| w == needle),
            Occurrence::Last => windows.rposition(|w| w == needle),
        }
    };
    if let Some(at) = find(question) {
        return Some(at..at + question.len());
    }
    find_loose(tokens, question, which)
}

/// `question`'s inner tokens in `tokens` at the `which` occurrence, widened
/// by one token on each side: a copy whose first or last token merged with
/// its neighbour (`?` and the blank line after it are one token in some
/// vocabularies).
fn find_loose(tokens: &[u32], question: &[u32], which: Occurrence) -> Option<Range<usize>> {
    if question.len() <= 2 {
        return None;
    }
    let inner = &question[1..question.len() - 1];
    let mut windows = tokens.windows(inner.len());
    let at = match which {
        Occurrence::First => windows.position(|w| w == inner),
        Occurrence::Last => windows.rposition(|w| w == inner),
    }?;
    Some(at.saturating_sub(1)..(at + inner.len() + 1).min(tokens.len()))
}

/// The question span a sequence with `policy` uses, and whether it was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuestionSpan {
    /// The tokens whose queries make the question vector.
    pub span: Range<usize>,
    /// Tokens of the question that were left out (more than `n_local`).
    pub cut: usize,
}

/// The question's span in `tokens` under `policy`: its earliest occurrence
/// if that is read before any memory block could be retrieved (it ends
/// within `n_init + n_local` tokens: the paper's layout, the question before
/// the document), else its last (the question after the document). A span
/// longer than `n_local` keeps its last `n_local` tokens: the question
/// vector is read from the local window.
pub fn resolve(tokens: &[u32], question: &[u32], policy: &Policy) -> Option<QuestionSpan> {
    let read_in_time = read_in_time(policy);
    // An early copy may have an edge token merged with the text beside it
    // while a later one matches whole: the early one still wins.
    let span = find_span(tokens, question, Occurrence::First)
        .filter(|early| early.end <= read_in_time)
        .or_else(|| find_edge_merged(tokens, question).filter(|early| early.end <= read_in_time))
        .or_else(|| find_question_span(tokens, question))?;
    let start = span.start.max(span.end.saturating_sub(policy.n_local));
    Some(QuestionSpan {
        cut: start - span.start,
        span: start..span.end,
    })
}

/// Fewest tokens a question needs for an early copy that matches all but
/// one edge token to be taken over a later copy that matches whole.
const EDGE_MERGED_MIN_TOKENS: usize = 6;

/// The first occurrence of `question` with exactly its first or its last
/// token changed (merged with the text beside it), for questions of at
/// least [`EDGE_MERGED_MIN_TOKENS`]: fewer could match other text.
fn find_edge_merged(tokens: &[u32], question: &[u32]) -> Option<Range<usize>> {
    let n = question.len();
    if n < EDGE_MERGED_MIN_TOKENS || n > tokens.len() {
        return None;
    }
    let at = tokens
        .windows(n)
        .position(|w| w[..n - 1] == question[..n - 1] || w[1..] == question[1..])?;
    Some(at..at + n)
}

/// Tokens read before the first memory block can be retrieved: a question
/// that ends within them is captured in line.
pub fn read_in_time(policy: &Policy) -> usize {
    policy.n_init + policy.n_local
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_is_found_last_and_with_loose_edges() {
        let prompt = [5, 1, 2, 3, 4, 9, 1, 2, 3, 4, 7];
        assert_eq!(find_question_span(&prompt, &[1, 2, 3, 4]), Some(6..10));
        // Edges tokenised differently in context: matched by the inner tokens.
        assert_eq!(find_question_span(&prompt, &[8, 2, 3, 6]), Some(6..10));
        assert_eq!(find_question_span(&prompt, &[8, 8, 8]), None);
        assert_eq!(
            find_span(&prompt, &[1, 2, 3, 4], Occurrence::First),
            Some(1..5)
        );
        assert_eq!(
            find_span(&prompt, &[8, 2, 3, 6], Occurrence::First),
            Some(1..5)
        );
        assert_eq!(find_question_span(&prompt, &[]), None);
    }

    #[test]
    fn an_early_question_is_preferred_when_it_is_read_in_time() {
        let policy = Policy {
            n_init: 2,
            n_local: 4,
            exc_block_size: 4,
            ..Policy::default()
        };
        // The paper's layout: the question before and after the document.
        let mut prompt = vec![9, 1, 2, 3];
        prompt.extend([7; 20]);
        prompt.extend([1, 2, 3]);
        let early = resolve(&prompt, &[1, 2, 3], &policy).unwrap();
        assert_eq!(early, QuestionSpan { span: 1..4, cut: 0 });
        // Too late for the early copy to be read before retrieval: the last.
        let mut late = vec![7; 6];
        late.extend(&prompt);
        let span = resolve(&late, &[1, 2, 3], &policy).unwrap();
        assert_eq!(span.span, late.len() - 3..late.len());
        // Longer than the window: its last `n_local` tokens.
        let long = [5, 1, 2, 3, 4, 5, 6, 8];
        let cut = resolve(&long, &[1, 2, 3, 4, 5, 6], &policy).unwrap();
        assert_eq!(cut, QuestionSpan { span: 3..7, cut: 2 });
        assert_eq!(resolve(&long, &[42, 43], &policy), None);
        // The early copy's last token merged with the blank line after it
        // (99), the late one whole: the early copy, widened, is read.
        let question = [1, 2, 3, 4, 5, 6];
        let policy = Policy {
            n_local: 8,
            exc_block_size: 8,
            ..policy
        };
        let mut merged = vec![9, 1, 2, 3, 4, 5, 99];
        merged.extend([7; 20]);
        merged.extend(question);
        assert_eq!(resolve(&merged, &question, &policy).unwrap().span, 1..7);
        // Both edges changed (the pass key's needle holds the question's
        // inner tokens), or a short question: the whole, late.
        let mut both = vec![9, 98, 2, 3, 4, 5, 99];
        both.extend([7; 20]);
        both.extend(question);
        let span = resolve(&both, &question, &policy).unwrap();
        assert_eq!(span.span, both.len() - 6..both.len());
        let mut short = vec![9, 1, 2, 99];
        short.extend([7; 20]);
        short.extend([1, 2, 3]);
        let span = resolve(&short, &[1, 2, 3], &policy).unwrap();
        assert_eq!(span.span, short.len() - 3..short.len());
    }
}

//! The passkey retrieval task: a 5-digit key hidden at a given depth of
//! repeated filler text, asked for at the end.
//!
//! The prompt is a plain completion (no chat template), the layout under
//! which SmolLM2 finds the key with full attention inside its window:
//! intro, filler with the needle at the requested depth, question.

/// Opening instruction; without its last sentence SmolLM2 fails most cells
/// even at 1K tokens with full attention.
pub const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. \
                         Find it and memorize it. I will quiz you about the important information there.\n";
/// One unit of filler.
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
/// The question, as it appears in the prompt.
pub const QUESTION: &str = "What is the pass key?";
/// What follows the question: the model completes it with the key.
pub const ANSWER_PREFIX: &str = " The pass key is";

/// The sentence that carries the key.
pub fn needle(key: u32) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key. ")
}

/// A prompt with `filler_units` units of filler and the needle after
/// `round(depth * filler_units)` of them.
pub fn prompt(filler_units: usize, depth: f64, key: u32) -> String {
    let at = filler_at(filler_units, depth);
    format!(
        "{INTRO}{}{}{}\n\n{QUESTION}{ANSWER_PREFIX}",
        FILLER.repeat(at),
        needle(key),
        FILLER.repeat(filler_units - at)
    )
}

/// The text of a prompt without its filler, for sizing.
pub fn fixed_text(key: u32) -> String {
    prompt(0, 0.0, key)
}

/// Filler units that bring a prompt to about `target_tokens`, given the
/// tokens of [`fixed_text`] and of one filler unit.
pub fn filler_units_for(target_tokens: usize, fixed_tokens: usize, tokens_per_unit: f64) -> usize {
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let units =
        (target_tokens.saturating_sub(fixed_tokens) as f64 / tokens_per_unit).round() as usize;
    units
}

/// A reproducible 5-digit key for cell `cell` of a run with `seed`.
pub fn key(seed: u64, cell: u64) -> u32 {
    // SplitMix64: well-spread keys from consecutive cells.
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(cell.wrapping_add(1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    #[allow(clippy::cast_possible_truncation)] // < 90000.
    let offset = (z % 90_000) as u32;
    10_000 + offset
}

fn filler_at(filler_units: usize, depth: f64) -> usize {
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let at = (filler_units as f64 * depth.clamp(0.0, 1.0)).round() as usize;
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needle_sits_at_the_requested_depth() {
        let text = prompt(100, 0.25, 12345);
        let at = text.find("The pass key is 12345").unwrap();
        let before = text[..at].matches(FILLER).count();
        assert_eq!(before, 25);
        assert_eq!(text.matches(FILLER).count(), 100);
        assert!(text.ends_with("What is the pass key? The pass key is"));
    }

    #[test]
    fn keys_are_five_digits_and_reproducible() {
        let keys: Vec<u32> = (0..50).map(|c| key(7, c)).collect();
        assert!(keys.iter().all(|k| (10_000..100_000).contains(k)));
        assert_eq!(keys, (0..50).map(|c| key(7, c)).collect::<Vec<_>>());
        assert_ne!(key(7, 0), key(8, 0));
    }
}

//! The local window's keys, rotated once.
//!
//! Attention within the window depends only on the distance between a query
//! and a key, so keys may sit at any positions as long as the queries are
//! rotated with the same offset. With the fixed layout (`positions =
//! "fixed"`, the paper's) the window's keys are kept rotated at `t - base`
//! for token `t`: a decode step rotates its own key only, instead of the
//! whole window. `base` moves to the window's first token (and every key is
//! rotated again) only when the newest token would pass the positions the
//! policy needs, about once per `exc_block_size` tokens, so positions stay
//! within the RoPE table. Prompt execution blocks, which move the window by
//! a whole block, rotate it afresh without keeping it.

use std::ops::Range;

use candle_core::{Result, Tensor};

use super::kv_buffer::RowBuffer;
use crate::attention::{positions, rotate_f32, Rotary};

/// Rotated keys of the tokens `first..first + keys.len()`, f32.
#[derive(Debug, Default)]
pub struct RotatedWindow {
    keys: RowBuffer,
    /// Token of the oldest key held.
    first: usize,
    /// Token rotated at position 0.
    base: usize,
}

impl RotatedWindow {
    /// The keys of the tokens `window` rotated at `t - base`, `(1, kv_heads,
    /// window.len(), d)` f32, and `base`. `unrotated` holds the window's keys
    /// pre-RoPE; its last `new` tokens are the ones not seen before.
    /// Positions stay below `limit`, which must cover `window.len()`.
    pub fn keys(
        &mut self,
        rope: &dyn Rotary,
        unrotated: &Tensor,
        window: Range<usize>,
        new: usize,
        limit: usize,
    ) -> Result<(Tensor, usize)> {
        let seen = window.end - new;
        let goes_on = !self.keys.is_empty()
            && self.first <= window.start
            && self.first + self.keys.len() == seen
            && window.end - self.base <= limit;
        if goes_on {
            self.keys.drop_front(window.start - self.first);
            self.first = window.start;
            let fresh = unrotated.narrow(2, window.len() - new, new)?;
            let at = positions(seen - self.base..window.end - self.base, fresh.device())?;
            self.keys.append(&rotate_f32(rope, &fresh, &at)?)?;
        } else {
            if window.len() > limit {
                candle_core::bail!(
                    "qllm: a window of {} tokens needs more than {limit} positions",
                    window.len()
                );
            }
            let at = positions(0..window.len(), unrotated.device())?;
            let rotated = rotate_f32(rope, unrotated, &at)?;
            self.keys.drop_front(self.keys.len());
            if new > 1 {
                // A prompt's execution blocks move the window by a whole
                // block each, so each rotates it afresh anyway: keeping
                // their wider windows would only double what is held.
                return Ok((rotated, window.start));
            }
            self.first = window.start;
            self.base = window.start;
            self.keys.append(&rotated)?;
        }
        Ok((self.keys.range(0, window.len())?, self.base))
    }

    /// The token rotated at position 0.
    #[cfg(test)]
    pub(crate) fn base(&self) -> usize {
        self.base
    }

    /// Bytes held (capacity).
    pub fn bytes(&self) -> usize {
        self.keys.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::reference::tensor_max_abs_diff;
    use crate::attention::RopeTable;
    use candle_core::Device;

    #[test]
    fn keys_rotated_once_match_the_window_rotated_afresh_at_every_step() {
        let device = Device::Cpu;
        let rope = RopeTable::new(10_000.0, 16, 256, true, &device).unwrap();
        let keys = Tensor::randn(0f32, 1f32, (1, 2, 400, 16), &device).unwrap();
        let (n_local, limit) = (40, 70);
        let mut window = RotatedWindow::default();
        // Decode steps that rotated the whole window (the first one must).
        let mut rotated_whole = 0;
        let mut last_base = None;
        let mut end: usize = 0;
        // A prompt in execution blocks of 30, then single tokens.
        for new in [30, 30, 30, 30]
            .into_iter()
            .chain(std::iter::repeat_n(1, 200))
        {
            end += new;
            let start = end.saturating_sub(n_local - 1 + new);
            let unrotated = keys.narrow(2, start, end - start).unwrap();
            let (rotated, base) = window
                .keys(&rope, &unrotated, start..end, new, limit)
                .unwrap();
            if new == 1 {
                rotated_whole += usize::from(last_base != Some(base));
            }
            last_base = Some(base);
            assert!(end - base <= limit, "{end} {base}");
            // The same keys rotated from the window's start: equal up to a
            // shift of every position by `start - base`.
            let afresh = rotate_f32(
                &rope,
                &unrotated,
                &positions(start - base..end - base, &device).unwrap(),
            )
            .unwrap();
            assert!(tensor_max_abs_diff(&rotated, &afresh) < 1e-6, "at {end}");
        }
        // About once per `limit - n_local + 1` decode steps, not every step.
        assert!((6..=8).contains(&rotated_whole), "{rotated_whole} of 200");
    }
}

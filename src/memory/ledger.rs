//! Where every token of a layer's memory is: plain counts, no tensors.
//!
//! Tokens `0..processed` of a sequence are, in order: the sinks
//! (`0..sinks`), then the `blocked` tokens behind `blocks` memory blocks of
//! `block_size` tokens each (or, in `streaming`, `dropped` tokens
//! forgotten), then the recent tokens (`recent_start..processed`), the
//! newest of which form the local window. A block holds the `block_size`
//! tokens from where it begins; the next one begins after its advance
//! (`block_size`, or less with sentence boundaries: then the tail of a block
//! is also the head of the next, or still recent).
//! [`Ledger::read`] lays out one execution block; [`Ledger::plan_eviction`]
//! says what leaves the recent tokens after it, and [`Ledger::evict`]
//! records it. The memory that owns the tensors follows these plans.

use std::ops::Range;

use crate::config::{Mode, Policy};

/// Positions and counts of one layer's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ledger {
    processed: usize,
    sinks: usize,
    blocks: usize,
    blocked: usize,
    dropped: usize,
    recent_start: usize,
}

/// How an execution block of queries `queries` reads the recent tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    /// Positions of the execution block's queries (and its new keys).
    pub queries: Range<usize>,
    /// Recent tokens in the window of some query of the block: attended at
    /// exact relative positions.
    pub local: Range<usize>,
    /// Recent tokens past the window of some query (the oldest ones):
    /// attended like memory by the queries they are too far from.
    pub global_recent: Range<usize>,
}

/// What leaves the recent tokens after an execution block, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Tokens that become sinks.
    pub to_sinks: usize,
    /// Memory blocks formed from the tokens after them, one after another:
    /// each holds the `block_size` tokens from where it begins and moves
    /// the recent tokens' start on by its entry.
    pub block_advances: Vec<usize>,
    /// Tokens forgotten after them (`streaming` only).
    pub dropped: usize,
}

impl Ledger {
    /// Tokens processed so far.
    pub fn processed(&self) -> usize {
        self.processed
    }

    /// Sink tokens held.
    pub fn sinks(&self) -> usize {
        self.sinks
    }

    /// Memory blocks formed.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Tokens the blocks moved past: each once, however blocks overlap.
    pub fn blocked(&self) -> usize {
        self.blocked
    }

    /// Tokens forgotten (`streaming` only).
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Position of the oldest recent token.
    pub fn recent_start(&self) -> usize {
        self.recent_start
    }

    /// Recent tokens: neither sinks nor in blocks nor dropped.
    pub fn recent(&self) -> usize {
        self.processed - self.recent_start
    }

    /// Records `e` new tokens and lays out how their queries, with a window
    /// of `n_local` tokens, read the recent tokens (the new ones included).
    pub fn read(&mut self, e: usize, n_local: usize) -> ReadPlan {
        let p0 = self.processed;
        let end = p0 + e;
        self.processed = end;
        let local_start = self.recent_start.max((p0 + 1).saturating_sub(n_local));
        let global_recent_end = self.recent_start.max(end.saturating_sub(n_local));
        ReadPlan {
            queries: p0..end,
            local: local_start..end,
            global_recent: self.recent_start..global_recent_end,
        }
    }

    /// What leaves the recent tokens once every future query's window has
    /// moved past it: sinks fill first, then blocks form (`qllm`,
    /// `infllm`) while a whole block lies past the window, each moving on
    /// by `advance(its first position)` (between 1 and `block_size`), or
    /// (`streaming`) everything but the next query's window is dropped.
    pub fn plan_eviction(&self, policy: &Policy, advance: impl Fn(usize) -> usize) -> Eviction {
        let n_local = policy.n_local;
        let mut recent = self.recent();
        let to_sinks = if self.sinks < policy.n_init && recent > n_local {
            (policy.n_init - self.sinks).min(recent - n_local)
        } else {
            0
        };
        recent -= to_sinks;
        let sinks_full = self.sinks + to_sinks >= policy.n_init;
        let mut plan = Eviction {
            to_sinks,
            ..Eviction::default()
        };
        if !sinks_full {
            return plan;
        }
        match policy.mode {
            Mode::Qllm | Mode::Infllm => {
                let mut start = self.recent_start + to_sinks;
                while recent >= n_local + policy.block_size {
                    let step = advance(start).clamp(1, policy.block_size);
                    plan.block_advances.push(step);
                    start += step;
                    recent -= step;
                }
            }
            Mode::Streaming if recent >= n_local => plan.dropped = recent + 1 - n_local,
            _ => {}
        }
        plan
    }

    /// Records an eviction.
    pub fn evict(&mut self, plan: &Eviction) {
        let blocked: usize = plan.block_advances.iter().sum();
        self.sinks += plan.to_sinks;
        self.blocks += plan.block_advances.len();
        self.blocked += blocked;
        self.dropped += plan.dropped;
        self.recent_start += plan.to_sinks + blocked + plan.dropped;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy(mode: Mode, n_init: usize, n_local: usize, block_size: usize) -> Policy {
        Policy {
            mode,
            n_init,
            n_local,
            block_size,
            exc_block_size: n_local,
            repr_topk: 1,
            ..Policy::default()
        }
    }

    fn modes() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Qllm), Just(Mode::Infllm), Just(Mode::Streaming)]
    }

    proptest! {
        /// Over any sequence of calls, every token is in exactly one place,
        /// the sinks never overflow, the recent tokens stay within their
        /// bounds, and each read plan covers what its queries can see.
        #[test]
        fn every_token_has_one_place_and_the_recent_tokens_stay_bounded(
            mode in modes(),
            n_init in 0usize..12,
            n_local in 1usize..40,
            block_size in 1usize..17,
            calls in proptest::collection::vec(1usize..70, 1..60),
            advance_seed in 0usize..1000,
        ) {
            let policy = policy(mode, n_init, n_local, block_size);
            let mut ledger = Ledger::default();
            for e in calls {
                let before = ledger;
                let plan = ledger.read(e, n_local);
                prop_assert_eq!(plan.queries.clone(), before.processed..before.processed + e);
                // The window of the first query reaches back n_local - 1
                // tokens (or to the oldest recent one), the new keys included.
                prop_assert!(plan.local.start >= before.recent_start);
                prop_assert_eq!(plan.local.end, plan.queries.end);
                prop_assert!(plan.local.len() < n_local + e);
                prop_assert_eq!(plan.global_recent.start, before.recent_start);
                prop_assert!(plan.global_recent.end <= plan.queries.end.saturating_sub(n_local).max(before.recent_start));
                // Blocks advance by 1..=block_size tokens (sentence ends),
                // a different amount at each position.
                let advance = |p: usize| 1 + (p * 7 + advance_seed) % block_size;
                let eviction = ledger.plan_eviction(&policy, advance);
                let mut start = before.recent_start() + eviction.to_sinks;
                for &step in &eviction.block_advances {
                    prop_assert_eq!(step, advance(start));
                    start += step;
                }
                ledger.evict(&eviction);
                prop_assert_eq!(
                    ledger.sinks() + ledger.blocked() + ledger.dropped() + ledger.recent(),
                    ledger.processed()
                );
                prop_assert!(ledger.blocked() >= ledger.blocks());
                prop_assert!(ledger.blocked() <= ledger.blocks() * block_size);
                prop_assert!(ledger.sinks() <= n_init);
                // Nothing a future query's window needs is evicted.
                let floor = n_local.min(ledger.processed() - ledger.sinks());
                prop_assert!(ledger.recent() >= floor.saturating_sub(usize::from(mode == Mode::Streaming)));
                if ledger.sinks() == n_init {
                    match mode {
                        Mode::Streaming => prop_assert!(ledger.recent() < n_local),
                        _ => prop_assert!(ledger.recent() < n_local + block_size),
                    }
                    prop_assert!(ledger.plan_eviction(&policy, advance) == Eviction::default());
                } else {
                    // Sinks fill before anything else leaves.
                    prop_assert_eq!(ledger.blocks() + ledger.dropped(), 0);
                    prop_assert!(ledger.recent() <= n_local);
                }
                if mode == Mode::Streaming {
                    prop_assert_eq!(ledger.blocks(), 0);
                } else {
                    prop_assert_eq!(ledger.dropped(), 0);
                }
            }
        }
    }

    #[test]
    fn a_long_prompt_fills_the_sinks_then_forms_blocks() {
        let policy = policy(Mode::Qllm, 4, 16, 8);
        let mut ledger = Ledger::default();
        let plan = ledger.read(45, 16);
        assert_eq!(plan.local, 0..45);
        assert_eq!(plan.global_recent, 0..29);
        let eviction = ledger.plan_eviction(&policy, |_| 8);
        // 45 tokens: 4 sinks, then (41 - 16) / 8 = 3 blocks, 17 recent.
        assert_eq!(
            eviction,
            Eviction {
                to_sinks: 4,
                block_advances: vec![8; 3],
                dropped: 0
            }
        );
        ledger.evict(&eviction);
        assert_eq!((ledger.recent_start(), ledger.recent()), (28, 17));
        let plan = ledger.read(1, 16);
        assert_eq!(plan.local, 30..46);
        assert_eq!(plan.global_recent, 28..30);
    }

    #[test]
    fn shorter_advances_form_more_blocks_that_overlap() {
        // Blocks of 8 moving on by 5: a block forms while 8 tokens lie past
        // the window of 16; 45 tokens leave 41 - 16 = 25 past it.
        let policy = policy(Mode::Qllm, 4, 16, 8);
        let mut ledger = Ledger::default();
        ledger.read(45, 16);
        let eviction = ledger.plan_eviction(&policy, |_| 5);
        // 25, 20, 15, 10 tokens past the window when blocks 1-4 form.
        assert_eq!(eviction.block_advances, vec![5; 4]);
        ledger.evict(&eviction);
        assert_eq!((ledger.blocks(), ledger.blocked()), (4, 20));
        assert_eq!((ledger.recent_start(), ledger.recent()), (24, 21));
    }
}

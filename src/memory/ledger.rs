//! Where every token of a layer's memory is: plain counts, no tensors.
//!
//! Tokens `0..processed` of a sequence are, in order: the sinks
//! (`0..sinks`), then `blocks` memory blocks of `block_size` tokens (or, in
//! `streaming`, `dropped` tokens forgotten), then the recent tokens
//! (`recent_start..processed`), the newest of which form the local window.
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Tokens that become sinks.
    pub to_sinks: usize,
    /// Memory blocks formed from the tokens after them.
    pub blocks: usize,
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
    /// `infllm`) while a whole block lies past the window, or (`streaming`)
    /// everything but the next query's window is dropped.
    pub fn plan_eviction(&self, policy: &Policy) -> Eviction {
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
            Mode::Qllm | Mode::Infllm if recent >= n_local + policy.block_size => {
                plan.blocks = (recent - n_local) / policy.block_size;
            }
            Mode::Streaming if recent >= n_local => plan.dropped = recent + 1 - n_local,
            _ => {}
        }
        plan
    }

    /// Records an eviction.
    pub fn evict(&mut self, plan: &Eviction, block_size: usize) {
        self.sinks += plan.to_sinks;
        self.blocks += plan.blocks;
        self.dropped += plan.dropped;
        self.recent_start += plan.to_sinks + plan.blocks * block_size + plan.dropped;
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
                let eviction = ledger.plan_eviction(&policy);
                ledger.evict(&eviction, block_size);
                prop_assert_eq!(
                    ledger.sinks() + ledger.blocks() * block_size + ledger.dropped() + ledger.recent(),
                    ledger.processed()
                );
                prop_assert!(ledger.sinks() <= n_init);
                // Nothing a future query's window needs is evicted.
                let floor = n_local.min(ledger.processed() - ledger.sinks());
                prop_assert!(ledger.recent() >= floor.saturating_sub(usize::from(mode == Mode::Streaming)));
                if ledger.sinks() == n_init {
                    match mode {
                        Mode::Streaming => prop_assert!(ledger.recent() < n_local),
                        _ => prop_assert!(ledger.recent() < n_local + block_size),
                    }
                    prop_assert!(ledger.plan_eviction(&policy) == Eviction::default());
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
        let eviction = ledger.plan_eviction(&policy);
        // 45 tokens: 4 sinks, then (41 - 16) / 8 = 3 blocks, 17 recent.
        assert_eq!(
            eviction,
            Eviction {
                to_sinks: 4,
                blocks: 3,
                dropped: 0
            }
        );
        ledger.evict(&eviction, 8);
        assert_eq!((ledger.recent_start(), ledger.recent()), (28, 17));
        let plan = ledger.read(1, 16);
        assert_eq!(plan.local, 30..46);
        assert_eq!(plan.global_recent, 28..30);
    }
}

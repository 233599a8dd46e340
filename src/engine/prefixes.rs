//! Kept prefixes: the state of sequences at points a later request may
//! start from (the end of a prompt, the end of an answer, the document
//! before its question), so that a follow-up reads only its new tokens.
//! Bounded by a byte budget, least recently used dropped first.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::{Result, TensorId};

use super::sequences::SeqMemory;
use crate::config::Policy;
use crate::retrieval::LayerVotes;

/// A sequence's state after its first `tokens.len()` tokens, the part a
/// sequence resumed from it takes over.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// The tokens read, in order.
    pub tokens: Vec<u32>,
    pub policy: Arc<Policy>,
    pub memory: SeqMemory,
    /// Per token read, whether it ends a sentence (`sentence` boundaries).
    pub sentence_ends: Vec<bool>,
    pub votes: LayerVotes,
    /// The question the tokens were read with, if any.
    pub question: Option<Vec<u32>>,
}

impl Snapshot {
    /// A copy for a new owner (block slabs shared, see
    /// [`crate::memory::LayerMemory::fork`]).
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            tokens: self.tokens.clone(),
            policy: self.policy.clone(),
            memory: self.memory.fork()?,
            sentence_ends: self.sentence_ends.clone(),
            votes: self.votes.clone(),
            question: self.question.clone(),
        })
    }

    /// Bytes held by this snapshot alone, and the shared allocations it
    /// holds, by identity.
    fn own_and_shared(&self) -> (usize, Vec<(TensorId, usize)>) {
        let shared: Vec<_> = self.memory.shared_allocations().collect();
        let all = self.memory.bytes() + self.tokens.capacity() * 4 + self.sentence_ends.capacity();
        let own = all - shared.iter().map(|(_, b)| b).sum::<usize>();
        (own, shared)
    }
}

#[derive(Debug)]
struct Entry {
    snapshot: Snapshot,
    last_used: u64,
}

/// The kept snapshots and their budget.
#[derive(Debug, Default)]
pub(crate) struct KeptPrefixes {
    entries: Vec<Entry>,
    clock: u64,
}

/// Statistics of the kept prefixes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Snapshots kept.
    pub entries: usize,
    /// Bytes they hold, each shared block slab counted once.
    pub bytes: usize,
}

impl KeptPrefixes {
    /// Keeps `snapshot` (replacing one of the same tokens and policy), then
    /// drops the least recently used until all fit in `budget` bytes.
    /// Returns whether anything was dropped.
    pub fn keep(&mut self, snapshot: Snapshot, budget: usize) -> bool {
        self.entries.retain(|e| {
            e.snapshot.tokens != snapshot.tokens || e.snapshot.policy != snapshot.policy
        });
        self.clock += 1;
        self.entries.push(Entry {
            snapshot,
            last_used: self.clock,
        });
        self.shrink_to(budget)
    }

    /// The longest kept snapshot of `policy` whose tokens begin `prompt` and
    /// leave at least one of its tokens to read, forked for a new sequence.
    pub fn resume(&mut self, prompt: &[u32], policy: &Policy) -> Result<Option<Snapshot>> {
        let best = self
            .entries
            .iter_mut()
            .filter(|e| {
                let tokens = &e.snapshot.tokens;
                *e.snapshot.policy == *policy
                    && tokens.len() < prompt.len()
                    && prompt.starts_with(tokens)
            })
            .max_by_key(|e| e.snapshot.tokens.len());
        let Some(entry) = best else {
            return Ok(None);
        };
        self.clock += 1;
        entry.last_used = self.clock;
        entry.snapshot.fork().map(Some)
    }

    /// Drops the least recently used snapshots until the rest hold at most
    /// `budget` bytes. Returns whether anything was dropped.
    pub fn shrink_to(&mut self, budget: usize) -> bool {
        let mut dropped = false;
        while !self.entries.is_empty() && self.stats().bytes > budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .expect("not empty");
            let entry = self.entries.swap_remove(oldest);
            tracing::debug!(
                "qllm: kept prefix of {} tokens dropped",
                entry.snapshot.tokens.len()
            );
            dropped = true;
        }
        dropped
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn stats(&self) -> PrefixStats {
        let mut seen = HashSet::new();
        let mut bytes = 0;
        for entry in &self.entries {
            let (own, shared) = entry.snapshot.own_and_shared();
            bytes += own;
            for (id, b) in shared {
                if seen.insert(id) {
                    bytes += b;
                }
            }
        }
        PrefixStats {
            entries: self.entries.len(),
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::config::Mode;
    use crate::memory::KvBuffer;

    /// A `dense` snapshot of `tokens`, one layer of 1 KV head of 4 values.
    fn snapshot(tokens: &[u32], policy: &Arc<Policy>) -> Snapshot {
        let mut layer = KvBuffer::default();
        let kv = Tensor::ones(
            (1, 1, tokens.len(), 4),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        layer.append(&kv, &kv).unwrap();
        Snapshot {
            tokens: tokens.to_vec(),
            policy: policy.clone(),
            memory: SeqMemory::Dense(vec![layer]),
            sentence_ends: Vec::new(),
            votes: LayerVotes::default(),
            question: None,
        }
    }

    #[test]
    fn the_longest_kept_prefix_of_the_same_policy_is_resumed_and_the_oldest_dropped_first() {
        let dense = Arc::new(Policy {
            mode: Mode::Dense,
            ..Policy::default()
        });
        let qllm = Arc::new(Policy::default());
        let mut kept = KeptPrefixes::default();
        kept.keep(snapshot(&[1, 2], &dense), usize::MAX);
        kept.keep(snapshot(&[1, 2, 3, 4], &dense), usize::MAX);
        kept.keep(snapshot(&[1, 2, 3, 4, 5, 6], &qllm), usize::MAX);
        kept.keep(snapshot(&[7, 8, 9], &dense), usize::MAX);
        let resumed = |kept: &mut KeptPrefixes, prompt: &[u32], policy: &Policy| {
            kept.resume(prompt, policy).unwrap().map(|s| s.tokens.len())
        };
        // The longest that begins the prompt and leaves a token to read.
        assert_eq!(resumed(&mut kept, &[1, 2, 3, 4, 5, 6, 7], &dense), Some(4));
        assert_eq!(resumed(&mut kept, &[1, 2, 3, 4], &dense), Some(2));
        assert_eq!(resumed(&mut kept, &[1, 2, 3, 4, 5, 6, 7], &qllm), Some(6));
        // An edited history: no kept prefix begins it.
        assert_eq!(resumed(&mut kept, &[1, 9, 3, 4, 5], &dense), None);
        assert_eq!(resumed(&mut kept, &[7, 8], &dense), None);

        // Each snapshot holds its tokens' KV (2 x 4 f32 per token, a
        // buffer of 512 tokens) and its tokens.
        let stats = kept.stats();
        assert_eq!(stats.entries, 4);
        let one = kept.stats().bytes / 4;
        // Least recently used: [7, 8, 9] (kept, never resumed), then
        // [1, 2, 3, 4] (resumed before the other two); a budget for two
        // keeps the two resumed last.
        assert!(kept.shrink_to(one * 2 + 64));
        assert_eq!(kept.stats().entries, 2);
        assert_eq!(resumed(&mut kept, &[7, 8, 9, 10], &dense), None);
        assert_eq!(resumed(&mut kept, &[1, 2, 3, 4, 5, 6, 7], &dense), Some(2));
        assert_eq!(resumed(&mut kept, &[1, 2, 3, 4, 5, 6, 7], &qllm), Some(6));
        // The same tokens and policy again replace the entry.
        kept.keep(snapshot(&[1, 2], &dense), usize::MAX);
        assert_eq!(kept.stats().entries, 2);
        // A budget of 0 keeps nothing.
        kept.keep(snapshot(&[5], &dense), 0);
        assert_eq!(kept.stats(), PrefixStats::default());
    }
}

//! Cross-layer consensus (`consensus` blocks of each layer's `topk`): a
//! layer also attends the blocks the sequence's other layers retrieved most.
//!
//! Blocks sit at the same offsets in every layer, so block `b` of one layer
//! holds the same tokens as block `b` of another. On real text the layers
//! disagree: a fact 12K tokens deep is ranked first by some middle layers
//! and far down by the first and last ones (README, per-layer figures), so a
//! layer's own scores alone lose it in the layers that read it last.
//!
//! Layers run in order within an execution block, so a layer sees the
//! votes of the layers before it at this execution block and of the layers
//! after it at the previous one: one vote from every other layer.

use std::collections::VecDeque;

/// One layer's vote at one execution block: where the block starts, and
/// the blocks it picked with their best place in a KV head's list.
type Vote = (usize, Vec<(usize, usize)>);

/// What each layer retrieved by its own scores at its latest execution
/// blocks (positions ascending).
#[derive(Debug, Default, Clone)]
pub struct LayerVotes {
    layers: Vec<VecDeque<Vote>>,
}

impl LayerVotes {
    /// Forgets every vote (a new prompt).
    pub fn clear(&mut self) {
        self.layers.clear();
    }

    /// Makes room for the votes of `layers` layers.
    pub fn resize(&mut self, layers: usize) {
        self.layers.resize_with(layers, VecDeque::new);
    }

    /// Layers it has room for.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Records that `layer` picked `blocks` by its own scores for the
    /// execution block starting at `position`, each with its best place in
    /// a list (0 = some list's best).
    pub fn record(&mut self, layer: usize, position: usize, blocks: &[(usize, usize)]) {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, VecDeque::new);
        }
        let votes = &mut self.layers[layer];
        if votes.back().is_some_and(|(p, _)| *p >= position) {
            // Re-read from an earlier position: older votes describe another
            // reading of the sequence.
            votes.clear();
        }
        votes.push_back((position, blocks.to_vec()));
        // Every layer reads at most the latest vote of a layer that is
        // behind, and one vote before the slowest layer's position.
        // A layer that has not voted yet may still need every vote.
        let Some(slowest) = self
            .layers
            .iter()
            .map(|v| v.back().map(|(p, _)| *p))
            .min()
            .flatten()
        else {
            return;
        };
        for votes in &mut self.layers {
            while votes.len() > 1 && votes[1].0 <= slowest {
                votes.pop_front();
            }
        }
    }

    /// The blocks of `0..blocks` the other layers voted for, best first, as
    /// `layer` at the execution block starting at `position` sees them: each
    /// other layer's vote at this execution block if it has read it, else at
    /// its latest before it. A vote for a block at place `r` of a list weighs `1 / (1 + r)`
    /// (reciprocal-rank fusion), so a block several layers rank first
    /// outweighs one many layers take as a late pick; ties go to the older
    /// block.
    pub fn ranking(&self, layer: usize, position: usize, blocks: usize) -> Vec<usize> {
        let mut weight = vec![0f32; blocks];
        for (other, votes) in self.layers.iter().enumerate() {
            if other == layer {
                continue;
            }
            let seen = if other < layer {
                votes.iter().rev().find(|(p, _)| *p <= position)
            } else {
                votes.iter().rev().find(|(p, _)| *p < position)
            };
            for &(b, place) in seen.map_or(&[][..], |(_, picks)| picks.as_slice()) {
                if let Some(w) = weight.get_mut(b) {
                    #[allow(clippy::cast_precision_loss)] // a place below `topk`
                    let vote = 1.0 / (1 + place) as f32;
                    *w += vote;
                }
            }
        }
        let mut voted: Vec<usize> = (0..blocks).filter(|&b| weight[b] > 0.0).collect();
        voted.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
        voted
    }
}

/// `topk` blocks per list: the first `consensus` of `ranking` (blocks the
/// other layers voted for), then each list's own best by `own` (with
/// `neighbours`) among the rest; ascending. Every list gets the same
/// consensus blocks, so lists stay of equal length.
pub fn with_consensus(
    own: &[Vec<usize>],
    ranking: &[usize],
    consensus: usize,
    scores: &[Vec<f32>],
    topk: usize,
    neighbours: usize,
) -> Vec<Vec<usize>> {
    let shared: Vec<usize> = ranking.iter().copied().take(consensus).collect();
    if shared.is_empty() {
        return own.to_vec();
    }
    scores
        .iter()
        .map(|row| {
            let mut masked = row.clone();
            for &b in &shared {
                masked[b] = f32::NEG_INFINITY;
            }
            let mut picks = super::top_k_with_neighbours(&masked, topk - shared.len(), neighbours);
            picks.extend(&shared);
            picks.sort_unstable();
            picks.dedup();
            picks
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks at places 0, 1, 2, ...
    fn ranked(blocks: &[usize]) -> Vec<(usize, usize)> {
        blocks
            .iter()
            .copied()
            .enumerate()
            .map(|(r, b)| (b, r))
            .collect()
    }

    #[test]
    fn a_layer_sees_earlier_layers_now_and_later_layers_at_the_previous_block() {
        let mut votes = LayerVotes::default();
        votes.resize(3);
        // Execution block at 0: layers 0..3 vote.
        votes.record(0, 0, &ranked(&[1, 2]));
        votes.record(1, 0, &ranked(&[3, 2]));
        votes.record(2, 0, &ranked(&[3, 4]));
        // Execution block at 8: layer 0 sees layers 1 and 2 at 0. Block 3
        // was first twice (weight 2); blocks 2 and 4 second once (0.5 each).
        assert_eq!(votes.ranking(0, 8, 6), vec![3, 2, 4]);
        votes.record(0, 8, &ranked(&[5]));
        // Layer 1 at 8 sees layer 0 at 8 and layer 2 at 0; the tie between
        // blocks 3 and 5 goes to the older one.
        assert_eq!(votes.ranking(1, 8, 6), vec![3, 5, 4]);
        votes.record(1, 8, &ranked(&[5]));
        // Layer 2 at 8: layers 0 and 1 at 8; never its own votes.
        assert_eq!(votes.ranking(2, 8, 6), vec![5]);
        // Blocks that do not exist yet are not offered.
        assert_eq!(votes.ranking(1, 8, 4), vec![3]);
    }

    #[test]
    fn first_places_outweigh_many_late_picks() {
        let mut votes = LayerVotes::default();
        votes.resize(4);
        // Block 7 is every layer's fourth pick; block 2 two layers' first.
        votes.record(0, 0, &ranked(&[2, 0, 1, 7]));
        votes.record(1, 0, &ranked(&[2, 4, 5, 7]));
        votes.record(2, 0, &ranked(&[6, 8, 9, 7]));
        votes.record(3, 0, &ranked(&[3, 8, 9, 7]));
        assert_eq!(votes.ranking(3, 8, 10)[0], 2);
    }

    #[test]
    fn a_chunk_of_several_execution_blocks_reads_the_matching_votes() {
        // A prefill chunk of three execution blocks: layer 0 reads all three
        // before layer 1 reads the first.
        let mut votes = LayerVotes::default();
        votes.resize(2);
        for (p, b) in [(0, 0), (8, 1), (16, 2)] {
            votes.record(0, p, &ranked(&[b]));
        }
        assert_eq!(votes.ranking(1, 0, 4), vec![0]);
        votes.record(1, 0, &ranked(&[3]));
        assert_eq!(votes.ranking(1, 8, 4), vec![1]);
        votes.record(1, 8, &ranked(&[3]));
        assert_eq!(votes.ranking(1, 16, 4), vec![2]);
        votes.record(1, 16, &ranked(&[3]));
        // Both layers are at 16 now: only the latest votes are kept.
        assert!(votes.layers.iter().all(|v| v.len() == 1));
        // A re-read from the start drops a layer's later votes.
        votes.record(0, 0, &ranked(&[1]));
        assert_eq!(votes.layers[0].len(), 1);
        votes.clear();
        assert!(votes.ranking(0, 8, 4).is_empty());
    }

    #[test]
    fn consensus_blocks_join_every_list_and_the_rest_is_each_lists_own() {
        let scores = vec![vec![0.0, 5.0, 4.0, 0.3, 0.2], vec![3.0, 0.1, 0.0, 2.0, 1.0]];
        let own: Vec<Vec<usize>> = scores
            .iter()
            .map(|s| crate::retrieval::top_k(s, 3))
            .collect();
        // Block 4 is the others' favourite, then 1.
        let picks = with_consensus(&own, &[4, 1, 0], 2, &scores, 3, 0);
        assert_eq!(picks, vec![vec![1, 2, 4], vec![0, 1, 4]]);
        assert!(picks.iter().all(|p| p.len() == 3));
        // Off, or nothing voted: the own picks.
        assert_eq!(with_consensus(&own, &[4, 1], 0, &scores, 3, 0), own);
        assert_eq!(with_consensus(&own, &[], 2, &scores, 3, 0), own);
    }
}

//! Picking blocks from their scores.

/// Indices of the `k` highest scores, ascending (ties go to the older block).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    if k < order.len() {
        order.select_nth_unstable_by(k, |&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

/// `k` blocks: the best-scoring ones, each followed by its next
/// `neighbours` blocks (those that exist), in score order until `k` are
/// chosen; ascending. With `neighbours = 0`, [`top_k`].
pub fn top_k_with_neighbours(scores: &[f32], k: usize, neighbours: usize) -> Vec<usize> {
    if neighbours == 0 || k >= scores.len() {
        return top_k(scores, k);
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut chosen = std::collections::BTreeSet::new();
    for hit in order {
        for b in hit..=(hit + neighbours).min(scores.len() - 1) {
            if chosen.len() == k {
                return chosen.into_iter().collect();
            }
            chosen.insert(b);
        }
    }
    chosen.into_iter().collect()
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn top_k_picks_the_highest_scores_in_block_order() {
        assert_eq!(top_k(&[0.1, 3.0, -2.0, 2.5, 2.5], 3), vec![1, 3, 4]);
        assert_eq!(top_k(&[0.1, 3.0], 5), vec![0, 1]);
        assert_eq!(top_k(&[1.0, 1.0, 1.0], 1), vec![0]);
        assert!(top_k(&[1.0], 0).is_empty());
    }

    #[test]
    fn neighbours_follow_their_hits_within_the_budget() {
        let scores = [0.0, 5.0, 0.1, 0.2, 4.0, 0.3];
        assert_eq!(top_k_with_neighbours(&scores, 4, 1), vec![1, 2, 4, 5]);
        // The budget runs out after the best hit and its neighbour.
        assert_eq!(top_k_with_neighbours(&scores, 2, 1), vec![1, 2]);
        assert_eq!(top_k_with_neighbours(&scores, 3, 1), vec![1, 2, 4]);
        // The last block has no successor; a neighbour already chosen is
        // not counted twice.
        assert_eq!(
            top_k_with_neighbours(&[1.0, 2.0, 3.0, 0.0], 3, 1),
            vec![1, 2, 3]
        );
        assert_eq!(top_k_with_neighbours(&scores, 2, 0), top_k(&scores, 2));
        assert_eq!(
            top_k_with_neighbours(&scores, 9, 1),
            (0..6).collect::<Vec<_>>()
        );
    }
}

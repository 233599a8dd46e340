//! Representative keys: per block and head, the mean key of the tokens that
//! received the most local attention (the paper's `repr_topk`); the same
//! rule picks the question's rows.

/// For every query head `h`, the rows of the `top` tokens that received the
/// most attention from head `h` (`scores`: `len` tokens x `heads`), most
/// attended first. `rows` is `(heads / group, len, d)`: head `h` reads row
/// group `h / group` (keys are shared by a group of query heads, queries are
/// not). Returns `(heads, min(top, len), d)` flattened.
pub(crate) fn most_attended_rows(
    rows: &[f32],
    group: usize,
    len: usize,
    d: usize,
    scores: &[f32],
    heads: usize,
    top: usize,
) -> Vec<f32> {
    let top = top.min(len);
    let mut out = Vec::with_capacity(heads * top * d);
    let mut order: Vec<usize> = (0..len).collect();
    for h in 0..heads {
        order.sort_by(|&a, &b| scores[b * heads + h].total_cmp(&scores[a * heads + h]));
        let base = (h / group) * len * d;
        for &t in &order[..top] {
            out.extend_from_slice(&rows[base + t * d..base + (t + 1) * d]);
        }
    }
    out
}

/// Per head, the mean of its rows: `rows` is `(heads, r, d)` flattened (as
/// [`most_attended_rows`] returns them); zeros where `r` is 0. Returns
/// `heads * d` values.
pub(crate) fn head_means(rows: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let per_head = rows.len() / (heads * d);
    if per_head == 0 {
        return vec![0f32; heads * d];
    }
    #[allow(clippy::cast_precision_loss)] // at most a block's tokens
    let inv = 1.0 / per_head as f32;
    rows.chunks_exact(per_head * d)
        .flat_map(|head| {
            let mut mean = vec![0f32; d];
            for row in head.chunks_exact(d) {
                mean.iter_mut().zip(row).for_each(|(m, x)| *m += x * inv);
            }
            mean
        })
        .collect()
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn representatives_average_the_most_attended_tokens_per_head() {
        // 2 query heads sharing 1 key head, 3 tokens of dim 2.
        let keys = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0];
        // Head 0 attended tokens 0 and 2 most, head 1 tokens 1 and 2.
        let scores = [0.9, 0.1, 0.2, 0.8, 0.5, 0.5];
        let repr = head_means(&most_attended_rows(&keys, 2, 3, 2, &scores, 2, 2), 2, 2);
        assert_eq!(repr, vec![3.0, 2.5, 2.5, 3.0]);
    }
}

//! f32 dot products for the attention kernels and block scoring: lanes of
//! independent sums reduced as trees, fused multiply-adds where the target
//! has them, and many rows against many keys in vector registers.

/// `a · b` over their common length.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums (one vector register), reduced as a tree: a
    // left-to-right sum of the lanes is seven dependent adds.
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (a8, a_rest) = a.split_at(a.len() / LANES * LANES);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(LANES).zip(b8.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] = multiply_add(x[i], y[i], acc[i]);
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    lane_sum(acc) + tail
}

/// Every row against every key: `out[r * n + t] = rows[r] · keys[t]`, for
/// `m` rows and `n` keys of `d` values each (`rows` is `m * d` long, `keys`
/// `n * d`, `out` `m * n`). With AVX2 and FMA, eight keys at a time against
/// each row, their eight sums reduced together; elsewhere a [`dot`] per
/// pair ([`row_key_logits_slow`]).
pub fn row_key_logits(keys: &[f32], rows: &[f32], d: usize, out: &mut [f32]) {
    assert!(d > 0 && keys.len().is_multiple_of(d) && rows.len().is_multiple_of(d));
    assert_eq!(out.len(), (keys.len() / d) * (rows.len() / d));
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for,
        // and the lengths were checked above.
        unsafe { avx2::row_key_logits(keys, rows, d, out) };
        return;
    }
    row_key_logits_slow(keys, rows, d, out);
}

/// [`row_key_logits`] as one [`dot`] per row and key.
pub fn row_key_logits_slow(keys: &[f32], rows: &[f32], d: usize, out: &mut [f32]) {
    let n = keys.len() / d;
    for (r, row) in rows.chunks_exact(d).enumerate() {
        for (t, key) in keys.chunks_exact(d).enumerate() {
            out[r * n + t] = dot(row, key);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_hadd_ps, _mm256_loadu_ps,
        _mm256_permute2f128_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    /// See [`super::row_key_logits`]; `d` is a multiple of 8 and the lengths
    /// agree.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_key_logits(keys: &[f32], rows: &[f32], d: usize, out: &mut [f32]) {
        const KEYS: usize = 8;
        let n = keys.len() / d;
        let whole = n / KEYS * KEYS;
        for (r, row) in rows.chunks_exact(d).enumerate() {
            let out = &mut out[r * n..(r + 1) * n];
            for t in (0..whole).step_by(KEYS) {
                let group = &keys[t * d..(t + KEYS) * d];
                let mut acc = [_mm256_setzero_ps(); KEYS];
                for c in (0..d).step_by(8) {
                    // SAFETY: `c + 8 <= d`, and each key of the group and
                    // the row hold `d` values.
                    let q = _mm256_loadu_ps(row.as_ptr().add(c));
                    for (k, a) in acc.iter_mut().enumerate() {
                        let key = _mm256_loadu_ps(group.as_ptr().add(k * d + c));
                        *a = _mm256_fmadd_ps(key, q, *a);
                    }
                }
                // SAFETY: `t + 8 <= n`.
                _mm256_storeu_ps(out.as_mut_ptr().add(t), sum_lanes(&acc));
            }
            for t in whole..n {
                out[t] = super::dot(row, &keys[t * d..(t + 1) * d]);
            }
        }
    }

    /// The eight sums of eight vectors' lanes, as one vector: three rounds of
    /// pairwise adds instead of a horizontal sum per vector.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_lanes(acc: &[__m256; 8]) -> __m256 {
        // Lanes `[a01 a23 b01 b23 | a45 a67 b45 b67]` for `a = acc[0]`, ...
        let ab = _mm256_hadd_ps(acc[0], acc[1]);
        let cd = _mm256_hadd_ps(acc[2], acc[3]);
        let ef = _mm256_hadd_ps(acc[4], acc[5]);
        let gh = _mm256_hadd_ps(acc[6], acc[7]);
        // `[a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7]`, likewise `e`-`h`.
        let abcd = _mm256_hadd_ps(ab, cd);
        let efgh = _mm256_hadd_ps(ef, gh);
        let low = _mm256_permute2f128_ps(abcd, efgh, 0x20);
        let high = _mm256_permute2f128_ps(abcd, efgh, 0x31);
        _mm256_add_ps(low, high)
    }
}

/// `a * b + c`, fused where the target has FMA (one instruction), else a
/// multiply and an add (`f32::mul_add` without FMA is a library call).
#[inline(always)]
fn multiply_add(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// The sum of eight lanes as a tree of vector adds.
#[inline(always)]
pub(crate) fn lane_sum(acc: [f32; 8]) -> f32 {
    let quarter = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (quarter[0] + quarter[2]) + (quarter[1] + quarter[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_dot_product_is_the_plain_one_at_every_length() {
        // Lengths over several multiples of the 8 lanes, so the tail and the
        // lanes both count.
        for n in 0..70 {
            #[allow(clippy::cast_precision_loss)]
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
            #[allow(clippy::cast_precision_loss)]
            let b: Vec<f32> = (0..n).map(|i| ((i * 3 % 13) as f32 - 6.0) / 8.0).collect();
            let plain: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let got = f64::from(dot(&a, &b));
            assert!(
                (got - plain).abs() < 1e-5,
                "length {n}: {got} against {plain}"
            );
        }
    }

    #[test]
    fn the_row_key_logits_are_the_dot_products() {
        // Head sizes with and without the vector kernel (a multiple of 8 or
        // not), key counts with and without a remainder of 8.
        for (d, n, m) in [
            (64, 64, 3),
            (64, 13, 1),
            (128, 40, 2),
            (12, 9, 2),
            (8, 7, 4),
        ] {
            #[allow(clippy::cast_precision_loss)]
            let value = |i: usize, k: usize| ((i * k % 17) as f32 - 8.0) / 9.0;
            let keys: Vec<f32> = (0..n * d).map(|i| value(i, 7)).collect();
            let rows: Vec<f32> = (0..m * d).map(|i| value(i, 5)).collect();
            let mut fast = vec![0f32; m * n];
            let mut slow = vec![0f32; m * n];
            row_key_logits(&keys, &rows, d, &mut fast);
            row_key_logits_slow(&keys, &rows, d, &mut slow);
            for r in 0..m {
                for t in 0..n {
                    let plain: f32 = (0..d).map(|i| rows[r * d + i] * keys[t * d + i]).sum();
                    let (got, want) = (fast[r * n + t], slow[r * n + t]);
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "d {d}: {got} {want}"
                    );
                    assert!((want - plain).abs() <= 1e-4 * plain.abs().max(1.0));
                }
            }
        }
    }

    #[test]
    fn the_lane_sum_adds_every_lane() {
        let lanes: [f32; 8] = std::array::from_fn(|i| 2f32.powi(i32::try_from(i).unwrap()));
        assert_eq!(lane_sum(lanes), 255.0);
    }
}

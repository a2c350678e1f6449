//! Exact proportional splits in integers.
//!
//! `split(total, weights)` gives each weight `floor(total · wᵢ / W)` and hands the
//! units left over (fewer than the number of weights) one each to the largest
//! remainders `total · wᵢ mod W`, ties going to the earlier entry. Callers order
//! entries by account name, so the rule is deterministic and the parts always sum to
//! `total` exactly. Products are computed in 256 bits, so no weight or amount overflows.

const LOW: u128 = u64::MAX as u128;

/// `a · b` as a 256-bit number `(high, low)`.
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    let (a1, a0) = (a >> 64, a & LOW);
    let (b1, b0) = (b >> 64, b & LOW);
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 64) + (p01 & LOW) + (p10 & LOW);
    let low = (p00 & LOW) | (mid << 64);
    let high = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    (high, low)
}

/// `(high·2^128 + low) / d` and the remainder; requires `high < d` so the quotient fits.
fn div_wide(high: u128, low: u128, d: u128) -> (u128, u128) {
    assert!(d > 0 && high < d, "div_wide: quotient overflows");
    let mut rem = high;
    let mut quo = 0u128;
    for i in (0..128).rev() {
        let carry = rem >> 127;
        rem = (rem << 1) | ((low >> i) & 1);
        quo <<= 1;
        if carry == 1 || rem >= d {
            rem = rem.wrapping_sub(d);
            quo |= 1;
        }
    }
    (quo, rem)
}

/// `floor(a · b / d)` and `a · b mod d`, exactly.
pub fn mul_div(a: u128, b: u128, d: u128) -> (u128, u128) {
    let (high, low) = mul_wide(a, b);
    div_wide(high, low, d)
}

/// Splits `total` in proportion to `weights` (largest-remainder rule, see module docs).
/// Returns `None` when every weight is zero.
pub fn split(total: u128, weights: &[u128]) -> Option<Vec<u128>> {
    let sum = weights
        .iter()
        .try_fold(0u128, |acc, &w| acc.checked_add(w))
        .expect("weight sum overflows u128");
    if sum == 0 {
        return None;
    }
    let mut parts = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        let (q, r) = mul_div(total, w, sum);
        parts.push(q);
        remainders.push((r, i));
    }
    let given: u128 = parts.iter().sum();
    let left = total - given;
    assert!(
        left < weights.len() as u128 + 1,
        "largest remainder left {left} units"
    );
    // Largest remainder first; on equal remainders, the earlier entry first.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(left as usize) {
        parts[i] += 1;
    }
    debug_assert_eq!(parts.iter().sum::<u128>(), total);
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_arithmetic_matches_small_cases_and_extremes() {
        assert_eq!(mul_div(10, 7, 3), (23, 1));
        assert_eq!(mul_div(u128::MAX, u128::MAX, u128::MAX), (u128::MAX, 0));
        assert_eq!(mul_div(u128::MAX, 2, 4), (u128::MAX / 2, 2));
        let mut x = 0x1234_5678_9abc_def0_u128;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (a, b, d) = (x >> 70, x & 0xffff_ffff, (x >> 20 & 0xffff_ffff_ffff) + 1);
            assert_eq!(mul_div(a, b, d), (a * b / d, a * b % d));
        }
    }

    #[test]
    fn parts_sum_exactly_and_remainders_go_to_the_largest() {
        assert_eq!(split(10, &[1, 1, 1]).unwrap(), vec![4, 3, 3]);
        assert_eq!(split(100, &[1, 2]).unwrap(), vec![33, 67]);
        assert_eq!(split(5, &[0, 3]).unwrap(), vec![0, 5]);
        assert_eq!(split(7, &[0, 0]), None);
        let w: Vec<u128> = (1..=1000).map(|i| i * i % 97 + 1).collect();
        let p = split(1_000_000_007, &w).unwrap();
        assert_eq!(p.iter().sum::<u128>(), 1_000_000_007);
    }
}

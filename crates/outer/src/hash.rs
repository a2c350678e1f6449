//! The hash of θ: what nodes compare after every outer step to agree they hold the
//! same parameters.

/// blake3 of θ's little-endian f32 bytes: what nodes compare after every outer step.
pub fn theta_digest(theta: &[f32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    // Converted a chunk at a time so a large θ never needs a second full-size copy.
    for chunk in theta.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        h.update(&bytes);
    }
    *h.finalize().as_bytes()
}

/// [`theta_digest`] as lowercase hex.
pub fn theta_hash(theta: &[f32]) -> String {
    blake3::Hash::from(theta_digest(theta)).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_sees_one_ulp() {
        let theta = vec![0.8670001f32, -2.4];
        assert_eq!(theta_hash(&theta), theta_hash(&theta.clone()));
        assert_ne!(
            theta_hash(&theta),
            theta_hash(&[theta[0], f32::from_bits(theta[1].to_bits() + 1)])
        );
    }

    #[test]
    fn hash_is_blake3_of_the_little_endian_bytes_across_chunks() {
        // Longer than one conversion chunk, so the chunking must not show.
        let theta: Vec<f32> = (0..(1 << 16) + 3).map(|i| i as f32 * 0.5).collect();
        let bytes: Vec<u8> = theta.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            theta_hash(&theta),
            blake3::hash(&bytes).to_hex().to_string()
        );
        assert_eq!(
            theta_hash(&[]),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }
}

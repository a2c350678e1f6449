//! The `none` codec: every element as a raw little-endian f32. Lossless, so the
//! residual is left at zero.

use super::f32_at;

/// Payload bytes for `n` elements.
pub(super) fn payload_bytes(n: usize) -> usize {
    4 * n
}

pub(super) fn encode(residual: &mut [f32], out: &mut Vec<u8>) {
    for v in residual.iter_mut() {
        out.extend_from_slice(&v.to_le_bytes());
        *v = 0.0;
    }
}

/// `payload` has exactly `4 · out.len()` bytes; `decode` checked that.
pub(super) fn decode(payload: &[u8], out: &mut [f32]) {
    for (i, v) in out.iter_mut().enumerate() {
        *v = f32_at(payload, 4 * i);
    }
}

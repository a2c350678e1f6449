//! The `int8` codec: per chunk, an absmax scale (f32) and one signed byte per element,
//! rounded to the nearest multiple of the scale.

use super::{f32_at, CodecError};

/// Payload bytes for `n` elements: one scale per chunk and one byte per element.
pub(super) fn payload_bytes(n: usize, chunk: u32) -> usize {
    4 * n.div_ceil(chunk as usize) + n
}

pub(super) fn encode(residual: &mut [f32], chunk: u32, out: &mut Vec<u8>) {
    for c in residual.chunks_mut(chunk as usize) {
        let max = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
        out.extend_from_slice(&scale.to_le_bytes());
        for v in c.iter_mut() {
            let q = if scale > 0.0 {
                (*v / scale).round().clamp(-127.0, 127.0)
            } else {
                0.0
            };
            out.push(q as i8 as u8);
            *v -= q * scale;
        }
    }
}

/// `payload` has exactly [`payload_bytes`] bytes; `decode` checked that.
pub(super) fn decode(payload: &[u8], out: &mut [f32], chunk: u32) -> Result<(), CodecError> {
    let mut o = 0;
    for (ci, c) in out.chunks_mut(chunk as usize).enumerate() {
        let scale = f32_at(payload, o);
        // A negative scale only flips signs, which a sender could do with the bytes
        // anyway; a non-finite one would poison θ.
        if !scale.is_finite() {
            return Err(CodecError::Scale { chunk: ci });
        }
        o += 4;
        for v in c.iter_mut() {
            *v = payload[o] as i8 as f32 * scale;
            o += 1;
        }
    }
    Ok(())
}

//! What a quote's 64 bytes of report_data commit to, so that a quote cannot be
//! replayed for another node key, HPKE key, run or key-server session.
//!
//! Layout (all fixed-size fields first, the one variable field last and
//! length-prefixed, so no two inputs encode alike):
//!
//! ```text
//! report_data = SHA-512(
//!     "tessera-attest-v1\0"     18 bytes, the tag
//!     node_key                   32 bytes, the node's ed25519 public key
//!     hpke_key                   32 bytes, the ephemeral X25519 public key the secrets are sealed to
//!     nonce                      32 bytes, fresh from the key server, used once
//!     len(run_id)                 2 bytes, u16 little-endian
//!     run_id                     len bytes, UTF-8
//! )                              = 64 bytes, the whole report_data field
//! ```
//!
//! TDX and SNP both carry exactly 64 bytes of report_data, so the hash fills it.

use sha2::Digest;

pub const BINDING_TAG: &[u8; 18] = b"tessera-attest-v1\0";

/// The report_data a node puts into its quote for this request.
pub fn report_data(
    node_key: &[u8; 32],
    hpke_key: &[u8; 32],
    nonce: &[u8; 32],
    run_id: &str,
) -> [u8; 64] {
    let run = run_id.as_bytes();
    let len = u16::try_from(run.len()).unwrap_or(u16::MAX);
    let mut h = sha2::Sha512::new();
    h.update(BINDING_TAG);
    h.update(node_key);
    h.update(hpke_key);
    h.update(nonce);
    h.update(len.to_le_bytes());
    h.update(&run[..len as usize]);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_binding() {
        let base = report_data(&[1; 32], &[2; 32], &[3; 32], "run");
        assert_ne!(base, report_data(&[9; 32], &[2; 32], &[3; 32], "run"));
        assert_ne!(base, report_data(&[1; 32], &[9; 32], &[3; 32], "run"));
        assert_ne!(base, report_data(&[1; 32], &[2; 32], &[9; 32], "run"));
        assert_ne!(base, report_data(&[1; 32], &[2; 32], &[3; 32], "run2"));
        assert_eq!(base, report_data(&[1; 32], &[2; 32], &[3; 32], "run"));
    }
}

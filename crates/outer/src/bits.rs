//! Least-significant-bit-first bit packing and Rice coding, for top-k positions.
//!
//! The writer only ever sees values the encoder produced, so it trusts them; the
//! reader sees untrusted bytes, so every read can fail and a Rice quotient is bounded
//! by the caller.

/// Least-significant-bit-first bit packing.
pub(crate) struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    used: u32,
}

impl BitWriter {
    pub(crate) fn new() -> BitWriter {
        BitWriter {
            out: Vec::new(),
            acc: 0,
            used: 0,
        }
    }

    /// Appends the low `bits` bits of `value` (at most 32).
    pub(crate) fn put(&mut self, value: u64, bits: u32) {
        debug_assert!(bits <= 32);
        self.acc |= (value & ((1u64 << bits) - 1)) << self.used;
        self.used += bits;
        while self.used >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.used -= 8;
        }
    }

    /// Appends `value` Rice-coded with parameter `r`: the quotient `value >> r` in
    /// unary (ones closed by a zero), then the low `r` bits.
    pub(crate) fn rice(&mut self, value: u64, r: u32) {
        let mut q = value >> r;
        // `put` takes at most 32 bits at a time, so a long unary run goes in pieces.
        while q >= 32 {
            self.put(u64::from(u32::MAX), 32);
            q -= 32;
        }
        self.put((1u64 << q) - 1, q as u32);
        self.put(0, 1);
        self.put(value, r);
    }

    /// The packed bytes, the last one padded with zero bits.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        if self.used > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Reads what a [`BitWriter`] wrote; `None` or `Err` when the bytes run out.
pub(crate) struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> BitReader<'a> {
        BitReader { bytes, pos: 0 }
    }

    pub(crate) fn bit(&mut self) -> Option<u64> {
        let b = *self.bytes.get(self.pos / 8)?;
        let v = (b >> (self.pos % 8)) & 1;
        self.pos += 1;
        Some(u64::from(v))
    }

    pub(crate) fn take(&mut self, bits: u32) -> Option<u64> {
        let mut v = 0;
        for i in 0..bits {
            v |= self.bit()? << i;
        }
        Some(v)
    }

    /// A Rice-coded value whose quotient may not exceed `max_q`.
    pub(crate) fn rice(&mut self, r: u32, max_q: u64) -> Result<u64, ()> {
        let mut q = 0u64;
        loop {
            match self.bit() {
                Some(1) if q < max_q => q += 1,
                Some(0) => break,
                _ => return Err(()),
            }
        }
        Ok((q << r) | self.take(r).ok_or(())?)
    }

    /// Whole bytes read so far (a partly read byte counts).
    pub(crate) fn bytes_used(&self) -> usize {
        self.pos.div_ceil(8)
    }

    /// All the bytes the reader was given.
    pub(crate) fn bytes_len(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_rice_codes_round_trip() {
        // Quotients of 0, 31, 32 and 100 cover the unary run written in 32-bit pieces.
        let values = [0u64, 1, 5, 31 << 3, 32 << 3, (100 << 3) | 7, 12345];
        let mut w = BitWriter::new();
        w.put(0b101, 3);
        for &v in &values {
            w.rice(v, 3);
        }
        w.put(u64::from(u32::MAX), 32);
        let bytes = w.finish();
        let mut r = BitReader::new(&bytes);
        assert_eq!(r.take(3), Some(0b101));
        for &v in &values {
            assert_eq!(r.rice(3, u64::MAX), Ok(v));
        }
        assert_eq!(r.take(32), Some(u64::from(u32::MAX)));
        assert_eq!(r.bytes_used(), bytes.len());
        // Only padding is left, then nothing.
        while r.bit().is_some() {}
        assert_eq!(r.take(1), None);
    }

    #[test]
    fn rice_refuses_a_quotient_past_its_bound_or_a_stream_that_ends() {
        let mut w = BitWriter::new();
        w.rice(10 << 2, 2);
        let bytes = w.finish();
        assert_eq!(BitReader::new(&bytes).rice(2, 9), Err(()));
        assert_eq!(BitReader::new(&bytes).rice(2, 10), Ok(10 << 2));
        assert_eq!(BitReader::new(&[0xff]).rice(0, u64::MAX), Err(()));
    }
}

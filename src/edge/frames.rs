//! The length prefixes of gRPC messages in body bytes: each message is a flag byte, a
//! 4-byte big-endian length, then the message, and HTTP frames split and join
//! messages freely. Counts the messages a response sends, and shows the sizes a
//! request declares before anything decodes them.

#[derive(Default)]
pub struct FramePrefixes {
    /// Bytes of the current message still to come.
    remaining: u64,
    /// Prefix bytes of the next message seen so far.
    prefix: [u8; 5],
    have: usize,
}

impl FramePrefixes {
    /// Reads `data`, calling `each` with the declared length of every message whose
    /// prefix completes in it; returns how many did.
    pub fn feed(&mut self, mut data: &[u8], mut each: impl FnMut(u64)) -> u64 {
        let mut complete = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining as usize).min(data.len());
                self.remaining -= take as u64;
                data = &data[take..];
                continue;
            }
            let take = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                self.have = 0;
                complete += 1;
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                each(self.remaining);
            }
        }
        complete
    }
}

#[cfg(test)]
mod tests {
    use super::FramePrefixes;

    #[test]
    fn messages_are_seen_across_and_within_frames() {
        let message = |len: u32| {
            let mut m = vec![0u8];
            m.extend_from_slice(&len.to_be_bytes());
            m.extend(std::iter::repeat_n(7u8, len as usize));
            m
        };
        let mut all = Vec::new();
        for len in [3, 0, 10, 1] {
            all.extend(message(len));
        }
        // One frame with all four; then the same bytes one at a time; then in two.
        let mut lengths = Vec::new();
        assert_eq!(FramePrefixes::default().feed(&all, |l| lengths.push(l)), 4);
        assert_eq!(lengths, [3, 0, 10, 1]);
        let mut c = FramePrefixes::default();
        assert_eq!(all.iter().map(|b| c.feed(&[*b], |_| {})).sum::<u64>(), 4);
        let mut c = FramePrefixes::default();
        let (a, b) = all.split_at(7);
        assert_eq!(c.feed(a, |_| {}) + c.feed(b, |_| {}), 4);
    }
}

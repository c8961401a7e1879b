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

/// [`FramePrefixes`] under grpc-web-text's base64, which a client may send in chunks
/// that each end padded: every complete group of four characters is decoded on its
/// own and its bytes fed on. Characters that are not base64 are left for tonic-web to
/// refuse.
#[derive(Default)]
pub struct TextFramePrefixes {
    quad: [u8; 4],
    have: usize,
    frames: FramePrefixes,
}

impl TextFramePrefixes {
    pub fn feed(&mut self, data: &[u8], mut each: impl FnMut(u64)) -> u64 {
        use base64::Engine;
        let mut complete = 0;
        for &c in data {
            if c.is_ascii_whitespace() {
                continue;
            }
            self.quad[self.have] = c;
            self.have += 1;
            if self.have == 4 {
                self.have = 0;
                let mut bytes = [0u8; 3];
                if let Ok(n) =
                    base64::engine::general_purpose::STANDARD.decode_slice(self.quad, &mut bytes)
                {
                    complete += self.frames.feed(&bytes[..n], &mut each);
                }
            }
        }
        complete
    }
}

/// The `grpc-status` in a grpc-web response chunk that is its trailers frame (flag
/// 0x80, length, `name:value` lines), under base64 for grpc-web-text. tonic-web sends
/// the trailers as a data chunk of their own, so a chunk that is not one whole
/// trailers frame (a message, or a piece of one) answers `None`.
pub fn grpc_web_status(chunk: &[u8], text: bool) -> Option<i32> {
    use base64::Engine;
    let decoded;
    let frame = if text {
        if chunk.first() != Some(&b'g') {
            // 0x80 as the first of three bytes is base64 `g…`: anything else is a message.
            return None;
        }
        decoded = base64::engine::general_purpose::STANDARD
            .decode(chunk)
            .ok()?;
        &decoded[..]
    } else {
        chunk
    };
    let (&flag, rest) = frame.split_first()?;
    let (len, lines) = rest.split_first_chunk::<4>()?;
    if flag != 0x80 || u32::from_be_bytes(*len) as usize != lines.len() {
        return None;
    }
    std::str::from_utf8(lines)
        .ok()?
        .split("\r\n")
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("grpc-status")
                .then(|| value.trim().parse().ok())?
        })
}

#[cfg(test)]
mod tests {
    use super::{FramePrefixes, TextFramePrefixes, grpc_web_status};

    #[test]
    fn grpc_web_trailers_give_their_status_and_messages_give_none() {
        let trailers = b"grpc-status:5\r\ngrpc-message:not%20found\r\n";
        let mut frame = vec![0x80];
        frame.extend_from_slice(&(trailers.len() as u32).to_be_bytes());
        frame.extend_from_slice(trailers);
        assert_eq!(grpc_web_status(&frame, false), Some(5));
        use base64::Engine;
        let text = base64::engine::general_purpose::STANDARD.encode(&frame);
        assert_eq!(grpc_web_status(text.as_bytes(), true), Some(5));
        // A message, a truncated trailers frame, and trailers without a status.
        assert_eq!(grpc_web_status(&[0, 0, 0, 0, 1, 7], false), None);
        assert_eq!(grpc_web_status(&frame[..frame.len() - 3], false), None);
        let mut bare = vec![0x80, 0, 0, 0, 4];
        bare.extend_from_slice(b"a:b\n");
        assert_eq!(grpc_web_status(&bare, false), None);
    }

    #[test]
    fn text_frames_are_read_through_base64_in_padded_chunks() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let first = [0u8, 0, 0, 0, 2, 9, 9];
        let second = [0u8, 0, 1, 0, 0];
        // Two chunks, each padded (7 bytes: one `=`), then split mid-quad.
        let text = format!("{}{}", b64.encode(first), b64.encode(second));
        let mut lengths = Vec::new();
        let mut c = TextFramePrefixes::default();
        let (a, b) = text.split_at(6);
        let n =
            c.feed(a.as_bytes(), |l| lengths.push(l)) + c.feed(b.as_bytes(), |l| lengths.push(l));
        assert_eq!(n, 2);
        assert_eq!(lengths, [2, 65536]);
    }

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

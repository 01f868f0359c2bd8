//! Turning a container's output bytes into text.

/// Turns chunks of a stream into text without splitting UTF-8 characters (a character
/// cut between two reads is held back until the rest arrives; invalid bytes become
/// U+FFFD), and keeps the stream's last bytes to explain a failure.
#[derive(Debug, Default)]
pub struct LogDecoder {
    pending: Vec<u8>,
    tail: Vec<u8>,
    tail_max: usize,
}

impl LogDecoder {
    /// A decoder that keeps the last `tail_max` bytes seen (0: none).
    pub fn new(tail_max: usize) -> Self {
        LogDecoder { pending: Vec::new(), tail: Vec::new(), tail_max }
    }

    /// The text of `chunk` (with what was held back before it), up to its last whole
    /// character.
    pub fn push(&mut self, chunk: &[u8]) -> String {
        if self.tail_max > 0 {
            self.tail.extend_from_slice(chunk);
            if self.tail.len() > self.tail_max {
                let cut = self.tail.len() - self.tail_max;
                self.tail.drain(..cut);
            }
        }
        self.pending.extend_from_slice(chunk);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }

    /// The last bytes seen, as text.
    pub fn tail_text(&self) -> String {
        String::from_utf8_lossy(&self.tail).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_characters_whole() {
        let mut d = LogDecoder::new(4096);
        let s = "héllo".as_bytes();
        assert_eq!(d.push(&s[..2]), "h");
        assert_eq!(d.push(&s[2..]), "éllo");
        assert_eq!(d.tail_text(), "héllo");
    }

    #[test]
    fn keeps_only_the_tail_asked_for() {
        let mut d = LogDecoder::new(3);
        assert_eq!(d.push(b"abcdef"), "abcdef");
        assert_eq!(d.tail_text(), "def");
        let mut d = LogDecoder::new(0);
        assert_eq!(d.push(b"abc"), "abc");
        assert_eq!(d.tail_text(), "");
    }

    #[test]
    fn invalid_bytes_are_replaced() {
        let mut d = LogDecoder::new(0);
        assert_eq!(d.push(b"a\xffb"), "a\u{fffd}b");
    }
}

//! Cutting long output to a head and a tail, with one marker that states exactly how many
//! bytes were cut — however many times the text was cut on its way to the agent.

/// The marker put where bytes were cut.
pub fn marker(bytes: usize) -> String {
    format!("\n[... {bytes} bytes of output truncated ...]\n")
}

/// Keeps the first and last `cap / 2` bytes of a stream and counts the rest.
pub struct HeadTail {
    cap: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: usize,
}

impl HeadTail {
    pub fn new(cap: usize) -> Self {
        Self { cap: cap.max(2), head: vec![], tail: Default::default(), dropped: 0 }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        let half = self.cap / 2;
        let take = data.len().min(half.saturating_sub(self.head.len()));
        self.head.extend_from_slice(&data[..take]);
        data = &data[take..];
        self.tail.extend(data);
        let over = self.tail.len().saturating_sub(self.cap - half);
        self.tail.drain(..over);
        self.dropped += over;
    }

    /// The text (head, marker, tail when something was cut) and the bytes cut.
    pub fn finish(self) -> (String, usize) {
        let mut bytes = self.head;
        if self.dropped == 0 {
            bytes.extend(self.tail);
            return (String::from_utf8_lossy(&bytes).into_owned(), 0);
        }
        let head = String::from_utf8_lossy(&bytes).into_owned();
        let tail = String::from_utf8_lossy(&self.tail.into_iter().collect::<Vec<_>>()).into_owned();
        (format!("{head}{}{tail}", marker(self.dropped)), self.dropped)
    }
}

/// The head and the tail of `text` around its one marker for `dropped` bytes (`text` and ""
/// when nothing was dropped or the marker is not found).
pub fn split_at_marker(text: &str, dropped: usize) -> (&str, &str) {
    if dropped == 0 {
        return (text, "");
    }
    match text.find(&marker(dropped)) {
        Some(i) => (&text[..i], &text[i + marker(dropped).len()..]),
        None => (text, ""),
    }
}

/// `head` and `tail` with `dropped` bytes already cut between them, in at most `max_chars`
/// characters: the first and last `max_chars / 2` characters, and one marker counting every
/// byte cut (before and here) when any was.
pub fn clip(head: &str, tail: &str, dropped: usize, max_chars: usize) -> String {
    let half = max_chars / 2;
    if dropped == 0 && head.chars().count() + tail.chars().count() <= max_chars {
        return format!("{head}{tail}");
    }
    let original = head.len() + tail.len() + dropped;
    let (head, tail) = if dropped == 0 && tail.is_empty() {
        // One text: split in the middle, then cut like a head and a tail.
        let mid = head.char_indices().nth(head.chars().count() / 2).map_or(head.len(), |(i, _)| i);
        head.split_at(mid)
    } else {
        (head, tail)
    };
    let h_end = head.char_indices().nth(half).map_or(head.len(), |(i, _)| i);
    let t_chars = tail.chars().count();
    let t_start = tail.char_indices().nth(t_chars.saturating_sub(half)).map_or(tail.len(), |(i, _)| i);
    let kept_head = &head[..h_end];
    let kept_tail = &tail[t_start..];
    let cut = original - kept_head.len() - kept_tail.len();
    if cut == 0 {
        return format!("{kept_head}{kept_tail}");
    }
    format!("{kept_head}{}{kept_tail}", marker(cut))
}

/// `text` in at most `max_chars` characters (head and tail), the marker counting bytes.
pub fn cap_text(text: &str, max_chars: usize) -> String {
    clip(text, "", 0, max_chars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_bytes(text: &str) -> usize {
        let at = text.find("[... ").unwrap();
        text[at + 5..].split(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn the_marker_counts_every_byte_cut_across_both_cuts() {
        // 100 MB through a 16 KiB collector, then a 1000-character observation.
        let mut ht = HeadTail::new(16 << 10);
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            ht.push(&chunk);
        }
        ht.push(b"END");
        let (text, dropped) = ht.finish();
        assert_eq!(dropped, (100 << 20) + 3 - (16 << 10));
        let (head, tail) = split_at_marker(&text, dropped);
        assert_eq!(head.len() + tail.len(), 16 << 10);
        let shown = clip(head, tail, dropped, 1000);
        assert!(shown.ends_with("END"), "{}", &shown[shown.len() - 20..]);
        let kept = shown.len() - marker(cut_bytes(&shown)).len();
        assert_eq!(cut_bytes(&shown) + kept, (100 << 20) + 3, "every byte is either shown or counted");
    }

    #[test]
    fn short_text_is_untouched_and_long_text_counts_multibyte_characters_as_bytes() {
        assert_eq!(cap_text("hello", 10), "hello");
        let text = "é".repeat(100); // 200 bytes
        let shown = cap_text(&text, 20);
        assert!(shown.starts_with(&"é".repeat(10)) && shown.ends_with(&"é".repeat(10)));
        assert_eq!(cut_bytes(&shown), 160);
    }
}

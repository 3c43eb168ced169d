//! Stop strings over a stream of tokens.
//!
//! [`StopStrings`] holds back the tokens whose text could be the start of a
//! stop string and releases them as soon as it cannot be. Text is released at
//! token granularity: a token is yielded whole once all of its text is known
//! not to begin a stop string. When a stop string completes, the text before it
//! is released (the token in which the stop string begins keeps its id and the
//! part of its text before the stop string) and generation should end.

use std::collections::VecDeque;

use inference_core::Token;

/// Matches stop strings across token boundaries.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: VecDeque<Token>,
    pending_text: String,
}

impl StopStrings {
    /// A matcher for `stops` (empty strings are ignored; options validation
    /// rejects them earlier).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: VecDeque::new(),
            pending_text: String::new(),
        }
    }

    /// Whether there are no stop strings (every token passes straight through).
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds the next token; appends to `out` the tokens that may be yielded now.
    /// Returns `true` when a stop string completed: `out` then holds the last
    /// tokens to yield and generation should end.
    pub fn push(&mut self, token: Token, out: &mut Vec<Token>) -> bool {
        if self.stops.is_empty() {
            out.push(token);
            return false;
        }
        self.pending_text.push_str(&token.text);
        self.pending.push_back(token);

        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending_text.find(s.as_str()))
            .min();
        if let Some(cut) = first_match {
            self.release_until(cut, out, true);
            self.pending.clear();
            self.pending_text.clear();
            return true;
        }
        let held = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.pending_text, s))
            .max()
            .unwrap_or(0);
        let safe = self.pending_text.len() - held;
        self.release_until(safe, out, false);
        false
    }

    /// Releases everything still held (generation ended without a stop string).
    pub fn flush(&mut self, out: &mut Vec<Token>) {
        out.extend(self.pending.drain(..));
        self.pending_text.clear();
    }

    /// Releases the pending tokens that lie within the first `limit` bytes of
    /// the pending text; with `truncate`, the token straddling `limit` is
    /// released cut at `limit` (when that leaves text).
    fn release_until(&mut self, limit: usize, out: &mut Vec<Token>, truncate: bool) {
        let mut used = 0;
        while let Some(front) = self.pending.front() {
            let end = used + front.text.len();
            if end <= limit {
                used = end;
                if let Some(t) = self.pending.pop_front() {
                    out.push(t);
                }
            } else {
                if truncate && limit > used {
                    if let Some(mut t) = self.pending.pop_front() {
                        t.text.truncate(limit - used);
                        out.push(t);
                    }
                    used = limit;
                }
                break;
            }
        }
        self.pending_text.drain(..used);
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&k| stop.is_char_boundary(k))
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` as tokens; returns the text yielded after each push and
    /// whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopStrings::new(&stops);
        let mut steps = Vec::new();
        let mut all = String::new();
        for (i, p) in pieces.iter().enumerate() {
            let mut out = Vec::new();
            let stopped = m.push(Token::new(i as u32, *p), &mut out);
            let text: String = out.iter().map(|t| t.text.as_str()).collect();
            all.push_str(&text);
            steps.push(text);
            if stopped {
                return (steps, true, all);
            }
        }
        let mut out = Vec::new();
        m.flush(&mut out);
        all.extend(out.iter().map(|t| t.text.as_str()));
        (steps, false, all)
    }

    #[test]
    fn passes_through_without_stops() {
        let (steps, stopped, all) = run(&[], &["a", "b"]);
        assert_eq!(steps, ["a", "b"]);
        assert!(!stopped);
        assert_eq!(all, "ab");
    }

    #[test]
    fn stop_split_across_tokens_is_never_yielded() {
        let (steps, stopped, all) = run(&["</end>"], &["Hi", " there", "</", "en", "d>", "more"]);
        assert!(stopped);
        assert_eq!(all, "Hi there");
        // "</" and "en" are held back, nothing else is.
        assert_eq!(steps, ["Hi", " there", "", "", ""]);
    }

    #[test]
    fn held_text_is_released_once_it_cannot_match() {
        let (steps, stopped, all) = run(&["STOP"], &["a S", "T", "x", "y"]);
        assert!(!stopped);
        assert_eq!(steps, ["", "", "a STx", "y"]);
        assert_eq!(all, "a STxy");
    }

    #[test]
    fn stop_inside_a_token_keeps_the_text_before_it() {
        let (_, stopped, all) = run(&["\n\n"], &["one", " two\n\nthree"]);
        assert!(stopped);
        assert_eq!(all, "one two");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (_, stopped, all) = run(&["cd", "b"], &["abcd"]);
        assert!(stopped);
        assert_eq!(all, "a");
    }

    #[test]
    fn multibyte_prefixes_are_held_on_char_boundaries() {
        let (steps, stopped, all) = run(&["é!"], &["caf", "é", "!"]);
        assert!(stopped);
        assert_eq!(steps, ["caf", "", ""]);
        assert_eq!(all, "caf");
    }
}

//! [`Sequence`]: the host's side of each decode step of one sequence.

use inference_core::{FinishReason, GenerateOptions, Token, TokenId, TokenLogprobs, TokenSink};
use inference_text::{Detokenize, StopStrings};

/// Detokenising a generated id failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    /// The id.
    pub id: TokenId,
    /// What the detokeniser said.
    pub message: String,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "detokenising id {}: {}", self.id, self.message)
    }
}

impl std::error::Error for StepError {}

/// The bookkeeping of one generated sequence, one read-back id at a time:
/// the end-of-sequence ids (unless `ignore_eos`) and the stop ids end it
/// without yielding the id; other ids are detokenised (a character is never
/// split) and pass through the stop strings, which hold back text that may
/// begin one and end the sequence when one completes.
///
/// The engine decides when a sequence has no more steps (`max_tokens`, the
/// end of the context) and says so with `last`; it then calls
/// [`finish`](Self::finish) to release what the stop strings held.
pub struct Sequence<D> {
    detok: D,
    stops: StopStrings,
    eos: Vec<TokenId>,
    stop_ids: Vec<TokenId>,
    ignore_eos: bool,
    generated: usize,
}

impl<D: Detokenize> Sequence<D> {
    /// A sequence generated under `opts`, ended by the model's `eos` ids,
    /// detokenised by `detok`.
    pub fn new(opts: &GenerateOptions, eos: &[TokenId], detok: D) -> Self {
        Self {
            detok,
            stops: StopStrings::new(&opts.stop_strings),
            eos: eos.to_vec(),
            stop_ids: opts.stop_tokens.clone(),
            ignore_eos: opts.ignore_eos,
            generated: 0,
        }
    }

    /// Takes the next id read back; `last` when no step follows it (its
    /// text then includes what the detokeniser still held). Appends to `out`
    /// the tokens that may be yielded now. Returns `Some(Stop)` when the
    /// sequence ended here: an end-of-sequence or stop id (what the stop
    /// strings held is released first, into `out`) or a completed stop
    /// string (`out` ends with the text before it).
    pub fn push(
        &mut self,
        id: TokenId,
        last: bool,
        out: &mut Vec<Token>,
    ) -> Result<Option<FinishReason>, StepError> {
        self.push_scored(id, None, last, out)
    }

    /// [`push`](Self::push) of an id with its log-probabilities, which the
    /// token carries (through the stop strings, which may shorten its text).
    pub fn push_scored(
        &mut self,
        id: TokenId,
        logprobs: Option<TokenLogprobs>,
        last: bool,
        out: &mut Vec<Token>,
    ) -> Result<Option<FinishReason>, StepError> {
        if (!self.ignore_eos && self.eos.contains(&id)) || self.stop_ids.contains(&id) {
            self.stops.flush(out);
            return Ok(Some(FinishReason::Stop));
        }
        let error = |message| StepError { id, message };
        let mut text = self.detok.step(id).map_err(error)?;
        if last {
            // Release a character still held back (an incomplete one as
            // U+FFFD, as a full decode would show it).
            text.push_str(&self.detok.finish().map_err(error)?);
        }
        self.generated += 1;
        if self
            .stops
            .push(Token::new(id, text).with_logprobs(logprobs), out)
        {
            return Ok(Some(FinishReason::Stop));
        }
        Ok(None)
    }

    /// Releases into `out` the text the stop strings still hold (the
    /// sequence ended without completing one).
    pub fn finish(&mut self, out: &mut Vec<Token>) {
        self.stops.flush(out);
    }

    /// Ids taken so far that were neither end-of-sequence nor stop ids.
    pub fn generated(&self) -> usize {
        self.generated
    }
}

/// Sends `tokens` (drained) to `sink`, appending their text to `reply` when
/// given; `false` when the consumer has gone (the call is cancelled).
pub fn stream_tokens(
    sink: &TokenSink,
    tokens: &mut Vec<Token>,
    mut reply: Option<&mut String>,
) -> bool {
    for t in tokens.drain(..) {
        if let Some(r) = reply.as_deref_mut() {
            r.push_str(&t.text);
        }
        if sink.send(t).is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each id's text is its decimal digits; id 99 is an incomplete
    /// character until the next id (or the end).
    struct Digits {
        held: bool,
    }

    impl Detokenize for Digits {
        fn step(&mut self, id: u32) -> Result<String, String> {
            if id == 13 {
                return Err("bad id".into());
            }
            let was_held = std::mem::replace(&mut self.held, id == 99);
            Ok(match (id, was_held) {
                (99, _) => String::new(),
                (_, true) => format!("~{id}"),
                _ => id.to_string(),
            })
        }

        fn finish(&mut self) -> Result<String, String> {
            Ok(if std::mem::take(&mut self.held) {
                "~".into()
            } else {
                String::new()
            })
        }
    }

    fn seq(opts: &GenerateOptions) -> Sequence<Digits> {
        Sequence::new(opts, &[0], Digits { held: false })
    }

    fn texts(out: &[Token]) -> Vec<&str> {
        out.iter().map(|t| t.text.as_str()).collect()
    }

    #[test]
    fn eos_and_stop_ids_end_without_being_yielded() {
        let mut out = Vec::new();
        let mut s = seq(&GenerateOptions::new());
        assert_eq!(s.push(5, false, &mut out).unwrap(), None);
        assert_eq!(
            s.push(0, false, &mut out).unwrap(),
            Some(FinishReason::Stop)
        );
        assert_eq!(texts(&out), ["5"]);
        assert_eq!(s.generated(), 1);

        let mut s = seq(&GenerateOptions::new().ignore_eos(true).stop_token(7));
        out.clear();
        assert_eq!(s.push(0, false, &mut out).unwrap(), None);
        assert_eq!(
            s.push(7, false, &mut out).unwrap(),
            Some(FinishReason::Stop)
        );
        assert_eq!(texts(&out), ["0"]);
    }

    #[test]
    fn stop_strings_hold_text_back_and_end_the_sequence() {
        let opts = GenerateOptions::new().stop_string("23");
        let mut out = Vec::new();
        let mut s = seq(&opts);
        assert_eq!(s.push(1, false, &mut out).unwrap(), None);
        assert_eq!(s.push(2, false, &mut out).unwrap(), None);
        // "2" may begin "23": held back.
        assert_eq!(texts(&out), ["1"]);
        assert_eq!(
            s.push(3, false, &mut out).unwrap(),
            Some(FinishReason::Stop)
        );
        assert_eq!(texts(&out), ["1"]);

        // An end-of-sequence id releases what was held.
        let mut s = seq(&opts);
        out.clear();
        s.push(2, false, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(
            s.push(0, false, &mut out).unwrap(),
            Some(FinishReason::Stop)
        );
        assert_eq!(texts(&out), ["2"]);

        // So does `finish` after the last step.
        let mut s = seq(&opts);
        out.clear();
        assert_eq!(s.push(2, true, &mut out).unwrap(), None);
        assert!(out.is_empty());
        s.finish(&mut out);
        assert_eq!(texts(&out), ["2"]);
    }

    #[test]
    fn the_last_step_releases_what_the_detokeniser_held() {
        let mut out = Vec::new();
        let mut s = seq(&GenerateOptions::new());
        s.push(99, false, &mut out).unwrap();
        s.push(4, false, &mut out).unwrap();
        s.push(99, true, &mut out).unwrap();
        assert_eq!(texts(&out), ["", "~4", "~"]);
    }

    #[test]
    fn detokeniser_errors_name_the_id() {
        let mut s = seq(&GenerateOptions::new());
        let e = s.push(13, false, &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "detokenising id 13: bad id");
    }

    #[test]
    fn streaming_records_the_reply_and_notices_a_gone_consumer() {
        let (sink, stream) = inference_core::TokenStream::channel();
        let mut reply = String::new();
        let mut tokens = vec![Token::new(1, "a"), Token::new(2, "b")];
        assert!(stream_tokens(&sink, &mut tokens, Some(&mut reply)));
        assert!(tokens.is_empty());
        assert_eq!(reply, "ab");
        drop(stream);
        let mut more = vec![Token::new(3, "c")];
        assert!(!stream_tokens(&sink, &mut more, None));
    }
}

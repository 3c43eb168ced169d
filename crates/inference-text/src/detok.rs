//! Streaming detokenisation: ids to text as they are generated, never
//! splitting a character.

use tokenizers::Tokenizer;

/// Turns generated ids into text one id at a time: what every engine's
/// per-step bookkeeping (`inference-runtime`) needs from a tokenizer.
pub trait Detokenize {
    /// The text `id` adds (possibly empty while a character is incomplete).
    fn step(&mut self, id: u32) -> Result<String, String>;

    /// Releases the text still held back at the end of generation.
    fn finish(&mut self) -> Result<String, String>;
}

impl Detokenize for StreamDecoder<'_> {
    fn step(&mut self, id: u32) -> Result<String, String> {
        StreamDecoder::step(self, id)
    }

    fn finish(&mut self) -> Result<String, String> {
        StreamDecoder::finish(self)
    }
}

/// Turns generated ids into text as they arrive, never splitting a character.
///
/// It decodes a window of ids (a few already shown as context, then the new
/// ones) and emits what the window's text gained since the last step. The
/// context keeps decoder rules that depend on position (SentencePiece's
/// leading-space strip, byte-level merges) from altering the text. While the
/// window's text ends in U+FFFD (an incomplete byte-fallback or byte-level
/// sequence), only the text before it is emitted; if
/// [`StreamDecoder::MAX_PENDING`] tokens pass without the character
/// completing, the bytes were invalid and U+FFFD is emitted, as a full decode
/// would. [`finish`](Self::finish) releases what is still held, so the
/// emitted pieces always add up to the decode of all the ids.
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    /// The window: context ids, then the ids whose text is not all shown.
    ids: Vec<u32>,
    /// The part of the window's text already emitted (or given as context).
    shown: String,
    /// Where in `ids` the tokens of an incomplete character may begin: the
    /// window's length when its text was last complete.
    complete: usize,
    /// Tokens pushed since the text last grew.
    held: usize,
}

impl<'t> StreamDecoder<'t> {
    /// Tokens held back at most while waiting for a character to complete
    /// (a UTF-8 character has at most four bytes).
    pub const MAX_PENDING: usize = 4;
    /// Ids kept as context when the window moves on.
    const CONTEXT: usize = 4;
    /// The window moves on once it holds this many ids.
    const WINDOW: usize = 16;

    /// A decoder whose context starts as the last prompt tokens, so that the
    /// first generated token keeps its leading space.
    pub fn new(tokenizer: &'t Tokenizer, prompt: &[u32]) -> Self {
        let mut this = Self {
            tokenizer,
            ids: prompt.to_vec(),
            shown: String::new(),
            complete: 0,
            held: 0,
        };
        this.shown = this.decode(prompt).unwrap_or_default();
        this.rewindow();
        this
    }

    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, false).map_err(|e| e.to_string())
    }

    /// Keeps the last [`CONTEXT`](Self::CONTEXT) ids as context, their text
    /// counted as shown. Fewer where the window would start inside a
    /// character or a run of byte tokens: the kept ids must decode to the
    /// end of the window's text as it was (`shown`, complete here).
    fn rewindow(&mut self) {
        let mut start = self.ids.len().saturating_sub(Self::CONTEXT);
        let mut text = self.decode(&self.ids[start..]).unwrap_or_default();
        while !self.shown.ends_with(text.as_str()) && start < self.ids.len() {
            start += 1;
            text = self.decode(&self.ids[start..]).unwrap_or_default();
        }
        self.ids.drain(..start);
        self.shown = text;
        self.complete = self.ids.len();
    }

    /// The text `id` adds (possibly empty while a character is incomplete).
    pub fn step(&mut self, id: u32) -> Result<String, String> {
        self.ids.push(id);
        self.held += 1;
        let full = self.decode(&self.ids)?;
        if full.ends_with('\u{FFFD}') && self.held < Self::MAX_PENDING {
            // Emit the text before the incomplete character, if it grew.
            // (A byte-fallback decoder turns a whole run of byte tokens into
            // U+FFFD while its last character is incomplete: then nothing
            // is new yet.)
            let ready = full.trim_end_matches('\u{FFFD}');
            return Ok(match ready.strip_prefix(self.shown.as_str()) {
                Some(rest) if !rest.is_empty() => {
                    let rest = rest.to_owned();
                    self.shown = ready.to_owned();
                    self.held = 0;
                    rest
                }
                _ => String::new(),
            });
        }
        let added = self.added(&full)?;
        self.shown = full;
        self.complete = self.ids.len();
        self.held = 0;
        if self.ids.len() >= Self::WINDOW {
            self.rewindow();
        }
        Ok(added)
    }

    /// Releases the text still held back (an incomplete character at the end
    /// of generation, as U+FFFD).
    pub fn finish(&mut self) -> Result<String, String> {
        let full = self.decode(&self.ids)?;
        let added = self.added(&full)?;
        self.shown = full;
        self.complete = self.ids.len();
        self.held = 0;
        Ok(added)
    }

    /// What the window's text `full` adds to what was shown: its tail past
    /// the shown text or, where the longer window decoded the shown text
    /// differently (invalid bytes), the held tokens' own text.
    fn added(&self, full: &str) -> Result<String, String> {
        if let Some(rest) = full.strip_prefix(self.shown.as_str()) {
            return Ok(rest.to_owned());
        }
        tracing::debug!(shown = %self.shown, now = %full, "detokeniser: window text changed");
        self.decode(&self.ids[self.complete.min(self.ids.len())..])
    }
}

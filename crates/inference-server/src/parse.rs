//! Splitting a chat reply into reasoning, content and tool calls, as the
//! text streams in.
//!
//! - Reasoning: a reply that begins with `<think>` (Qwen3, DeepSeek-R1 and
//!   the models trained like them) reasons until `</think>`; that part is
//!   the reasoning, the rest the content.
//! - Tool calls, in the formats of the families this project runs:
//!   [`ToolFormat::Hermes`] (Qwen2, Qwen2.5, Qwen3 and other Hermes-style
//!   templates: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one
//!   block per call, anywhere in the content) and [`ToolFormat::Llama3`]
//!   (Llama 3.1+: the whole reply is one JSON object `{"name": …,
//!   "parameters": {…}}`, or several separated by `;`, optionally after
//!   `<|python_tag|>`). A block that does not parse stays content.
//!
//! [`ReplyParser::push`] takes each piece of text and returns what can be
//! said already; text that may still turn out to be a tag is held back
//! until it is decided.

use inference_core::{FunctionCall, ToolCall};
use serde_json::Value;

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{json}</tool_call>` blocks (Hermes, Qwen).
    Hermes,
    /// A reply that is a JSON call (Llama 3.1+).
    Llama3,
}

impl ToolFormat {
    /// The opening of a reply that calls `name` (any tool when `None`): the
    /// reply is made to start with it, and the model writes the rest of
    /// the call (the arguments, or the name and the arguments).
    pub fn call_prefix(self, name: Option<&str>) -> String {
        let quoted = |n: &str| serde_json::Value::String(n.to_owned()).to_string();
        match (self, name) {
            (ToolFormat::Hermes, Some(n)) => {
                format!("<tool_call>\n{{\"name\": {}, \"arguments\": ", quoted(n))
            }
            (ToolFormat::Hermes, None) => "<tool_call>\n{\"name\": \"".to_owned(),
            (ToolFormat::Llama3, Some(n)) => {
                format!("{{\"name\": {}, \"parameters\": ", quoted(n))
            }
            (ToolFormat::Llama3, None) => "{\"name\": \"".to_owned(),
        }
    }

    /// The format of a model of `model_type` (`ModelInfo::architecture`).
    pub fn for_model_type(model_type: &str) -> ToolFormat {
        if model_type.starts_with("llama") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        }
    }
}

/// A piece of a reply, as it may be sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Reasoning text.
    Reasoning(String),
    /// Answer text.
    Content(String),
    /// A complete tool call.
    Call(ToolCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing decided yet: the reply may begin with `<think>` or a JSON call.
    Start,
    Thinking,
    Content,
    /// Inside a `<tool_call>` block.
    InCall,
    /// A Llama 3 reply that is (so far) a JSON call: held to the end.
    Json,
}

const THINK: &str = "<think>";
const END_THINK: &str = "</think>";
const CALL: &str = "<tool_call>";
const END_CALL: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

/// Splits one reply as it streams.
#[derive(Debug)]
pub struct ReplyParser {
    format: ToolFormat,
    /// Whether tool calls are looked for at all (the request offered tools).
    tools: bool,
    state: State,
    held: String,
    calls: usize,
    id_prefix: String,
    /// Drop the whitespace that opens the content after the reasoning.
    trim_start: bool,
}

impl ReplyParser {
    /// A parser for a reply in `format`; tool calls are parsed only when
    /// `tools`. Call ids are `{id_prefix}-{n}`.
    pub fn new(format: ToolFormat, tools: bool, id_prefix: &str) -> Self {
        Self {
            format,
            tools,
            state: State::Start,
            held: String::new(),
            calls: 0,
            id_prefix: id_prefix.to_owned(),
            trim_start: false,
        }
    }

    /// Tool calls parsed so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes the next piece of text; returns what can be said now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            let before = (self.state, self.held.len());
            self.step(&mut out, false);
            if (self.state, self.held.len()) == before {
                break;
            }
        }
        out
    }

    /// The reply ended: everything held is said.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        loop {
            let before = (self.state, self.held.len());
            self.step(&mut out, true);
            if (self.state, self.held.len()) == before {
                break;
            }
        }
        if !self.held.is_empty() {
            let rest = std::mem::take(&mut self.held);
            match self.state {
                State::Thinking => out.push(Piece::Reasoning(rest)),
                State::Json => {
                    let calls = self.json_calls(&rest);
                    match calls {
                        Some(calls) => out.extend(calls.into_iter().map(Piece::Call)),
                        None => out.push(Piece::Content(rest)),
                    }
                }
                State::InCall => out.push(Piece::Content(format!("{CALL}{rest}"))),
                // Blank space around tool calls is not content.
                State::Content if self.calls > 0 && rest.trim().is_empty() => {}
                State::Start | State::Content => out.push(Piece::Content(rest)),
            }
        }
        merge(out)
    }

    fn step(&mut self, out: &mut Vec<Piece>, end: bool) {
        match self.state {
            State::Start => {
                let trimmed = self.held.trim_start();
                if trimmed.is_empty() && !end {
                    return;
                }
                if trimmed.starts_with(THINK) {
                    let at = self.held.find(THINK).unwrap_or(0) + THINK.len();
                    self.held.drain(..at);
                    self.state = State::Thinking;
                } else if !end && THINK.starts_with(trimmed) {
                    // Maybe `<think>` still arriving.
                } else if self.tools
                    && self.format == ToolFormat::Llama3
                    && (trimmed.starts_with('{') || trimmed.starts_with(PYTHON_TAG))
                {
                    self.state = State::Json;
                } else if self.tools
                    && self.format == ToolFormat::Llama3
                    && !end
                    && PYTHON_TAG.starts_with(trimmed)
                {
                    // Maybe the python tag still arriving.
                } else {
                    self.state = State::Content;
                }
            }
            State::Thinking => match self.held.find(END_THINK) {
                Some(at) => {
                    let reasoning: String = self.held.drain(..at).collect();
                    self.held.drain(..END_THINK.len());
                    if !reasoning.is_empty() {
                        out.push(Piece::Reasoning(reasoning));
                    }
                    // What follows the reasoning starts afresh (a Llama
                    // call or content), its leading blank line dropped.
                    let rest = self.held.trim_start().to_owned();
                    self.held = rest;
                    self.trim_start = true;
                    self.state = State::Content;
                    if self.tools && self.format == ToolFormat::Llama3 {
                        self.state = State::Start;
                    }
                }
                None => {
                    let keep = partial_suffix(&self.held, END_THINK);
                    let say = self.held.len() - keep;
                    if say > 0 {
                        out.push(Piece::Reasoning(self.held.drain(..say).collect()));
                    }
                }
            },
            State::Content => {
                if self.trim_start {
                    let rest = self.held.trim_start().to_owned();
                    self.held = rest;
                    if self.held.is_empty() {
                        return;
                    }
                    self.trim_start = false;
                }
                if !self.tools || self.format != ToolFormat::Hermes {
                    if !self.held.is_empty() {
                        out.push(Piece::Content(std::mem::take(&mut self.held)));
                    }
                    return;
                }
                match self.held.find(CALL) {
                    Some(at) => {
                        let before: String = self.held.drain(..at).collect();
                        self.held.drain(..CALL.len());
                        if !before.trim().is_empty() {
                            out.push(Piece::Content(before));
                        }
                        self.state = State::InCall;
                    }
                    None => {
                        let keep = if end {
                            0
                        } else {
                            partial_suffix(&self.held, CALL)
                        };
                        let say = self.held.len() - keep;
                        // Blank space may separate calls: held until
                        // something else follows.
                        if say > 0 && !end && self.held[..say].trim().is_empty() {
                            return;
                        }
                        if say > 0 {
                            out.push(Piece::Content(self.held.drain(..say).collect()));
                        }
                    }
                }
            }
            State::InCall => {
                if let Some(at) = self.held.find(END_CALL) {
                    let body: String = self.held.drain(..at).collect();
                    self.held.drain(..END_CALL.len());
                    match self.call_of(body.trim()) {
                        Some(call) => out.push(Piece::Call(call)),
                        None => out.push(Piece::Content(format!("{CALL}{body}{END_CALL}"))),
                    }
                    self.state = State::Content;
                }
            }
            State::Json => {}
        }
    }

    /// A call from `{"name": …, "arguments" | "parameters": …}`.
    fn call_of(&mut self, json: &str) -> Option<ToolCall> {
        let v: Value = serde_json::from_str(json).ok()?;
        self.call_of_value(&v)
    }

    fn call_of_value(&mut self, v: &Value) -> Option<ToolCall> {
        let name = v.get("name")?.as_str()?.to_owned();
        let args = v
            .get("arguments")
            .or_else(|| v.get("parameters"))
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        // Arguments as an object (what chat templates render); a model that
        // wrote them as a JSON string gets them parsed.
        let arguments = match args {
            Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
            other => other,
        };
        self.calls += 1;
        Some(ToolCall {
            id: format!("{}-{}", self.id_prefix, self.calls),
            kind: "function".into(),
            function: FunctionCall { name, arguments },
        })
    }

    /// A Llama 3 reply's calls: one JSON object, or several joined by `;`.
    fn json_calls(&mut self, text: &str) -> Option<Vec<ToolCall>> {
        let text = text.trim();
        let text = text.strip_prefix(PYTHON_TAG).unwrap_or(text).trim();
        let mut calls = Vec::new();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let v: Value = serde_json::from_str(part).ok()?;
            calls.push(self.call_of_value(&v)?);
        }
        (!calls.is_empty()).then_some(calls)
    }
}

/// The length of the longest suffix of `text` that begins `tag` (text that
/// may still become the tag).
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// Adjacent pieces of one kind joined.
fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match (out.last_mut(), p) {
            (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
            (Some(Piece::Reasoning(a)), Piece::Reasoning(b)) => a.push_str(&b),
            (_, p) => out.push(p),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forced call's opening says nothing by itself, and with the
    /// model's continuation it is the call, in both formats, named or not.
    #[test]
    fn forced_openings_parse_with_their_continuations() {
        let cases = [
            (
                ToolFormat::Hermes,
                Some("get_weather"),
                "{\"city\": \"Paris\"}}\n</tool_call>",
            ),
            (
                ToolFormat::Hermes,
                None,
                "get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            ),
            (
                ToolFormat::Llama3,
                Some("get_weather"),
                "{\"city\": \"Paris\"}}",
            ),
            (
                ToolFormat::Llama3,
                None,
                "get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            ),
        ];
        for (format, name, rest) in cases {
            let prefix = format.call_prefix(name);
            let mut p = ReplyParser::new(format, true, "call");
            assert_eq!(p.push(&prefix), vec![], "{format:?} {name:?}");
            for n in [1, 3, 64] {
                let pieces = run(format, true, &format!("{prefix}{rest}"), n);
                let [Piece::Call(call)] = &pieces[..] else {
                    panic!("{format:?} {name:?}: {pieces:?}");
                };
                assert_eq!(call.function.name, "get_weather");
                let args = match &call.function.arguments {
                    serde_json::Value::String(s) => serde_json::from_str(s).unwrap(),
                    v => v.clone(),
                };
                assert_eq!(args, serde_json::json!({"city": "Paris"}));
            }
        }
        // A name that needs escaping stays valid JSON.
        assert!(ToolFormat::Hermes
            .call_prefix(Some("a\"b"))
            .contains(r#""a\"b""#));
    }

    /// Feeds `text` in pieces of `n` bytes (at character boundaries).
    fn run(format: ToolFormat, tools: bool, text: &str, n: usize) -> Vec<Piece> {
        let mut p = ReplyParser::new(format, tools, "call");
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = n.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            out.extend(p.push(&rest[..cut]));
            rest = &rest[cut..];
        }
        out.extend(p.finish());
        merge(out)
    }

    fn call(id: usize, name: &str, args: &str) -> Piece {
        Piece::Call(ToolCall {
            id: format!("call-{id}"),
            kind: "function".into(),
            function: FunctionCall {
                name: name.into(),
                arguments: serde_json::from_str(args).unwrap(),
            },
        })
    }

    #[test]
    fn reasoning_then_content_in_any_pieces() {
        for n in [1, 2, 3, 7, 100] {
            let got = run(
                ToolFormat::Hermes,
                false,
                "<think>\nLet me see: 2 + 2.\n</think>\n\nIt is 4 <b>.",
                n,
            );
            assert_eq!(
                got,
                vec![
                    Piece::Reasoning("\nLet me see: 2 + 2.\n".into()),
                    Piece::Content("It is 4 <b>.".into())
                ],
                "pieces of {n}"
            );
        }
        // No reasoning: all content, a lone `<` included.
        assert_eq!(
            run(ToolFormat::Hermes, false, "<b>hi</b>", 1),
            vec![Piece::Content("<b>hi</b>".into())]
        );
        // Unfinished reasoning stays reasoning.
        assert_eq!(
            run(ToolFormat::Hermes, false, "<think>hmm", 2),
            vec![Piece::Reasoning("hmm".into())]
        );
    }

    #[test]
    fn hermes_calls_anywhere_in_the_content() {
        let text = "<think>Need weather.</think>\nChecking.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        for n in [1, 5, 1000] {
            assert_eq!(
                run(ToolFormat::Hermes, true, text, n),
                vec![
                    Piece::Reasoning("Need weather.".into()),
                    Piece::Content("Checking.".into()),
                    call(1, "get_weather", r#"{"city":"Paris"}"#),
                    call(2, "now", "{}"),
                ],
                "pieces of {n}"
            );
        }
        // Without tools offered the block is content.
        let got = run(
            ToolFormat::Hermes,
            false,
            "<tool_call>{\"name\": \"x\"}</tool_call>",
            3,
        );
        assert_eq!(
            got,
            vec![Piece::Content(
                "<tool_call>{\"name\": \"x\"}</tool_call>".into()
            )]
        );
        // A block that is not a call stays content.
        let got = run(
            ToolFormat::Hermes,
            true,
            "a<tool_call>not json</tool_call>b",
            4,
        );
        assert_eq!(
            got,
            vec![Piece::Content("a<tool_call>not json</tool_call>b".into())]
        );
    }

    #[test]
    fn llama3_json_replies() {
        let text = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        for n in [1, 9, 1000] {
            assert_eq!(
                run(ToolFormat::Llama3, true, text, n),
                vec![call(1, "get_weather", r#"{"city":"Paris"}"#)]
            );
        }
        let two = "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": 1}}";
        assert_eq!(
            run(ToolFormat::Llama3, true, two, 4),
            vec![call(1, "a", "{}"), call(2, "b", r#"{"x":1}"#)]
        );
        // Not a call: content, whole.
        assert_eq!(
            run(ToolFormat::Llama3, true, "{not json", 3),
            vec![Piece::Content("{not json".into())]
        );
        assert_eq!(
            run(ToolFormat::Llama3, true, "Hello {there}", 3),
            vec![Piece::Content("Hello {there}".into())]
        );
    }
}

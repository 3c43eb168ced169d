//! Chat templates: the Jinja template a model ships (in
//! `tokenizer_config.json` or `chat_template.jinja`), rendered with
//! [`minijinja`] the way transformers' `apply_chat_template` renders it, or a
//! built-in template for models that ship none.
//!
//! Rendering follows transformers: `trim_blocks` and `lstrip_blocks` on, no
//! trailing newline kept, Python's string and dict methods (through
//! `minijinja-contrib`'s `pycompat`), the `raise_exception` and
//! `strftime_now` functions, a `tojson` filter that writes what Python's
//! `json.dumps` writes, and the variables `messages`,
//! `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`,
//! `unk_token`, `pad_token`, where the tokenizer configuration names them)
//! and every template argument of the call (e.g. `enable_thinking`).

use std::collections::BTreeMap;
use std::fmt;

use inference_core::{Error, Message, Result};
use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// The name the template is stored under in its environment.
const NAME: &str = "chat_template";

/// Who reports the template engine's internal failures (none of them
/// reachable from a template's text).
const COMPONENT: &str = "inference-text";

/// Instructions one render may run (minijinja's fuel). A real template
/// renders a long conversation in well under a million; a runaway one
/// (nested loops over huge ranges) stops here with an error instead of
/// hanging the call.
pub const RENDER_FUEL: u64 = 20_000_000;

/// Bytes one render may write: far beyond any real prompt.
pub const RENDER_MAX_BYTES: usize = 64 << 20;

/// Built-in templates for models that ship none, written for this crate from
/// the published prompt formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuiltinTemplate {
    /// Gemma: `<start_of_turn>user … <end_of_turn>`, the assistant's role
    /// named `model`, a system message folded into the first user turn.
    Gemma,
    /// ChatML, as Qwen uses it: `<|im_start|>role … <|im_end|>`.
    ChatMl,
    /// Llama 3: `<|start_header_id|>role<|end_header_id|> … <|eot_id|>`.
    Llama3,
}

const GEMMA: &str = r#"{{- bos_token -}}
{%- if messages[0].role == 'system' -%}
    {%- set first_prefix = messages[0].content ~ '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set first_prefix = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Gemma conversations alternate user and assistant turns, after an optional system message') -}}
    {%- endif -%}
    {{- '<start_of_turn>' ~ ('model' if message.role == 'assistant' else message.role) ~ '\n' -}}
    {{- (first_prefix if loop.first else '') ~ (message.content | trim) ~ '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}"#;

const CHATML: &str = r#"{%- for message in messages -%}
    {{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}"#;

const LLAMA3: &str = r#"{{- bos_token -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' ~ message.role ~ '<|end_header_id|>\n\n' ~ (message.content | trim) ~ '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}"#;

impl BuiltinTemplate {
    /// The template's Jinja source.
    pub fn source(self) -> &'static str {
        match self {
            Self::Gemma => GEMMA,
            Self::ChatMl => CHATML,
            Self::Llama3 => LLAMA3,
        }
    }

    /// The special token each format is built on.
    fn marker(self) -> &'static str {
        match self {
            Self::Gemma => "<start_of_turn>",
            Self::ChatMl => "<|im_start|>",
            Self::Llama3 => "<|start_header_id|>",
        }
    }

    /// The built-in template for a model of `model_type` whose vocabulary
    /// holds the tokens for which `has_token` says yes: the format its
    /// `model_type` names (Gemma, Qwen, Llama) when the vocabulary has that
    /// format's turn marker, else the first format whose marker it has.
    pub fn detect(model_type: &str, has_token: impl Fn(&str) -> bool) -> Option<Self> {
        let all = [Self::Gemma, Self::ChatMl, Self::Llama3];
        let named = if model_type.starts_with("gemma") {
            Some(Self::Gemma)
        } else if model_type.starts_with("qwen") {
            Some(Self::ChatMl)
        } else if model_type.starts_with("llama") {
            Some(Self::Llama3)
        } else {
            None
        };
        named.into_iter().chain(all).find(|t| has_token(t.marker()))
    }
}

impl fmt::Display for BuiltinTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Gemma => "Gemma",
            Self::ChatMl => "ChatML",
            Self::Llama3 => "Llama 3",
        })
    }
}

/// The special tokens a template sees, as transformers passes them (its
/// `special_tokens_map`): the texts named in `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos_token: Option<String>,
    /// `eos_token`.
    pub eos_token: Option<String>,
    /// `unk_token`.
    pub unk_token: Option<String>,
    /// `pad_token`.
    pub pad_token: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    builtin: Option<BuiltinTemplate>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("builtin", &self.builtin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error (or a construct minijinja lacks) is
    /// an [`Error::Unsupported`] naming the line.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        Self::compile(source.into(), None)
    }

    /// A built-in template.
    pub fn builtin(which: BuiltinTemplate) -> Self {
        // The built-in sources are tested to compile.
        match Self::compile(which.source().to_owned(), Some(which)) {
            Ok(t) => t,
            Err(e) => unreachable!("built-in template {which} does not compile: {e}"),
        }
    }

    /// Which built-in template this is, if it is one.
    pub fn builtin_kind(&self) -> Option<BuiltinTemplate> {
        self.builtin
    }

    fn compile(source: String, builtin: Option<BuiltinTemplate>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::backend(COMPONENT, format!("template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)
            .map_err(|e| Error::unsupported(format!("this chat template: {}", describe(&e))))?;
        Ok(Self { env, builtin })
    }

    /// Renders `messages` with the special tokens and the template arguments
    /// `args`, adding the assistant's turn header when
    /// `add_generation_prompt`.
    ///
    /// An argument named `messages` or `add_generation_prompt` is an
    /// [`Error::InvalidOption`]; an error the template raises (for example
    /// `raise_exception` on roles in the wrong order) or meets is an
    /// [`Error::InvalidInput`] carrying its message.
    pub fn render(
        &self,
        messages: &[Message],
        special: &SpecialTokens,
        add_generation_prompt: bool,
        args: &BTreeMap<String, serde_json::Value>,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::InvalidInput("no messages to render".into()));
        }
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (name, text) in [
            ("bos_token", &special.bos_token),
            ("eos_token", &special.eos_token),
            ("unk_token", &special.unk_token),
            ("pad_token", &special.pad_token),
        ] {
            if let Some(text) = text {
                ctx.insert(name.to_owned(), Value::from(text.as_str()));
            }
        }
        for (name, value) in args {
            if name == "messages" || name == "add_generation_prompt" {
                return Err(Error::invalid_option(
                    "template_args",
                    format!("`{name}` is set by the chat call itself"),
                ));
            }
            ctx.insert(name.clone(), Value::from(Serde(value)));
        }
        ctx.insert("messages".to_owned(), Value::from(Serde(messages)));
        ctx.insert(
            "add_generation_prompt".to_owned(),
            Value::from(add_generation_prompt),
        );
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::backend(COMPONENT, format!("chat template: {e}")))?;
        let mut out = Bounded(Vec::new());
        match template.render_captured_to(Value::from(ctx), &mut out) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(Error::InvalidInput(format!(
                    "chat template: rendering ran more than {RENDER_FUEL} instructions \
                     (a runaway template?)"
                )))
            }
            Err(e) if e.kind() == ErrorKind::WriteFailure => {
                return Err(Error::InvalidInput(format!(
                    "chat template: the rendered prompt passed {} MiB (a runaway template?)",
                    RENDER_MAX_BYTES >> 20
                )))
            }
            Err(e) => {
                return Err(Error::InvalidInput(format!(
                    "chat template: {}",
                    describe(&e)
                )))
            }
        }
        String::from_utf8(out.0)
            .map_err(|e| Error::InvalidInput(format!("chat template: output is not UTF-8: {e}")))
    }
}

/// A buffer that refuses to grow past [`RENDER_MAX_BYTES`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > RENDER_MAX_BYTES {
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A minijinja error with its cause chain and line.
fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local date and time formatted like Python's
/// `datetime.now().strftime(format)`.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        ));
    }
    let now = chrono::Local::now();
    let mut out = String::new();
    fmt::Write::write_fmt(
        &mut out,
        format_args!("{}", now.format_with_items(items.into_iter())),
    )
    .map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format {format:?}"),
        )
    })?;
    Ok(out)
}

/// `tojson(indent=None)`: what transformers' `tojson` (Python's `json.dumps`
/// with `ensure_ascii=False`) writes: `", "` and `": "` between items, or one
/// item per line with `indent`. minijinja's own filter escapes HTML
/// characters, which a prompt must not.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let fail = |e: serde_json::Error| {
        minijinja::Error::new(ErrorKind::BadSerialization, format!("tojson: {e}"))
    };
    let mut out = Vec::new();
    match indent {
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonSpaced);
            value.serialize(&mut ser).map_err(fail)?;
        }
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            value.serialize(&mut ser).map_err(fail)?;
        }
    }
    String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, format!("tojson: {e}")))
}

/// Python's default `json.dumps` separators: `", "` and `": "`.
struct PythonSpaced;

impl serde_json::ser::Formatter for PythonSpaced {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &ChatTemplate, messages: &[Message]) -> Result<String> {
        let special = SpecialTokens {
            bos_token: Some("<bos>".into()),
            ..SpecialTokens::default()
        };
        t.render(messages, &special, true, &BTreeMap::new())
    }

    #[test]
    fn builtins_compile_and_render_their_formats() {
        let chat = [
            Message::system("Be brief."),
            Message::user(" Hi "),
            Message::assistant("Hello."),
            Message::user("Bye"),
        ];
        assert_eq!(
            render(&ChatTemplate::builtin(BuiltinTemplate::ChatMl), &chat).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            render(&ChatTemplate::builtin(BuiltinTemplate::Gemma), &chat).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n\
             <start_of_turn>model\n"
        );
        assert_eq!(
            render(&ChatTemplate::builtin(BuiltinTemplate::Llama3), &chat).unwrap(),
            "<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn detection_prefers_the_named_format_and_needs_its_marker() {
        let vocab = ["<|im_start|>", "<start_of_turn>"];
        let has = |t: &str| vocab.contains(&t);
        assert_eq!(
            BuiltinTemplate::detect("gemma3_text", has),
            Some(BuiltinTemplate::Gemma)
        );
        assert_eq!(
            BuiltinTemplate::detect("qwen3", has),
            Some(BuiltinTemplate::ChatMl)
        );
        // Llama named, but no Llama 3 marker: the first format present.
        assert_eq!(
            BuiltinTemplate::detect("llama", has),
            Some(BuiltinTemplate::Gemma)
        );
        assert_eq!(BuiltinTemplate::detect("llama", |_| false), None);
    }

    #[test]
    fn python_methods_tests_and_functions_work() {
        let t = ChatTemplate::new(
            "{% set ns = namespace(n=0) %}{% for m in messages[::-1] %}{% set ns.n = ns.n + 1 %}\
             {{ m.content.split('</think>')[-1].lstrip('\\n').upper() }}|{% endfor %}\
             {{ ns.n }}{% if flag is defined and flag is false %}F{% endif %}\
             {{ {'a': 1, 'b': [1, 'x<y']} | tojson }}{{ strftime_now('%Y') | length }}",
        )
        .unwrap();
        let args = BTreeMap::from([("flag".to_owned(), serde_json::Value::Bool(false))]);
        let out = t
            .render(
                &[Message::user("a"), Message::assistant("t</think>\nb")],
                &SpecialTokens::default(),
                false,
                &args,
            )
            .unwrap();
        assert_eq!(out, "B|A|2F{\"a\": 1, \"b\": [1, \"x<y\"]}4");
    }

    #[test]
    fn errors_are_typed() {
        let gemma = ChatTemplate::builtin(BuiltinTemplate::Gemma);
        match render(&gemma, &[Message::assistant("first")]) {
            Err(Error::InvalidInput(m)) => assert!(m.contains("alternate"), "{m}"),
            other => panic!("{other:?}"),
        }
        match ChatTemplate::new("{% for %}") {
            Err(Error::Unsupported { feature }) => assert!(
                feature.contains("syntax error") && feature.contains(":1"),
                "{feature}"
            ),
            other => panic!("{other:?}"),
        }
        let args = BTreeMap::from([("messages".to_owned(), serde_json::Value::Null)]);
        assert!(matches!(
            gemma.render(
                &[Message::user("x")],
                &SpecialTokens::default(),
                true,
                &args
            ),
            Err(Error::InvalidOption {
                field: "template_args",
                ..
            })
        ));
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}{{ 1 | tojson(sort=1) }}").unwrap();
        assert!(matches!(
            render(&bad, &[Message::user("x")]),
            Err(Error::InvalidInput(_))
        ));
    }
}

//! Chat templates against transformers' `apply_chat_template` (goldens by
//! `scripts/fixtures/make_text_goldens.py`): the official Qwen3 (thinking)
//! and Gemma 3 templates of the real tokenizers, the fixture models'
//! templates, the built-in fallbacks, and BOS handling.

mod common;

use std::collections::BTreeMap;

use common::*;
use inference_core::{Error, GenerateOptions, Message, TextModel};
use inference_text::ModelTokenizer;
use inference_text::{BuiltinTemplate, ChatTemplate};

/// Renders and encodes every chat case of a real tokenizer's golden.
fn real_template_matches_transformers(name: &str, model_type: &str) {
    let tok = ModelTokenizer::from_dir(&real_tokenizer(name)).unwrap();
    let template = tok.chat_template_for(model_type).unwrap();
    assert_eq!(template.builtin_kind(), None, "{name}: ships a template");
    let golden = text_golden(name);
    for case in golden["chat"].as_array().unwrap() {
        let label = format!("{name}/{}", case["name"].as_str().unwrap());
        let messages = json_messages(&case["messages"]);
        let args = json_args(&case["args"]);
        let text = template
            .render(&messages, &tok.special, true, &args)
            .unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{label}: text");
        assert_eq!(
            tok.encode_messages(&template, &messages, &args).unwrap(),
            json_ids(&case["ids"]),
            "{label}: ids"
        );
    }
}

#[test]
fn qwen3_template_matches_transformers() {
    real_template_matches_transformers("qwen3", "qwen3");
}

#[test]
fn gemma3_template_matches_transformers() {
    real_template_matches_transformers("gemma3", "gemma3");
}

#[test]
fn enable_thinking_changes_the_qwen3_prompt() {
    let tok = ModelTokenizer::from_dir(&real_tokenizer("qwen3")).unwrap();
    let template = tok.chat_template_for("qwen3").unwrap();
    let messages = [Message::user("Hi")];
    let render = |args: &BTreeMap<String, serde_json::Value>| {
        template
            .render(&messages, &tok.special, true, args)
            .unwrap()
    };
    let default = render(&BTreeMap::new());
    let off = render(&json_args(&serde_json::json!({"enable_thinking": false})));
    assert!(default.ends_with("<|im_start|>assistant\n"), "{default:?}");
    assert_eq!(off, format!("{default}<think>\n\n</think>\n\n"));
}

#[test]
fn builtin_gemma_template_matches_the_official_one() {
    // A Gemma model without a template gets the built-in one, which renders
    // what transformers renders with Gemma 3's own template.
    let tok = ModelTokenizer::from_dir(&real_tokenizer("gemma3")).unwrap();
    let builtin = ChatTemplate::builtin(BuiltinTemplate::Gemma);
    for case in text_golden("gemma3")["chat"].as_array().unwrap() {
        let messages = json_messages(&case["messages"]);
        let text = builtin
            .render(&messages, &tok.special, true, &BTreeMap::new())
            .unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{}", case["name"]);
    }
}

#[test]
fn builtin_chatml_template_matches_the_fixture_template() {
    // The Qwen fixtures ship a plain ChatML template; the built-in one
    // renders the same text.
    let tok = ModelTokenizer::from_dir(&fixture("qwen3-f32")).unwrap();
    let builtin = ChatTemplate::builtin(BuiltinTemplate::ChatMl);
    let golden = chat_golden("qwen3-f32");
    for case in golden["chats"].as_array().unwrap() {
        let messages = json_messages(&case["messages"]);
        let text = builtin
            .render(&messages, &tok.special, true, &BTreeMap::new())
            .unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{}", case["name"]);
    }
}

#[test]
fn models_without_a_template_get_a_builtin_or_unsupported() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(real_tokenizer("gemma3").join(f), tmp.path().join(f)).unwrap();
    }
    let config = tmp.path().join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config, v.to_string()).unwrap();
    let tok = ModelTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(tok.chat_template, None);
    let t = tok.chat_template_for("gemma3_text").unwrap();
    assert_eq!(t.builtin_kind(), Some(BuiltinTemplate::Gemma));

    // The llama fixture's vocabulary has none of the formats' markers.
    let llama = ModelTokenizer::from_dir(&fixture("llama-f32")).unwrap();
    let mut llama_no_template = llama;
    llama_no_template.chat_template = None;
    match llama_no_template.chat_template_for("llama") {
        Err(Error::Unsupported { feature }) => assert!(feature.contains("chat"), "{feature}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fixture_templates_render_what_transformers_renders() {
    for name in ["qwen3-f32", "qwen2-f32", "llama-f32"] {
        let model = load(&fixture(name));
        for case in chat_golden(name)["chats"].as_array().unwrap() {
            let label = format!("{name}/{}", case["name"].as_str().unwrap());
            let messages = json_messages(&case["messages"]);
            let mut opts = GenerateOptions::new();
            opts.template_args = json_args(&case["args"]);
            assert_eq!(
                model.render_chat(&messages, &opts).unwrap(),
                case["text"].as_str().unwrap(),
                "{label}"
            );
            let ids = model.encode_chat(&messages, &opts).unwrap();
            assert_eq!(ids, json_ids(&case["ids"]), "{label}");
            // The llama template writes `{{ bos_token }}` and the tokenizer
            // adds a BOS too: the prompt still has exactly one.
            if let Some(bos) = model.bos_token_id() {
                assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1, "{label}");
            }
        }
    }
}

#[test]
fn chat_refuses_bad_input_with_typed_errors() {
    let model = load(&fixture("qwen3-f32"));
    let opts = GenerateOptions::new();
    assert!(matches!(
        model.chat(&[], &opts),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        model.chat(
            &[Message::user("hi")],
            &GenerateOptions::new().template_arg("messages", 1)
        ),
        Err(Error::InvalidOption {
            field: "template_args",
            ..
        })
    ));
    // Template arguments mean nothing to a raw prompt: refused, not ignored.
    assert!(matches!(
        model.generate(
            "hi",
            &GenerateOptions::new().template_arg("enable_thinking", false)
        ),
        Err(Error::Unsupported { .. })
    ));
    // A template that raises: its message comes back as InvalidInput.
    let gemma = ModelTokenizer::from_dir(&real_tokenizer("gemma3")).unwrap();
    let t = gemma.chat_template_for("gemma3").unwrap();
    match t.render(
        &[Message::user("a"), Message::user("b")],
        &gemma.special,
        true,
        &BTreeMap::new(),
    ) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("alternate"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// A runaway template (nested loops over huge ranges, or an endless output)
/// ends with a typed error instead of hanging the call; a long real
/// conversation still renders.
#[test]
fn runaway_templates_are_bounded() {
    let special = ModelTokenizer::from_dir(&fixture("qwen3-f32"))
        .unwrap()
        .special;
    let user = [Message::user("hi")];
    let none = BTreeMap::new();
    let loops = ChatTemplate::new(
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x",
    )
    .unwrap();
    let started = std::time::Instant::now();
    match loops.render(&user, &special, true, &none) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("instructions"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Generous wall-clock bound: an unbounded render would take hours.
    assert!(started.elapsed().as_secs() < 120, "{:?}", started.elapsed());
    let big = ChatTemplate::new(
        "{% for i in range(99999) %}{{ messages[0].content * 10000 }}{% endfor %}",
    )
    .unwrap();
    match big.render(&user, &special, true, &none) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("MiB"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The official Qwen3 template over 400 messages is well inside the bound.
    let qwen = ModelTokenizer::from_dir(&real_tokenizer("qwen3")).unwrap();
    let t = qwen.chat_template_for("qwen3").unwrap();
    let long: Vec<Message> = (0..400)
        .map(|i| {
            if i % 2 == 0 {
                Message::user(format!("question {i}"))
            } else {
                Message::assistant(format!("answer {i}"))
            }
        })
        .collect();
    let text = t.render(&long, &qwen.special, true, &none).unwrap();
    assert!(text.contains("question 398"));
}

/// A `chat_template` that is not a string, or is empty, is a load error
/// naming `tokenizer_config.json`; the template's own failures are the
/// error of `chat` alone (no warning logged before it).
#[test]
fn malformed_chat_template_values_name_the_file() {
    for bad in [
        serde_json::json!(12),
        serde_json::json!(""),
        serde_json::json!(true),
        serde_json::json!([{"name": "tool_use", "template": "x"}]),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(real_tokenizer("qwen3").join(f), tmp.path().join(f)).unwrap();
        }
        let config = tmp.path().join("tokenizer_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        v["chat_template"] = bad.clone();
        std::fs::write(&config, v.to_string()).unwrap();
        match ModelTokenizer::from_dir(tmp.path()) {
            Err(Error::ModelLoad { source, .. }) => {
                let m = source.to_string();
                assert!(
                    m.contains("tokenizer_config.json") && m.contains("chat_template"),
                    "{bad}: {m}"
                );
            }
            Err(other) => panic!("{bad}: {other:?}"),
            Ok(_) => panic!("{bad}: accepted"),
        }
    }
}

/// The same renders and ids through `Box<dyn TextModel>::tokenizer()`, with
/// the tokenizer's own encode, decode and count, and tools reaching the
/// template.
#[test]
fn tokenizer_access_through_the_model_trait() {
    use inference_core::{LoadOptions, RenderOptions};
    for name in ["qwen3-f32", "qwen2-f32", "llama-f32"] {
        let model: Box<dyn TextModel> =
            inference_core::load_model(fixture(name), &LoadOptions::new().gpu_layers(0)).unwrap();
        let tok = model.tokenizer().unwrap();
        assert_eq!(tok.vocab_size(), model.info().vocab_size, "{name}");
        for case in chat_golden(name)["chats"].as_array().unwrap() {
            let label = format!("{name}/{}", case["name"].as_str().unwrap());
            let messages = json_messages(&case["messages"]);
            let mut render = RenderOptions::new();
            render.template_args = json_args(&case["args"]);
            assert_eq!(
                tok.render_chat(&messages, &render).unwrap(),
                case["text"].as_str().unwrap(),
                "{label}"
            );
            let ids = tok.encode_chat(&messages, &render).unwrap();
            assert_eq!(ids, json_ids(&case["ids"]), "{label}");
            // What `chat` runs: the stream announces the same prompt ids.
            let mut opts = GenerateOptions::new().max_tokens(1);
            opts.template_args = render.template_args.clone();
            let mut stream = model.chat(&messages, &opts).unwrap();
            stream.collect_tokens().unwrap();
            assert_eq!(stream.prompt_ids(), Some(&ids[..]), "{label}");
            // Without the generation prompt the text is a prefix.
            let bare = tok
                .render_chat(&messages, &render.clone().add_generation_prompt(false))
                .unwrap();
            assert!(case["text"].as_str().unwrap().starts_with(&bare), "{label}");
        }
        // encode / decode / count, as `generate` encodes.
        let text = "The capital of France is Paris.";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.count_tokens(text).unwrap(), ids.len(), "{name}");
        let mut stream = model
            .generate(text, &GenerateOptions::new().max_tokens(1))
            .unwrap();
        stream.collect_tokens().unwrap();
        assert_eq!(stream.prompt_ids(), Some(&ids[..]), "{name}");
        let plain = tok.encode(text, false).unwrap();
        match tok.bos_token_id() {
            Some(bos) if ids.len() == plain.len() + 1 => assert_eq!(ids[0], bos, "{name}"),
            _ => assert_eq!(ids, plain, "{name}"),
        }
        assert_eq!(tok.decode(&plain, true).unwrap(), text, "{name}");
        assert!(!tok.eos_token_ids().is_empty(), "{name}");
    }
}

/// Tool definitions reach the template as `tools` (the official Qwen3
/// template lists them in its system turn), and a `tools` template argument
/// beside them is refused.
#[test]
fn tools_reach_the_template() {
    use inference_core::{RenderOptions, Tokenizer};
    let tok = inference_text::ChatTokenizer::new(
        ModelTokenizer::from_dir(&real_tokenizer("qwen3")).unwrap(),
        "qwen3",
        151_936,
    );
    let tool = serde_json::json!({"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    let messages = [Message::user("Weather in Paris?")];
    let with = tok
        .render_chat(&messages, &RenderOptions::new().tools(vec![tool.clone()]))
        .unwrap();
    let without = tok.render_chat(&messages, &RenderOptions::new()).unwrap();
    assert!(
        with.contains("get_weather") && !without.contains("get_weather"),
        "{with}"
    );
    let clash = RenderOptions::new()
        .tools(vec![tool])
        .template_arg("tools", serde_json::json!([]));
    assert!(matches!(
        tok.render_chat(&messages, &clash),
        Err(Error::InvalidOption { .. })
    ));
}

/// Renders and encodes every tool conversation of `<name>-tools.json` (by
/// `scripts/fixtures/make_tool_goldens.py`) with the real tokenizer `name`;
/// the cases.
fn tool_conversations_match_transformers(name: &str, model_type: &str) -> Vec<serde_json::Value> {
    use inference_core::{RenderOptions, Tokenizer};
    let tok = inference_text::ChatTokenizer::new(
        ModelTokenizer::from_dir(&real_tokenizer(name)).unwrap(),
        model_type,
        usize::MAX,
    );
    let golden = text_golden(&format!("{name}-tools"));
    let cases = golden["cases"].as_array().unwrap().clone();
    for case in &cases {
        let name = format!("{name}/{}", case["name"].as_str().unwrap());
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let tools = case["tools"].as_array().unwrap().clone();
        let mut opts = RenderOptions::new().tools(tools);
        opts.template_args = json_args(&case["args"]);
        assert_eq!(
            tok.render_chat(&messages, &opts).unwrap(),
            case["text"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            tok.encode_chat(&messages, &opts).unwrap(),
            json_ids(&case["ids"]),
            "{name}: ids"
        );
    }
    cases
}

/// Tool conversations (tools, assistant tool calls with object or string
/// arguments, tool results, reasoning content) render on the official Qwen3
/// template exactly as transformers' `apply_chat_template` renders them, and
/// encode to its ids.
#[test]
fn qwen3_tool_conversations_match_transformers() {
    let cases = tool_conversations_match_transformers("qwen3", "qwen3");
    assert_eq!(cases.len(), 5);
    // The messages of the golden round-trip through our types unchanged.
    let call = &cases[2]["messages"][1];
    let m: Message = serde_json::from_value(call.clone()).unwrap();
    assert_eq!(
        m,
        Message::assistant_tool_calls(
            "",
            vec![inference_core::ToolCall::function(
                "call_1",
                "get_weather",
                serde_json::json!({"city": "Paris", "unit": "celsius"})
            )]
        )
    );
    assert_eq!(serde_json::to_value(&m).unwrap(), *call);
    let result: Message = serde_json::from_value(cases[2]["messages"][2].clone()).unwrap();
    assert_eq!(
        result,
        Message::tool("call_1", "{\"temperature\": 21, \"sky\": \"clear\"}")
    );
}

/// `chat` gives `GenerateOptions::tools` to the template (the prompt ids it
/// runs are the tokenizer's render with those tools); raw prompts refuse
/// tools.
#[test]
fn chat_passes_its_tools_and_raw_prompts_refuse_them() {
    use inference_core::{LoadOptions, RenderOptions};
    let model: Box<dyn TextModel> =
        inference_core::load_model(fixture("qwen3-f32"), &LoadOptions::new().gpu_layers(0))
            .unwrap();
    let tool = serde_json::json!({"type": "function", "function": {"name": "f"}});
    let opts = GenerateOptions::new().max_tokens(1).tool(tool.clone());
    let messages = [Message::user("hi")];
    let mut stream = model.chat(&messages, &opts).unwrap();
    stream.collect_tokens().unwrap();
    let tok = model.tokenizer().unwrap();
    // The fixture's template ignores `tools`, so the render is the same text
    // either way; what is checked is that the call runs those ids.
    let ids = tok
        .encode_chat(&messages, &RenderOptions::new().tools(vec![tool]))
        .unwrap();
    assert_eq!(stream.prompt_ids(), Some(&ids[..]));
    for refused in [
        model.generate("hi", &opts).err(),
        model.batch_generate(&["hi".into()], &opts).err(),
        model
            .classify(
                &["hi".into()],
                &GenerateOptions::new().tool(serde_json::json!({})),
            )
            .err(),
    ] {
        assert!(
            matches!(refused, Some(Error::Unsupported { .. })),
            "{refused:?}"
        );
    }
}

/// The same on the official Llama 3.2 template (tools in the user or the
/// system message, a call and its `ipython` result; a fixed `date_string`).
#[test]
fn llama3_tool_conversations_match_transformers() {
    let cases = tool_conversations_match_transformers("llama3", "llama");
    assert_eq!(cases.len(), 4);
}

/// A reply prefix is rendered after the generation prompt and the model
/// continues it; raw prompts, chat sessions and an empty prefix refuse it.
#[test]
fn a_reply_prefix_starts_the_answer() {
    use inference_core::{LoadOptions, RenderOptions};
    let model: Box<dyn TextModel> =
        inference_core::load_model(fixture("qwen3-f32"), &LoadOptions::new().gpu_layers(0))
            .unwrap();
    let messages = [Message::user("hi")];
    let tok = model.tokenizer().unwrap();
    let plain = tok.render_chat(&messages, &RenderOptions::new()).unwrap();
    let forced = tok
        .render_chat(
            &messages,
            &RenderOptions::new().reply_prefix("<tool_call>\n{"),
        )
        .unwrap();
    assert_eq!(forced, format!("{plain}<tool_call>\n{{"));
    assert!(tok
        .render_chat(
            &messages,
            &RenderOptions::new()
                .add_generation_prompt(false)
                .reply_prefix("x")
        )
        .is_err());
    let opts = GenerateOptions::new()
        .max_tokens(2)
        .reply_prefix("<tool_call>\n{");
    let mut stream = model.chat(&messages, &opts).unwrap();
    stream.collect_tokens().unwrap();
    let ids = tok
        .encode_chat(&messages, &RenderOptions::for_chat(&opts))
        .unwrap();
    assert_eq!(stream.prompt_ids(), Some(&ids[..]));
    assert!(tok.decode(&ids, false).unwrap().ends_with("<tool_call>\n{"));
    let refused = [
        model.generate("hi", &opts).err(),
        model.chat_session().unwrap().send("hi", &opts).err(),
    ];
    for r in refused {
        assert!(matches!(r, Some(Error::Unsupported { .. })), "{r:?}");
    }
    let empty = GenerateOptions::new().reply_prefix("");
    assert!(matches!(
        model.chat(&messages, &empty).err(),
        Some(Error::InvalidOption {
            field: "reply_prefix",
            ..
        })
    ));
}

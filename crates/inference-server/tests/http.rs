//! The server over HTTP on loopback, with a real client (reqwest): response
//! shapes, streaming, every error status, tool calls and reasoning in each
//! family's real output format (scripted models that emit it, since random
//! fixtures never do), a client's disconnect, and a fixture MLX model whose
//! greedy answers equal a direct call.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{scripted, start, Server};
use inference_core::{GenerateOptions, LoadOptions, Message, TextModel};
use inference_server::{ReasoningField, ServedModel, ServerConfig};
use serde_json::{json, Value};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", s.base))
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// The `data:` payloads of a server-sent-events body, `[DONE]` included.
fn events(s: &Server, path: &str, body: &Value) -> Vec<String> {
    let r = client()
        .post(format!("{}{path}", s.base))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().unwrap();
    text.split("\n\n")
        .flat_map(|e| e.lines())
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The chunks of a streamed chat completion, before `[DONE]`.
fn chunks(s: &Server, body: &Value) -> Vec<Value> {
    let ev = events(s, "/v1/chat/completions", body);
    ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn greedy(mut body: Value) -> Value {
    body["temperature"] = json!(0);
    body
}

fn hello() -> Value {
    greedy(json!({"model": "x", "messages": [{"role": "user", "content": "hi"}]}))
}

#[test]
fn chat_whole_and_streamed() {
    let s = start(
        vec![ServedModel::new(
            "script",
            scripted(&["Hello", " there", "!"], "scripted"),
        )],
        ServerConfig::default(),
    );
    let (status, v) = post(&s, "/v1/chat/completions", &hello());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "script");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello there!");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    assert_eq!(v["usage"]["total_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    let mut body = hello();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["max_tokens"] = json!(2);
    let ev = events(&s, "/v1/chat/completions", &body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello there");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
}

#[test]
fn errors_are_openai_errors_with_their_status() {
    let s = start(
        vec![
            ServedModel::new("a", scripted(&["A"], "scripted")),
            ServedModel::new("b", scripted(&["B"], "scripted")),
        ],
        ServerConfig {
            api_key: Some("sekret".into()),
            max_body_bytes: 10_000,
            ..ServerConfig::default()
        },
    );
    let c = client();
    let send = |body: &str, key: Option<&str>| {
        let mut r = c
            .post(format!("{}/v1/chat/completions", s.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    let ok = |model: &str| {
        greedy(json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})).to_string()
    };
    // 401: no key, a wrong key.
    for key in [None, Some("nope")] {
        let (st, v) = send(&ok("a"), key);
        assert_eq!(st, 401);
        assert_eq!(v["error"]["type"], "authentication_error");
    }
    let (st, v) = send(&ok("b"), Some("sekret"));
    assert_eq!(
        (st, v["choices"][0]["message"]["content"].clone()),
        (200, json!("B"))
    );
    // 404: an unknown model among several.
    let (st, v) = send(&ok("c"), Some("sekret"));
    assert_eq!(st, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    // 400s, each naming what is wrong.
    let cases: Vec<(String, Option<&str>)> = vec![
        ("{not json".into(), None),
        (json!({"model": "a", "messages": [], "temperature": 0}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}).to_string(), Some("frobnicate")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(), Some("n")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}).to_string(), Some("response_format")),
        (json!({"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "wizard", "content": "hi"}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).to_string(), Some("temperature")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}).to_string(), Some("temperature")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}).to_string(), Some("presence_penalty")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -2.5}).to_string(), Some("frequency_penalty")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}).to_string(), Some("logit_bias")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "tools": []}).to_string(), Some("tool_choice")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f</tool_call>"}}]}).to_string(), Some("tools")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "audio": {}}).to_string(), Some("audio")),
        // Unknown or malformed fields inside messages and tools, as OpenAI
        // refuses them; content that only an assistant may leave out.
        (json!({"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "seed": 1}]}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "user", "content": []}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "user"}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "2"}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": 3}}]}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}", "zzz": 1}}]}]}).to_string(), None),
        (json!({"model": "a", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "other", "function": {"name": "f", "arguments": "{}"}}]}]}).to_string(), Some("messages")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}, "max_tokens": 1}]}).to_string(), Some("tools")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "seed": 1}}]}).to_string(), Some("tools")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "strict": true}}]}).to_string(), Some("tools")),
        (json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}).to_string(), Some("tools")),
    ];
    for (body, param) in cases {
        let (st, v) = send(&body, Some("sekret"));
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}: {v}");
        }
    }
    // An unknown field says so as OpenAI does.
    let (_, v) = send(
        &json!({"model": "a", "messages": [], "frobnicate": 1}).to_string(),
        Some("sekret"),
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Unrecognized request argument supplied: frobnicate"));
    // 413.
    let huge = json!({"model": "a", "messages": [{"role": "user", "content": "x".repeat(20_000)}]});
    let (st, v) = send(&huge.to_string(), Some("sekret"));
    assert_eq!(st, 413, "{v}");
    assert_eq!(v["error"]["code"], "request_too_large");
    // An unknown path.
    let r = c.get(format!("{}/v2/nothing", s.base)).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // /health and /v1/models (behind the key).
    assert_eq!(
        c.get(format!("{}/health", s.base))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let r = c
        .get(format!("{}/v1/models", s.base))
        .bearer_auth("sekret")
        .send()
        .unwrap();
    let v: Value = r.json().unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    // The page, and the metrics counting what came.
    let page = c
        .get(format!("{}/", s.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("<title>infer chat</title>"));
    let m = c
        .get(format!("{}/metrics", s.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        m.contains("infer_requests_total{path=\"/v1/chat/completions\",status=\"401\"} 2"),
        "{m}"
    );
    assert!(m.contains("infer_requests_total{path=\"/v1/chat/completions\",status=\"400\"}"));
    assert!(m.contains("infer_completion_tokens_total 1"), "{m}");
}

#[test]
fn hermes_tool_calls_whole_and_streamed() {
    let script = [
        "<think>",
        "The user wants",
        " weather.",
        "</think>",
        "\n\n",
        "<tool_call>",
        "\n{\"name\": \"get_weather\", ",
        "\"arguments\": {\"city\": \"Paris\"}}",
        "\n</tool_call>",
    ];
    let s = start(
        vec![ServedModel::new("qwen", scripted(&script, "qwen3"))],
        ServerConfig::default(),
    );
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let mut body = hello();
    body["tools"] = tools.clone();
    let (st, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    let msg = &v["choices"][0]["message"];
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(msg["reasoning_content"], "The user wants weather.");
    assert_eq!(msg["content"], Value::Null);
    assert_eq!(msg["tool_calls"][0]["type"], "function");
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(
        msg["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args, json!({"city": "Paris"}));

    body["stream"] = json!(true);
    let chunks = chunks(&s, &body);
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, "The user wants weather.");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert!(chunks.iter().all(|c| c["choices"][0]["delta"]["content"]
        .as_str()
        .is_none_or(str::is_empty)));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // `tool_choice: none` offers no tools: the block is content.
    let mut none = hello();
    none["tools"] = tools;
    none["tool_choice"] = json!("none");
    let (_, v) = post(&s, "/v1/chat/completions", &none);
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("<tool_call>"));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn llama3_json_tool_calls_and_the_reasoning_field_name() {
    let script = [
        "{\"name\": \"lookup\", ",
        "\"parameters\": {\"q\": \"rust\"}}",
    ];
    let s = start(
        vec![ServedModel::new("llama", scripted(&script, "llama"))],
        ServerConfig::default(),
    );
    let mut body = hello();
    body["tools"] = json!([{"type": "function", "function": {"name": "lookup"}}]);
    body["messages"] = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "find"}, {"type": "text", "text": " rust"}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "nothing"},
        {"role": "user", "content": "again"}
    ]);
    let (st, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "lookup");
    assert_eq!(call["function"]["arguments"], "{\"q\":\"rust\"}");

    let s = start(
        vec![ServedModel::new(
            "r",
            scripted(&["<think>", "hm", "</think>", "ok"], "qwen3"),
        )],
        ServerConfig {
            reasoning_field: ReasoningField::Reasoning,
            ..ServerConfig::default()
        },
    );
    let (_, v) = post(&s, "/v1/chat/completions", &hello());
    assert_eq!(v["choices"][0]["message"]["reasoning"], "hm");
    assert_eq!(v["choices"][0]["message"]["content"], "ok");
}

#[test]
fn completions_whole_streamed_and_refused() {
    let s = start(
        vec![ServedModel::new(
            "script",
            scripted(&["one", " two", " three"], "scripted"),
        )],
        ServerConfig::default(),
    );
    let body = greedy(json!({"prompt": "count:", "echo": true, "max_tokens": 2}));
    let (st, v) = post(&s, "/v1/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "count:one two");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let ev = events(&s, "/v1/completions", &streamed);
    let text: String = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "count:one two");
    let (st, v) = post(
        &s,
        "/v1/completions",
        &json!({"prompt": "x", "suffix": "y"}),
    );
    assert_eq!((st, v["error"]["param"].clone()), (400, json!("suffix")));
    // Token ids need a model that takes them.
    let (st, _) = post(&s, "/v1/completions", &greedy(json!({"prompt": [1, 2, 3]})));
    assert_eq!(st, 400);
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn mlx(name: &str, opts: LoadOptions) -> Arc<dyn TextModel> {
    Arc::new(
        backend_metal::MlxModel::load(
            &fixture(name),
            &opts.gpu_layers(0),
            backend_metal::Placement::Cpu,
        )
        .unwrap(),
    )
}

/// A fixture MLX model: the server's greedy answer equals a direct call;
/// token-id prompts work; a client that goes away frees its slot; a full
/// queue answers 429.
#[test]
fn an_mlx_model_behind_the_server() {
    let model = mlx(
        "qwen3-f32",
        LoadOptions::new().parallel_slots(1).max_queue(1),
    );
    let s = start(
        vec![ServedModel::new("qwen3", Arc::clone(&model))],
        ServerConfig::default(),
    );
    let body = greedy(
        json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12, "logprobs": true, "top_logprobs": 2}),
    );
    let (st, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    let opts = GenerateOptions::new().max_tokens(12).temperature(0.0);
    let direct = model
        .chat(&[Message::user("Tell me a story")], &opts)
        .unwrap()
        .collect_text()
        .unwrap();
    let served = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(served, direct.trim_start());
    let lps = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lps.len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(lps[0]["top_logprobs"].as_array().unwrap().len(), 2);
    // Token ids.
    let (st, v) = post(
        &s,
        "/v1/completions",
        &greedy(json!({"prompt": [11, 22, 33], "max_tokens": 3})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 3);

    // A long stream whose client goes away: its slot is freed.
    let long = greedy(json!({"prompt": "once upon a time", "max_tokens": 250, "stream": true}));
    let r = client()
        .post(format!("{}/v1/completions", s.base))
        .json(&long)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut r = r;
    let mut buf = [0u8; 64];
    std::io::Read::read(&mut r, &mut buf).unwrap();
    // One running: a second waits, a third is refused.
    let waiting = std::thread::spawn({
        let base = s.base.clone();
        move || {
            let body = greedy(json!({"prompt": "hello", "max_tokens": 2}));
            client()
                .post(format!("{base}/v1/completions"))
                .json(&body)
                .send()
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while model.queue_status().unwrap().waiting == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (st, v) = post(
        &s,
        "/v1/completions",
        &greedy(json!({"prompt": "hi", "max_tokens": 2})),
    );
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    drop(r);
    assert_eq!(waiting.join().unwrap(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while model.queue_status().unwrap().running > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(model.queue_status().unwrap().running, 0);
    let m = client()
        .get(format!("{}/metrics", s.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(m.contains("infer_batch_size{model=\"qwen3\"} 0"), "{m}");
    assert!(m.contains("infer_time_to_first_token_seconds_count"), "{m}");
}

/// A request past the time limit: a whole reply is a 503, a stream ends
/// with an error event (and `[DONE]`) after what it had sent.
#[test]
fn the_request_time_limit() {
    let words: Vec<String> = (0..60).map(|i| format!(" w{i}")).collect();
    let mut script: Vec<inference_core::Token> = (1..)
        .zip(&words)
        .map(|(id, w)| inference_core::Token::new(id, w.clone()))
        .collect();
    script.push(inference_core::Token::new(0, ""));
    let slow: Arc<dyn TextModel> = Arc::new(
        backend_stub::ScriptedModel::builder(script)
            .eos(0)
            .step_delay(Duration::from_millis(20))
            .build()
            .unwrap(),
    );
    let s = start(
        vec![ServedModel::new("slow", slow)],
        ServerConfig {
            request_timeout: Some(Duration::from_millis(300)),
            ..ServerConfig::default()
        },
    );
    let (st, v) = post(&s, "/v1/chat/completions", &hello());
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "timeout");
    let mut body = hello();
    body["stream"] = json!(true);
    let ev = events(&s, "/v1/chat/completions", &body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(last["error"]["code"], "timeout");
    let words_sent: usize = ev[..ev.len() - 2]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert!(
        (1..60).contains(&words_sent),
        "{words_sent} words before the limit"
    );
}

/// `tool_choice` naming a function, or `required`, forces a call: the reply
/// is made to start with the call's opening (the scripted model continues
/// it, as a model would), and the call comes back parsed, whole and
/// streamed, in both tool formats.
#[test]
fn a_named_or_required_tool_choice_forces_the_call() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ]);
    let cases: [(&str, &[&str], Value); 4] = [
        (
            "qwen3",
            &["{\"city\": ", "\"Paris\"}}", "\n</tool_call>"],
            json!({"type": "function", "function": {"name": "get_weather"}}),
        ),
        (
            "qwen3",
            &[
                "get_weather\", ",
                "\"arguments\": {\"city\": \"Paris\"}}",
                "\n</tool_call>",
            ],
            json!("required"),
        ),
        (
            "llama",
            &["{\"city\": ", "\"Paris\"}}"],
            json!({"type": "function", "function": {"name": "get_weather"}}),
        ),
        (
            "llama",
            &["get_weather\", \"parameters\": ", "{\"city\": \"Paris\"}}"],
            json!("required"),
        ),
    ];
    for (model_type, script, choice) in cases {
        let s = start(
            vec![ServedModel::new("m", scripted(script, model_type))],
            ServerConfig::default(),
        );
        let mut body = hello();
        body["tools"] = tools.clone();
        body["tool_choice"] = choice.clone();
        let (st, v) = post(&s, "/v1/chat/completions", &body);
        assert_eq!(st, 200, "{v}");
        let what = format!("{model_type} {choice}");
        assert_eq!(
            v["choices"][0]["finish_reason"], "tool_calls",
            "{what}: {v}"
        );
        let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
        assert_eq!(call["name"], "get_weather", "{what}: {v}");
        let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}), "{what}");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null, "{what}");

        body["stream"] = json!(true);
        let chunks = chunks(&s, &body);
        let calls: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
            .flatten()
            .collect();
        assert_eq!(calls.len(), 1, "{what}");
        assert_eq!(calls[0]["function"]["name"], "get_weather", "{what}");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "tool_calls",
            "{what}"
        );
    }
}

/// The mutation test's seeded generator.
struct Mix(fastrand::Rng);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n.max(1))
    }
}

/// A value of the wrong kind, size or range for any field.
fn odd_value(rng: &mut Mix) -> Value {
    let mut deep = json!([]);
    for _ in 0..200 {
        deep = json!([deep]);
    }
    let picks = [
        Value::Null,
        json!(true),
        json!(-1),
        json!(0),
        json!(1e308),
        json!(-1e308),
        json!(9_007_199_254_740_993u64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(""),
        json!("x".repeat(20_000)),
        json!("\u{0}\u{202e}\u{1f600}<|im_end|>{{ raise('x') }}"),
        json!([]),
        json!({}),
        json!([1, "a", null, {"b": []}]),
        json!({"role": "user"}),
        json!({"type": "function", "function": {}}),
        json!([{"role": "user", "content": null}]),
        deep,
    ];
    picks[rng.below(picks.len())].clone()
}

/// Every object and array inside `v`, by JSON pointer.
fn containers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            out.push(at.clone());
            for (k, x) in m {
                containers(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            out.push(at.clone());
            for (i, x) in a.iter().enumerate() {
                containers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// One to three changes to `body`: a field replaced by an odd value,
/// removed, or added under an unknown or known name.
fn mutate(body: &Value, rng: &mut Mix) -> Value {
    const NAMES: [&str; 12] = [
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "tools",
        "tool_choice",
        "stream_options",
        "zzz",
    ];
    let mut v = body.clone();
    for _ in 0..1 + rng.below(3) {
        let mut places = Vec::new();
        containers(&v, String::new(), &mut places);
        let at = places[rng.below(places.len())].clone();
        let action = rng.below(3);
        let value = odd_value(rng);
        match v.pointer_mut(&at) {
            Some(Value::Object(m)) => {
                let keys: Vec<String> = m.keys().cloned().collect();
                match action {
                    0 if !keys.is_empty() => {
                        m.remove(&keys[rng.below(keys.len())]);
                    }
                    1 if !keys.is_empty() => {
                        m.insert(keys[rng.below(keys.len())].clone(), value);
                    }
                    _ => {
                        m.insert(NAMES[rng.below(NAMES.len())].into(), value);
                    }
                }
            }
            Some(Value::Array(a)) => match action {
                0 if !a.is_empty() => {
                    a.remove(rng.below(a.len()));
                }
                1 if !a.is_empty() => {
                    let i = rng.below(a.len());
                    a[i] = value;
                }
                _ => a.push(value),
            },
            _ => {}
        }
    }
    v
}

/// Requests changed at random (fields of the wrong type, size or range,
/// missing or unknown; bodies cut short or with a stray byte), on both
/// endpoints, streamed or not: every answer is a success or an OpenAI error
/// with a 4xx status, never a 5xx or a dropped connection, and the server
/// answers a plain request afterwards. `INFER_TEST_FUZZ_SEED` and
/// `INFER_TEST_FUZZ_REQUESTS` (400) run other and longer series.
#[test]
fn requests_changed_at_random_get_answers_or_4xx() {
    // A fixture MLX model, which takes every option (sampling, logprobs,
    // logit bias, tools in its template).
    let s = start(
        vec![ServedModel::new("m", mlx("qwen3-f32", LoadOptions::new()))],
        ServerConfig::default(),
    );
    let chat = json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "2"},
            {"role": "user", "content": "again"}
        ],
        "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n", "two"],
        "logprobs": true, "top_logprobs": 2, "logit_bias": {"1": 2.5},
        "presence_penalty": 0.1, "frequency_penalty": 0.1,
        "tools": [{"type": "function", "function": {"name": "f", "description": "d",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}],
        "tool_choice": "auto", "stream": false, "stream_options": {"include_usage": true}
    });
    let completion = json!({
        "model": "m", "prompt": "count:", "max_tokens": 2, "temperature": 0, "echo": true,
        "stop": "three", "seed": 1, "logprobs": 1, "stream": false
    });
    for (path, base) in [
        ("/v1/chat/completions", &chat),
        ("/v1/completions", &completion),
    ] {
        let (st, v) = post(&s, path, base);
        assert_eq!(st, 200, "{path}: {v}");
    }
    let c = client();
    let knob = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let mut rng = Mix(fastrand::Rng::with_seed(knob(
        "INFER_TEST_FUZZ_SEED",
        0x5eed,
    )));
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..knob("INFER_TEST_FUZZ_REQUESTS", 400) {
        let (path, base) = match i % 2 {
            0 => ("/v1/chat/completions", &chat),
            _ => ("/v1/completions", &completion),
        };
        let mut body = mutate(base, &mut rng);
        if rng.below(2) == 0 {
            body["stream"] = json!(true);
        }
        let mut text = body.to_string().into_bytes();
        match rng.below(8) {
            0 => text.truncate(rng.below(text.len())),
            1 => {
                let at = rng.below(text.len());
                text.insert(at, (rng.next() & 0xff) as u8);
            }
            _ => {}
        }
        let r = c
            .post(format!("{}{path}", s.base))
            .header("content-type", "application/json")
            .body(text.clone())
            .send()
            .unwrap_or_else(|e| panic!("request {i} to {path}: no answer ({e}): {body}"));
        let status = r.status().as_u16();
        let answer = r
            .text()
            .unwrap_or_else(|e| panic!("request {i}: the body broke off ({e}): {body}"));
        *statuses.entry(status).or_insert(0) += 1;
        assert!(
            status == 200 || (400..500).contains(&status),
            "request {i} to {path}: {status} {answer:.300}\n{:.2000}",
            String::from_utf8_lossy(&text)
        );
        if status != 200 {
            let v: Value = serde_json::from_str(&answer)
                .unwrap_or_else(|_| panic!("request {i}: {status} without JSON: {answer:.300}"));
            assert!(v["error"]["message"].is_string(), "request {i}: {v}");
        }
    }
    // Both kinds of answer came up, so the mutations reached past the parser.
    assert!(
        statuses.contains_key(&200) && statuses.contains_key(&400),
        "{statuses:?}"
    );
    let (st, v) = post(&s, "/v1/chat/completions", &hello());
    assert_eq!(st, 200, "{v}");
}

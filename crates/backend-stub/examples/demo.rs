//! The README's main job until a real backend lands: lists the registered
//! backends, then streams a scripted model's answer to the prompt through the
//! public API (`TextModel::chat` and `TokenStream`).

use std::io::Write;
use std::time::Duration;

use backend_stub::ScriptedModel;
use inference_core::{GenerateOptions, Message, TextModel, Token};

fn main() {
    if let Err(e) = run() {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
}

fn run() -> inference_core::Result<()> {
    let prompt = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let prompt = if prompt.trim().is_empty() {
        "Hello!".to_owned()
    } else {
        prompt
    };

    for backend in inference_core::backends() {
        let availability = backend.available();
        eprintln!(
            "backend {:<6} device {:<5} {}",
            backend.name(),
            backend.device(),
            availability
                .reason()
                .map_or("available".to_owned(), |r| format!("unavailable: {r}"))
        );
    }

    let answer = format!(
        "This is the scripted model of backend-stub answering {prompt:?}. \
         Real answers arrive with the MLX backend."
    );
    let mut script: Vec<Token> = answer
        .split_inclusive(' ')
        .zip(1..)
        .map(|(word, id)| Token::new(id, word))
        .collect();
    script.push(Token::new(0, ""));
    let model = ScriptedModel::builder(script)
        .eos(0)
        .step_delay(Duration::from_millis(30))
        .build()?;

    let mut stream = model.chat(&[Message::user(prompt)], &GenerateOptions::new())?;
    let mut out = std::io::stdout().lock();
    for token in stream.by_ref() {
        let _ = write!(out, "{}", token?.text);
        let _ = out.flush();
    }
    let _ = writeln!(out);
    if let Some(m) = stream.metrics() {
        eprintln!(
            "[{} prompt tokens, {} generated, {:.1} tok/s, finish: {}]",
            m.prompt_tokens,
            m.generated_tokens,
            m.decode_tokens_per_sec,
            stream.finish_reason().map_or("?", |r| r.as_str())
        );
    }
    Ok(())
}

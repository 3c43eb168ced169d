//! Chat sessions: every reply of a multi-turn conversation equals `chat()`
//! with the full history from a fresh cache, while later turns prefill only
//! what the session's KV cache does not hold (where its caches allow).

mod common;

use common::*;
use inference_core::{GenerateOptions, Message, Role, TextModel};

fn reply_ids(stream: &mut inference_core::TokenStream) -> (Vec<u32>, String) {
    let tokens = stream.collect_tokens().unwrap();
    (
        tokens.iter().map(|t| t.id).collect(),
        tokens.iter().map(|t| t.text.as_str()).collect(),
    )
}

/// `expect_reuse`: the model's caches can be cut back to a shared prefix
/// (every layer keeps every position; Gemma's 8-token sliding layers have
/// dropped what an earlier position needs, so its turns reuse the cache only
/// where the conversation's ids extend the cached ones exactly).
fn check(name: &str, expect_reuse: bool) {
    let model = load(&fixture(name));
    let opts = GenerateOptions::new().max_tokens(6);
    let mut session = model.chat_session().unwrap();
    session.reset(Some("You are terse."));
    let mut history = vec![Message::system("You are terse.")];
    let before = model.reused_prompt_tokens();
    for user in ["Hello there", "What is the capital of France?", "Thanks!"] {
        let (ours, text) = reply_ids(&mut session.send(user, &opts).unwrap());
        history.push(Message::user(user));
        let (fresh, fresh_text) = reply_ids(&mut model.chat(&history, &opts).unwrap());
        assert_eq!(ours, fresh, "{name}: reply to {user:?}");
        assert_eq!(text, fresh_text, "{name}: reply text to {user:?}");
        history.push(Message::assistant(text));
        assert_eq!(session.history(), history, "{name}: history");
    }
    assert_eq!(session.history().len(), 7);
    let reused = model.reused_prompt_tokens() - before;
    eprintln!("{name}: {reused} prompt tokens taken from the session cache");
    if expect_reuse {
        assert!(reused > 0, "{name}: later turns reuse the session's cache");
    }

    // A reset forgets the conversation and the cache.
    session.reset(None);
    assert!(session.history().is_empty());
    let before = model.reused_prompt_tokens();
    let (ours, _) = reply_ids(&mut session.send("Hello there", &opts).unwrap());
    let (fresh, _) = reply_ids(&mut model.chat(&[Message::user("Hello there")], &opts).unwrap());
    assert_eq!(ours, fresh, "{name}: after reset");
    assert_eq!(
        model.reused_prompt_tokens(),
        before,
        "{name}: nothing reused"
    );
    assert_eq!(session.history()[0].role, Role::User);
}

#[test]
fn qwen3_three_turns() {
    check("qwen3-f32", true);
}

#[test]
fn gemma3_three_turns() {
    check("gemma3-f32", false);
}

/// An id-driven session: the second turn (the first turn's prompt, its reply
/// and new ids) reuses the cache for everything the first turn fed through
/// the model and gives the ids a fresh call gives; ids that do not extend the
/// cache are prefilled in full.
#[test]
fn id_session_reuses_its_cache_and_matches_a_fresh_call() {
    let model = load(&fixture("qwen3-f32"));
    let opts = GenerateOptions::new().max_tokens(5).ignore_eos(true);
    let ids = |s: &mut inference_core::TokenStream| -> Vec<u32> {
        s.collect_tokens().unwrap().iter().map(|t| t.id).collect()
    };
    let mut session = model.id_session();
    let first: Vec<u32> = (0..20).map(|i| 100 + i * 7).collect();
    let reply = ids(&mut session.send(first.clone(), &opts).unwrap());
    assert_eq!(
        reply,
        ids(&mut model.generate_ids(first.clone(), &opts).unwrap())
    );

    let mut second = first.clone();
    second.extend_from_slice(&reply);
    second.extend([300, 301, 302]);
    let before = model.reused_prompt_tokens();
    let got = ids(&mut session.send(second.clone(), &opts).unwrap());
    // Every prompt id and every reply id but the last (never fed back).
    assert_eq!(
        model.reused_prompt_tokens() - before,
        first.len() + reply.len() - 1
    );
    assert_eq!(
        got,
        ids(&mut model.generate_ids(second.clone(), &opts).unwrap())
    );

    // A different conversation shares no prefix: nothing reused.
    let before = model.reused_prompt_tokens();
    let other: Vec<u32> = (0..10).map(|i| 350 + i).collect();
    let got = ids(&mut session.send(other.clone(), &opts).unwrap());
    assert_eq!(model.reused_prompt_tokens(), before);
    assert_eq!(got, ids(&mut model.generate_ids(other, &opts).unwrap()));
    assert!(session.send(Vec::new(), &opts).is_err(), "no ids");
}

/// A conversation that outgrows the context (256 positions on the fixture)
/// drops its oldest turns, keeping the system message, and the reply equals
/// a fresh `chat()` of what is kept; with `HistoryOverflow::Error` the turn
/// fails instead, and a user message that cannot fit even alone fails too.
#[test]
fn outgrowing_the_context_drops_the_oldest_turns() {
    use inference_core::{Error, HistoryOverflow};
    let model = load(&fixture("qwen3-f32"));
    let opts = GenerateOptions::new().max_tokens(8).ignore_eos(true);
    let long = golden("qwen3-f32")[1].text.clone();
    let turn = &long[..long.len() / 3];
    let mut session = model.chat_session().unwrap();
    session.reset(Some("Be brief."));
    let mut turns_sent = 0;
    while session.dropped_turns() == 0 {
        let mut s = session.send(turn, &opts).unwrap();
        s.collect_tokens().unwrap();
        turns_sent += 1;
        assert!(turns_sent < 20, "never outgrew the context");
    }
    let history = session.history();
    assert_eq!(history[0], Message::system("Be brief."));
    // Dropped before the last turn, which then joined the history.
    assert!(history.len() < 1 + 2 * turns_sent, "{}", history.len());
    assert_eq!(history[history.len() - 2], Message::user(turn));
    // The last reply is the one a fresh chat of the kept history gives.
    let kept = history[..history.len() - 1].to_vec();
    let (fresh, fresh_text) = reply_ids(&mut model.chat(&kept, &opts).unwrap());
    assert_eq!(fresh_text, history[history.len() - 1].content);
    assert_eq!(fresh.len(), 8);

    // The same conversation with the error policy fails the turn instead.
    let mut strict = model.chat_session().unwrap();
    strict.set_history_overflow(HistoryOverflow::Error).unwrap();
    strict.reset(Some("Be brief."));
    let mut failed = false;
    for _ in 0..turns_sent {
        match strict.send(turn, &opts) {
            Ok(mut s) => {
                s.collect_tokens().unwrap();
            }
            Err(Error::ContextOverflow { limit: 256, .. }) => {
                failed = true;
                break;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(failed && strict.dropped_turns() == 0);
    // A message that does not fit alone is an error under either policy,
    // and the history is left as it was.
    let before = session.history();
    let huge = format!("{long} {long}");
    assert!(matches!(
        session.send(&huge, &opts),
        Err(Error::ContextOverflow { .. })
    ));
    assert_eq!(session.history(), before);
}

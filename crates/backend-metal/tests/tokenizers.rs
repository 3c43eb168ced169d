//! Tokenizers and streaming detokenisation: our ids against the Python
//! `tokenizers` package's on the real Qwen3 and Gemma 3 tokenizers (goldens
//! by `scripts/fixtures/make_text_goldens.py`), and `StreamDecoder` on
//! byte-level BPE, SentencePiece (▁ spaces, byte fallback) and the real
//! tokenizers: the pieces always add up to the full decode, and none holds a
//! split character.

mod common;

use common::*;
use inference_text::{ModelTokenizer, StreamDecoder};

/// Decodes `ids` one at a time after `context`; returns the pieces.
fn stream(tok: &ModelTokenizer, context: &[u32], ids: &[u32]) -> Vec<String> {
    let mut d = StreamDecoder::new(&tok.inner, context);
    let mut pieces: Vec<String> = ids.iter().map(|&id| d.step(id).unwrap()).collect();
    pieces.push(d.finish().unwrap());
    pieces
}

/// Streams `ids` after `context` and checks the pieces against the full
/// decode of context + ids (less the context's own text), with no U+FFFD in
/// any piece when the text has none.
fn check_stream(label: &str, tok: &ModelTokenizer, context: &[u32], ids: &[u32]) -> Vec<String> {
    let pieces = stream(tok, context, ids);
    let joined: String = pieces.concat();
    let all: Vec<u32> = context.iter().chain(ids).copied().collect();
    let full = tok.decode(&all).unwrap();
    let before = tok.decode(context).unwrap();
    let expected = full
        .strip_prefix(before.as_str())
        .unwrap_or_else(|| panic!("{label}: context text {before:?} is not a prefix of {full:?}"));
    assert_eq!(joined, expected, "{label}: streamed pieces {pieces:?}");
    if !expected.contains('\u{FFFD}') {
        for p in &pieces {
            assert!(
                !p.contains('\u{FFFD}'),
                "{label}: piece {p:?} of {pieces:?}"
            );
        }
        // Nothing is held back longer than needed: after each id, all the
        // text before an incomplete character at the end has been emitted
        // (a byte-fallback decode of a partial run of byte tokens shows
        // even the run's complete characters as U+FFFD, so what was emitted
        // may go further), and nothing but the final text.
        let mut shown = String::new();
        for (i, p) in pieces[..ids.len()].iter().enumerate() {
            shown.push_str(p);
            let upto: Vec<u32> = context.iter().chain(&ids[..=i]).copied().collect();
            let text = tok.decode(&upto).unwrap();
            let text = text.trim_end_matches('\u{FFFD}');
            let ready = text.strip_prefix(before.as_str()).unwrap_or_default();
            assert!(
                shown.starts_with(ready.trim_end_matches('\u{FFFD}'))
                    && expected.starts_with(&shown),
                "{label}: after id {i}: emitted {shown:?}, decode so far {ready:?}"
            );
        }
    }
    pieces
}

const TRICKY: &[&str] = &[
    "Hello world, the quick brown fox.",
    "  two leading spaces and\ttabs\n\nnew   lines  ",
    "Grüße aus München! naïve café",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 🙂 🚀 🇫🇷 👨‍👩‍👧 — “quotes” … done",
    "def add(a, b):\n    return a + b\n",
];

#[test]
fn stream_decoder_on_byte_level_bpe_fixture() {
    // The fixture's byte-level BPE knows few merges: emoji and CJK are split
    // into single bytes, several tokens per character.
    let tok = ModelTokenizer::from_dir(&fixture("qwen3-f32")).unwrap();
    let mut split_chars = 0;
    for text in TRICKY {
        let ids = tok.encode(text).unwrap();
        split_chars += ids
            .iter()
            .filter(|&&id| tok.decode(&[id]).unwrap().contains('\u{FFFD}'))
            .count();
        check_stream(text, &tok, &[], &ids);
        // After a prompt, as generation streams it.
        let prompt = tok.encode("Answer:").unwrap();
        check_stream(text, &tok, &prompt, &ids);
    }
    assert!(split_chars > 10, "the texts should exercise partial bytes");
}

#[test]
fn stream_decoder_on_sentencepiece_byte_fallback_fixture() {
    let tok = ModelTokenizer::from_dir(&fixture("llama-f32")).unwrap();
    let mut byte_tokens = 0;
    for text in TRICKY {
        // Without the BOS: as generated ids.
        let ids: Vec<u32> = tok
            .encode(text)
            .unwrap()
            .into_iter()
            .filter(|&id| Some(id) != tok.bos)
            .collect();
        byte_tokens += ids
            .iter()
            .filter(|&&id| {
                tok.inner
                    .id_to_token(id)
                    .is_some_and(|t| t.starts_with("<0x"))
            })
            .count();
        let pieces = check_stream(text, &tok, &[], &ids);
        // The leading ▁ of a word after the context is a space, kept.
        let prompt = tok.encode("Answer").unwrap();
        let after = check_stream(text, &tok, &prompt, &ids);
        assert_eq!(pieces.concat().trim_start(), after.concat().trim_start());
    }
    assert!(byte_tokens > 10, "the texts should exercise byte fallback");
}

#[test]
fn stream_decoder_emits_text_before_an_incomplete_character_and_flushes_invalid_bytes() {
    let tok = ModelTokenizer::from_dir(&fixture("llama-f32")).unwrap();
    let byte = |b: u8| tok.inner.token_to_id(&format!("<0x{b:02X}>")).unwrap();
    let hello = tok.inner.token_to_id("▁the").unwrap();
    // "▁the" then 🙂 (F0 9F 99 82) as four byte tokens.
    let ids = [hello, byte(0xF0), byte(0x9F), byte(0x99), byte(0x82)];
    let pieces = stream(&tok, &[hello], &ids);
    assert_eq!(pieces, [" the", "", "", "", "🙂", ""]);
    // Bytes that never complete a character are held back for at most
    // MAX_PENDING tokens, then shown as U+FFFD, as a full decode shows them.
    let bad = [byte(0xF0); 5];
    let pieces = stream(&tok, &[hello], &bad);
    assert_eq!(StreamDecoder::MAX_PENDING, 4);
    assert_eq!(pieces[..3], ["", "", ""]);
    assert!(pieces[3].contains('\u{FFFD}'), "{pieces:?}");
    let all = tok
        .decode(&[hello, bad[0], bad[0], bad[0], bad[0], bad[0]])
        .unwrap();
    assert_eq!(pieces.concat(), all.strip_prefix("the").unwrap());
}

fn real_tokenizer_matches_python(name: &str) {
    let tok = ModelTokenizer::from_dir(&real_tokenizer(name)).unwrap();
    let golden = text_golden(name);
    let rows = golden["encode"].as_array().unwrap();
    assert!(rows.len() >= 10);
    for row in rows {
        let label = format!("{name}/{}", row["name"].as_str().unwrap());
        let text = row["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            json_ids(&row["ids"]),
            "{label}: ids"
        );
        let plain = json_ids(&row["ids_no_special"]);
        assert_eq!(
            tok.inner.encode(text, false).unwrap().get_ids(),
            plain.as_slice(),
            "{label}: ids without special tokens"
        );
        let decoded = row["decoded"].as_str().unwrap();
        assert_eq!(tok.decode(&plain).unwrap(), decoded, "{label}: decode");
        // Streaming the ids gives the same text, piece by piece.
        let pieces = stream(&tok, &[], &plain);
        assert_eq!(pieces.concat(), decoded, "{label}: streamed");
        if !decoded.contains('\u{FFFD}') {
            assert!(
                pieces.iter().all(|p| !p.contains('\u{FFFD}')),
                "{label}: {pieces:?}"
            );
        }
        // And after a context, as in generation.
        let context = tok.inner.encode("Say:", false).unwrap().get_ids().to_vec();
        check_stream(&label, &tok, &context, &plain);
    }
}

#[test]
fn qwen3_tokenizer_matches_python() {
    real_tokenizer_matches_python("qwen3");
}

#[test]
fn gemma3_tokenizer_matches_python() {
    real_tokenizer_matches_python("gemma3");
}

#[test]
fn special_tokens_and_bos_rules_of_the_real_tokenizers() {
    let qwen = ModelTokenizer::from_dir(&real_tokenizer("qwen3")).unwrap();
    assert_eq!(qwen.bos, None);
    assert!(!qwen.adds_bos);
    assert_eq!(qwen.special.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(qwen.is_eos(qwen.inner.token_to_id("<|im_end|>").unwrap()));

    let gemma = ModelTokenizer::from_dir(&real_tokenizer("gemma3")).unwrap();
    assert_eq!(gemma.bos, gemma.inner.token_to_id("<bos>"));
    assert!(gemma.adds_bos);
    assert_eq!(gemma.special.bos_token.as_deref(), Some("<bos>"));
    // A rendered chat prompt that starts with <bos> keeps exactly one.
    let ids = gemma.encode_chat("<bos><start_of_turn>user\nhi").unwrap();
    assert_eq!(ids.iter().filter(|&&i| Some(i) == gemma.bos).count(), 1);
    // One that does not gets one.
    let ids = gemma.encode_chat("<start_of_turn>user\nhi").unwrap();
    assert_eq!(ids.first().copied(), gemma.bos);
    assert_eq!(ids.iter().filter(|&&i| Some(i) == gemma.bos).count(), 1);
}

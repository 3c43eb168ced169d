//! Fine-tuning data as mlx-lm reads it: a directory with `train.jsonl`,
//! `valid.jsonl` and optionally `test.jsonl`, one JSON object a line, each
//! one of
//!
//! - `{"messages": [...], "tools": [...]}`: a conversation rendered with the
//!   model's chat template (`tools` passed to it); the prompt is everything
//!   before the last message, with the assistant's header;
//! - `{"prompt": "...", "completion": "..."}`: rendered as a user and an
//!   assistant message when the model has a chat template (as mlx-lm does),
//!   else the two texts one after the other and an end-of-sequence id;
//! - `{"text": "..."}`: the text, with an end-of-sequence id added when it
//!   does not end with one; no prompt.
//!
//! A line that is none of these is an [`Error::InvalidInput`] naming the
//! file and line.

use std::path::Path;

use inference_core::{Error, Example, Message, RenderOptions, Result, Tokenizer, TrainingData};
use serde::Deserialize;
use serde_json::Value;

/// One line of a data file.
#[derive(Deserialize)]
#[serde(untagged)]
enum Record {
    Chat {
        messages: Vec<Message>,
        #[serde(default)]
        tools: Vec<Value>,
    },
    Completion {
        prompt: String,
        completion: String,
    },
    Text {
        text: String,
    },
}

/// The examples of the data file `path`.
pub fn read_jsonl(path: &Path, tokenizer: &dyn Tokenizer) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |why: String| Error::InvalidInput(format!("{}:{}: {why}", path.display(), n + 1));
        let record: Record = serde_json::from_str(line).map_err(|_| {
            at("not a JSON object with `messages`, `prompt` and `completion`, or `text`".into())
        })?;
        let example = encode(record, tokenizer).map_err(|e| at(e.to_string()))?;
        if example.ids.len() < 2 {
            return Err(at("fewer than two tokens: nothing to predict".into()));
        }
        out.push(example);
    }
    Ok(out)
}

fn with_eos(mut ids: Vec<u32>, tokenizer: &dyn Tokenizer) -> Vec<u32> {
    let eos = tokenizer.eos_token_ids();
    if let Some(&first) = eos.first() {
        if ids.last().is_none_or(|last| !eos.contains(last)) {
            ids.push(first);
        }
    }
    ids
}

fn encode(record: Record, tokenizer: &dyn Tokenizer) -> Result<Example> {
    match record {
        Record::Chat { messages, tools } => {
            let Some((_, earlier)) = messages.split_last() else {
                return Err(Error::InvalidInput("`messages` is empty".into()));
            };
            let opts = RenderOptions::new().tools(tools);
            let ids =
                tokenizer.encode_chat(&messages, &opts.clone().add_generation_prompt(false))?;
            let prompt_len = match earlier.is_empty() {
                true => 0,
                false => tokenizer.encode_chat(earlier, &opts)?.len(),
            };
            Ok(Example { ids, prompt_len })
        }
        Record::Completion { prompt, completion } => {
            let messages = [Message::user(&prompt), Message::assistant(&completion)];
            match tokenizer.encode_chat(
                &messages,
                &RenderOptions::new().add_generation_prompt(false),
            ) {
                Ok(ids) => {
                    let prompt_len = tokenizer
                        .encode_chat(&messages[..1], &RenderOptions::new())?
                        .len();
                    Ok(Example { ids, prompt_len })
                }
                Err(Error::Unsupported { .. }) => {
                    let mut ids = tokenizer.encode(&prompt, true)?;
                    let prompt_len = ids.len();
                    ids.extend(tokenizer.encode(&completion, false)?);
                    Ok(Example {
                        ids: with_eos(ids, tokenizer),
                        prompt_len,
                    })
                }
                Err(e) => Err(e),
            }
        }
        Record::Text { text } => Ok(Example {
            ids: with_eos(tokenizer.encode(&text, true)?, tokenizer),
            prompt_len: 0,
        }),
    }
}

/// The training and validation sets of the data directory `dir`
/// (`train.jsonl`, and `valid.jsonl` when `validate`), and its test set when
/// `test` (`test.jsonl`). A file that is missing, or holds no example, is
/// an [`Error::InvalidInput`] naming it.
pub fn read_dir(
    dir: &Path,
    tokenizer: &dyn Tokenizer,
    validate: bool,
    test: bool,
) -> Result<(TrainingData, Vec<Example>)> {
    let read = |name: &str, wanted: bool| -> Result<Vec<Example>> {
        if !wanted {
            return Ok(Vec::new());
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::InvalidInput(format!(
                "{}: no such file (a data directory holds train.jsonl, valid.jsonl and optionally test.jsonl)",
                path.display()
            )));
        }
        let examples = read_jsonl(&path, tokenizer)?;
        if examples.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{}: no examples",
                path.display()
            )));
        }
        Ok(examples)
    };
    let data = TrainingData {
        train: read("train.jsonl", true)?,
        valid: read("valid.jsonl", validate)?,
    };
    Ok((data, read("test.jsonl", test)?))
}

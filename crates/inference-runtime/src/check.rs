//! The checks every engine makes of a prompt before it is queued.

use inference_core::{Error, GenerateOptions, Result, TokenId};

/// Refuses ids outside a vocabulary of `vocab` ids (an engine would index
/// out of bounds).
pub fn ids_in_vocab(ids: &[TokenId], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(bad) => Err(Error::InvalidInput(format!(
            "token id {bad} is outside the vocabulary ({vocab} ids)"
        ))),
        None => Ok(()),
    }
}

/// Refuses a prompt that is empty, holds ids outside a vocabulary of
/// `vocab` ids, or leaves no room for a token in a context of `limit`
/// positions ([`Error::ContextOverflow`]).
pub fn prompt(prompt: &[TokenId], vocab: usize, limit: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::InvalidInput(
            "the prompt encodes to no tokens".into(),
        ));
    }
    ids_in_vocab(prompt, vocab)?;
    if prompt.len() >= limit {
        return Err(Error::ContextOverflow {
            needed: prompt.len() + 1,
            limit,
        });
    }
    Ok(())
}

/// Refuses a `logit_bias` id outside a vocabulary of `vocab` ids
/// ([`Error::InvalidOption`] naming the id).
pub fn logit_bias_in_vocab(opts: &GenerateOptions, vocab: usize) -> Result<()> {
    match opts.logit_bias.keys().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Error::invalid_option(
            "logit_bias",
            format!("id {id} is outside the vocabulary ({vocab} ids)"),
        )),
        None => Ok(()),
    }
}

/// The options `classify` takes: valid, the bias inside a vocabulary of
/// `vocab` ids, and none it cannot honour (per-token logprobs, templates for
/// raw prompts, stops for a single next token), each refused with
/// [`Error::Unsupported`].
pub fn classify_options(opts: &GenerateOptions, vocab: usize) -> Result<()> {
    opts.validate()?;
    if opts.logprobs || opts.prompt_logprobs {
        return Err(Error::unsupported(
            "logprobs and prompt_logprobs for classify (return_logits gives the whole distribution)",
        ));
    }
    logit_bias_in_vocab(opts, vocab)?;
    if opts.uses_template() {
        return Err(Error::unsupported(
            "template_args, tools and reply_prefix for classify (raw prompts are not templated)",
        ));
    }
    if !opts.stop_tokens.is_empty() || !opts.stop_strings.is_empty() {
        return Err(Error::unsupported(
            "stop_tokens and stop_strings for classify (it returns the next token, whatever it is)",
        ));
    }
    Ok(())
}

/// Refuses a prompt of `classify` longer than `limit` positions.
pub fn classify_prompts(prompts: &[Vec<TokenId>], limit: usize) -> Result<()> {
    match prompts.iter().find(|p| p.len() > limit) {
        Some(p) => Err(Error::ContextOverflow {
            needed: p.len(),
            limit,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_must_be_non_empty_in_vocabulary_and_leave_room() {
        assert!(prompt(&[1, 2], 10, 3).is_ok());
        assert!(matches!(prompt(&[], 10, 3), Err(Error::InvalidInput(_))));
        let e = prompt(&[1, 10], 10, 3).unwrap_err();
        assert!(e.to_string().contains("token id 10"), "{e}");
        assert!(matches!(
            prompt(&[1, 2, 3], 10, 3),
            Err(Error::ContextOverflow {
                needed: 4,
                limit: 3
            })
        ));
    }
}

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

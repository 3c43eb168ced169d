//! Chat sessions' host side: the conversation, what happens when it outgrows
//! the context, and when a turn may reuse the KV cache the previous turn
//! left behind.
//!
//! A [`Conversation`] holds the history on the caller's side. A turn
//! renders the whole history plus the new user message
//! ([`Conversation::begin_turn`]); when that does not fit, the oldest turns
//! are dropped ([`HistoryOverflow::DropOldest`]) or the turn is refused
//! ([`HistoryOverflow::Error`]). The [`Turn`] it returns travels with the
//! engine's job; when the engine's reply ends well it
//! [`commit`](Turn::commit)s the user message and the reply to the history
//! (unless the conversation was reset meanwhile). A turn that is dropped
//! without committing (cancelled, failed, or never run) leaves the history
//! as it was. One turn runs at a time.
//!
//! The engine keeps the KV cache and the ids it holds; [`reusable_prefix`]
//! and [`cached_ids`] are the rule for reusing it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use inference_core::{Error, HistoryOverflow, Message, Result, Role, TokenId};

/// The conversation, with a counter that a reset advances (a turn that
/// finishes after a reset does not join the new conversation).
struct History {
    epoch: u64,
    messages: Vec<Message>,
}

/// What a conversation and its turn in flight share.
struct State {
    history: Mutex<History>,
    /// A turn is queued or streaming.
    busy: AtomicBool,
}

impl State {
    /// The conversation, locked (a poisoned lock still holds it).
    fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A chat session's history and overflow policy.
pub struct Conversation {
    state: Arc<State>,
    overflow: HistoryOverflow,
    /// Turns dropped so far to fit the context.
    dropped: usize,
}

impl Default for Conversation {
    fn default() -> Self {
        Self::new()
    }
}

/// One turn in flight: it clears the session's busy mark when dropped, and
/// joins the history when committed.
pub struct Turn {
    state: Arc<State>,
    epoch: u64,
    /// The user message that joins the history with the reply (none for a
    /// session driven by ids).
    user: Option<Message>,
}

impl Turn {
    /// The turn ended well (on a stop or on `max_tokens`): its user message
    /// and `reply` join the history, unless the conversation was reset
    /// since the turn began.
    pub fn commit(self, reply: String) {
        let mut h = self.state.history();
        if h.epoch == self.epoch {
            if let Some(user) = &self.user {
                h.messages.push(user.clone());
                h.messages.push(Message::assistant(reply));
            }
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.state.busy.store(false, Ordering::Release);
    }
}

impl Conversation {
    /// An empty conversation that drops its oldest turns when it outgrows
    /// the context.
    pub fn new() -> Self {
        Self {
            state: Arc::new(State {
                history: Mutex::new(History {
                    epoch: 0,
                    messages: Vec::new(),
                }),
                busy: AtomicBool::new(false),
            }),
            overflow: HistoryOverflow::default(),
            dropped: 0,
        }
    }

    /// Refused with [`Error::InvalidInput`] while the previous turn is still
    /// queued or streaming.
    pub fn check_idle(&self) -> Result<()> {
        if self.state.busy.load(Ordering::Acquire) {
            return Err(Error::InvalidInput(
                "the previous turn of this session is still streaming".into(),
            ));
        }
        Ok(())
    }

    /// Begins a turn that adds `user`: the prompt is `encode` of the history
    /// and `user`, which must be shorter than `limit` positions. When it is
    /// not, the oldest turns are dropped until it is (the first message
    /// after the leading system messages, and every message up to the next
    /// user message, at a time), unless the policy is
    /// [`HistoryOverflow::Error`] or nothing is left to drop; `check` then
    /// decides (an engine's prompt check refuses a prompt that leaves no
    /// room). A refused prompt changes nothing.
    pub fn begin_turn(
        &mut self,
        user: &str,
        limit: usize,
        mut encode: impl FnMut(&[Message]) -> Result<Vec<TokenId>>,
        check: impl Fn(&[TokenId]) -> Result<()>,
    ) -> Result<(Vec<TokenId>, Turn)> {
        self.check_idle()?;
        let (epoch, mut messages) = {
            let h = self.state.history();
            (h.epoch, h.messages.clone())
        };
        let user = Message::user(user);
        let mut dropped = 0;
        let prompt = loop {
            messages.push(user.clone());
            let prompt = encode(&messages)?;
            messages.pop();
            if prompt.len() < limit
                || self.overflow == HistoryOverflow::Error
                || !drop_oldest_turn(&mut messages)
            {
                break prompt;
            }
            dropped += 1;
        };
        check(&prompt)?;
        if dropped > 0 {
            tracing::info!(
                dropped,
                kept_messages = messages.len(),
                "the conversation outgrew the context: dropped its oldest turns"
            );
            let mut h = self.state.history();
            if h.epoch == epoch {
                h.messages = messages;
            }
            self.dropped += dropped;
        }
        Ok((prompt, self.turn(epoch, Some(user))))
    }

    /// Begins a turn whose prompt the caller built (a session driven by
    /// ids): nothing joins the history.
    pub fn begin_id_turn(&self) -> Result<Turn> {
        self.check_idle()?;
        Ok(self.turn(0, None))
    }

    fn turn(&self, epoch: u64, user: Option<Message>) -> Turn {
        self.state.busy.store(true, Ordering::Release);
        Turn {
            state: Arc::clone(&self.state),
            epoch,
            user,
        }
    }

    /// What to do when the conversation outgrows the context.
    pub fn set_overflow(&mut self, overflow: HistoryOverflow) {
        self.overflow = overflow;
    }

    /// Turns dropped so far to fit the context.
    pub fn dropped_turns(&self) -> usize {
        self.dropped
    }

    /// The messages so far.
    pub fn history(&self) -> Vec<Message> {
        self.state.history().messages.clone()
    }

    /// Clears the history, keeping `system` as its first message when
    /// given; a turn still in flight does not join it.
    pub fn reset(&mut self, system: Option<&str>) {
        let mut h = self.state.history();
        h.epoch += 1;
        h.messages = system.map(Message::system).into_iter().collect();
    }
}

/// Removes the oldest turn of `messages` (the first message after the
/// leading system messages, and every message up to the next user message);
/// `false` when there is no turn to drop.
fn drop_oldest_turn(messages: &mut Vec<Message>) -> bool {
    let Some(first) = messages.iter().position(|m| m.role != Role::System) else {
        return false;
    };
    let end = messages[first + 1..]
        .iter()
        .position(|m| m.role == Role::User)
        .map_or(messages.len(), |i| first + 1 + i);
    messages.drain(first..end);
    true
}

/// How many leading ids of `prompt` a cache holding `cached` can keep: their
/// common prefix, leaving at least one prompt id to prefill (the step that
/// gives the next token's logits).
pub fn reusable_prefix(cached: &[TokenId], prompt: &[TokenId]) -> usize {
    cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len().saturating_sub(1))
}

/// The ids a cache holds after a turn on `prompt` that read back `sampled`
/// and left the cache at `offset` positions (the last sampled id is never
/// fed back, and an end or stop id may not be): the prompt and the sampled
/// ids before `offset`. `None` when `offset` does not fall inside them.
pub fn cached_ids(prompt: &[TokenId], sampled: &[TokenId], offset: usize) -> Option<Vec<TokenId>> {
    if offset < prompt.len() || offset > prompt.len() + sampled.len() {
        return None;
    }
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&sampled[..offset - prompt.len()]);
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One id per message, plus one for the generation prompt.
    fn encode(m: &[Message]) -> Result<Vec<TokenId>> {
        Ok((0..=m.len() as u32).collect())
    }

    fn ok(_: &[TokenId]) -> Result<()> {
        Ok(())
    }

    #[test]
    fn committed_turns_join_the_history_and_dropped_ones_do_not() {
        let mut c = Conversation::new();
        let (prompt, turn) = c.begin_turn("hi", 100, encode, ok).unwrap();
        assert_eq!(prompt, [0, 1]);
        // One turn at a time.
        assert!(c.begin_turn("again", 100, encode, ok).is_err());
        turn.commit("hello".into());
        assert_eq!(
            c.history(),
            [Message::user("hi"), Message::assistant("hello")]
        );
        let (_, turn) = c.begin_turn("more", 100, encode, ok).unwrap();
        drop(turn);
        assert_eq!(
            c.history().len(),
            2,
            "a turn that is not committed changes nothing"
        );
        assert!(c.check_idle().is_ok());
    }

    #[test]
    fn a_reset_turn_does_not_join_the_new_conversation() {
        let mut c = Conversation::new();
        let (_, turn) = c.begin_turn("hi", 100, encode, ok).unwrap();
        c.reset(Some("be brief"));
        turn.commit("late".into());
        assert_eq!(c.history(), [Message::system("be brief")]);
    }

    #[test]
    fn overflow_drops_the_oldest_turns_or_refuses() {
        let mut c = Conversation::new();
        c.reset(Some("sys"));
        for (u, a) in [("a", "1"), ("b", "2"), ("c", "3")] {
            let (_, t) = c.begin_turn(u, 100, encode, ok).unwrap();
            t.commit(a.into());
        }
        // sys + 3 turns + user = 8 messages, 9 ids; a limit of 7 keeps sys + 1 turn + user.
        let (prompt, t) = c.begin_turn("d", 7, encode, ok).unwrap();
        assert_eq!(prompt.len(), 5);
        drop(t);
        assert_eq!(c.dropped_turns(), 2);
        assert_eq!(
            c.history(),
            [
                Message::system("sys"),
                Message::user("c"),
                Message::assistant("3")
            ]
        );
        c.set_overflow(HistoryOverflow::Error);
        let refuse = |p: &[TokenId]| {
            if p.len() >= 3 {
                Err(Error::ContextOverflow {
                    needed: p.len() + 1,
                    limit: 3,
                })
            } else {
                Ok(())
            }
        };
        assert!(matches!(
            c.begin_turn("e", 3, encode, refuse),
            Err(Error::ContextOverflow { .. })
        ));
        assert_eq!(c.history().len(), 3, "a refused turn drops nothing");
        assert!(
            c.check_idle().is_ok(),
            "a refused turn leaves the session idle"
        );
    }

    #[test]
    fn id_turns_never_join_the_history() {
        let c = Conversation::new();
        let t = c.begin_id_turn().unwrap();
        assert!(c.begin_id_turn().is_err());
        t.commit("ignored".into());
        assert!(c.history().is_empty());
        assert!(c.begin_id_turn().is_ok());
    }

    #[test]
    fn the_prefix_rule() {
        assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2, 3, 4]), 3);
        assert_eq!(
            reusable_prefix(&[1, 2, 3], &[1, 2, 3]),
            2,
            "one id is always prefilled"
        );
        assert_eq!(reusable_prefix(&[1, 9], &[1, 2, 3]), 1);
        assert_eq!(reusable_prefix(&[], &[1]), 0);
        assert_eq!(cached_ids(&[1, 2], &[3, 4], 3), Some(vec![1, 2, 3]));
        assert_eq!(cached_ids(&[1, 2], &[3, 4], 4), Some(vec![1, 2, 3, 4]));
        assert_eq!(cached_ids(&[1, 2], &[3], 1), None);
        assert_eq!(cached_ids(&[1, 2], &[3], 4), None);
    }
}

//! # inference-runtime
//!
//! The host-side machinery every engine needs at run time, whatever computes
//! its logits:
//!
//! - [`Worker`]: a thread that owns the model (engines whose arrays belong to
//!   one thread, as MLX's do, build the model on it) and runs queued jobs in
//!   arrival order; dropping the last handle closes the queue and waits for
//!   the job in flight, so no engine work outlives the model.
//! - [`Sequence`]: the per-step bookkeeping of one generated sequence: end of
//!   sequence and stop ids, streaming detokenisation, stop strings, counting.
//!   [`stream_tokens`] hands its tokens to a [`TokenSink`](inference_core::TokenSink)
//!   and notices cancellation; [`Clock`] turns a call's timings into
//!   [`GenerateMetrics`](inference_core::GenerateMetrics).
//! - [`session`]: chat sessions' history, their overflow policy and the rule
//!   for reusing a KV cache between turns.
//! - [`check`]: the checks every engine makes of a prompt before queueing it.
//! - [`logprobs`]: log-probabilities of logits in host memory.
//!
//! `backend-metal`, `backend-llamacpp` and `backend-stub` are built on these pieces;
//! `docs/new-backend.md` says what a backend author writes and what they
//! reuse.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod check;
mod clock;
pub mod dataset;
pub mod logprobs;
pub mod session;
mod steps;
mod worker;

pub use clock::Clock;
pub use steps::{stream_tokens, Sequence, StepError};
pub use worker::{Jobs, Poll, Ready, Worker};

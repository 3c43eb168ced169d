//! [`TokenStream`]: generated tokens, as a blocking iterator and as an async stream.
//!
//! A backend creates a pair with [`TokenStream::channel`], hands the
//! [`TokenStream`] to the caller and feeds the [`TokenSink`] from its engine
//! worker. The sink sees cancellation (the stream dropped, or a
//! [`CancelHandle`] used) and the engine checks it at every step.
//!
//! Before its first token the engine announces the prompt's token ids with
//! [`TokenSink::prompt`]; the consumer reads them with
//! [`TokenStream::prompt_ids`] once the first item has been received.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::stream::{FusedStream, Stream};

use crate::error::{Error, Result};
use crate::types::{FinishReason, GenerateMetrics, Token, TokenId};

/// What the engine sends down the channel.
#[derive(Debug)]
enum Event {
    Prompt(Vec<TokenId>),
    PromptLogprobs(Vec<f32>),
    Token(Token),
    Finished {
        metrics: GenerateMetrics,
        reason: FinishReason,
    },
    Failed(Error),
}

/// Cancels a running generation from anywhere; cheap to clone.
///
/// The engine stops at its next step and the stream ends with
/// [`FinishReason::Cancelled`]; tokens produced before that are still yielded.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// A handle that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the generation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// How a stream ended.
#[derive(Debug, Clone)]
struct Ending {
    reason: FinishReason,
    metrics: Option<GenerateMetrics>,
}

/// The tokens of one generation call.
///
/// It owns its data (`Send + 'static`) and is both a blocking
/// [`Iterator`] and a [`futures::Stream`] of `Result<Token>`; the stream form
/// never blocks an executor. An error ends the stream: it is the last item.
/// Dropping the stream cancels the generation at the engine's next step.
///
/// With `futures::StreamExt` in scope, method calls such as `next` or `map`
/// are ambiguous between the two traits: use [`recv`](Self::recv) in async
/// code, or name the trait (`StreamExt::next(&mut stream)`).
///
/// ```
/// use inference_core::{FinishReason, GenerateMetrics, Token, TokenStream};
///
/// let (sink, stream) = TokenStream::channel();
/// std::thread::spawn(move || {
///     for (i, word) in ["Hello", ",", " world"].into_iter().enumerate() {
///         if sink.send(Token::new(i as u32, word)).is_err() {
///             return; // cancelled
///         }
///     }
///     sink.finish(GenerateMetrics::default(), FinishReason::Stop);
/// });
/// let text: String = stream.map(|t| t.unwrap().text).collect();
/// assert_eq!(text, "Hello, world");
/// ```
#[derive(Debug)]
pub struct TokenStream {
    rx: UnboundedReceiver<Event>,
    cancel: CancelHandle,
    ending: Option<Ending>,
    prompt: Option<Vec<TokenId>>,
    prompt_logprobs: Option<Vec<f32>>,
}

/// The engine's end of a [`TokenStream`].
#[derive(Debug)]
pub struct TokenSink {
    tx: UnboundedSender<Event>,
    cancel: CancelHandle,
}

impl TokenStream {
    /// A connected sink and stream.
    pub fn channel() -> (TokenSink, TokenStream) {
        let (tx, rx) = unbounded();
        let cancel = CancelHandle::new();
        (
            TokenSink {
                tx,
                cancel: cancel.clone(),
            },
            TokenStream {
                rx,
                cancel,
                ending: None,
                prompt: None,
                prompt_logprobs: None,
            },
        )
    }

    /// A stream that yields `error` and ends, for failures found after the
    /// call returned but before any work began.
    pub fn failed(error: Error) -> TokenStream {
        let (sink, stream) = Self::channel();
        sink.fail(error);
        stream
    }

    /// The next item, awaited without blocking the executor: the same as
    /// `StreamExt::next`, without the ambiguity that arises when both
    /// `Iterator` and `StreamExt` are in scope.
    pub async fn recv(&mut self) -> Option<Result<Token>> {
        futures::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// A handle that cancels this generation from elsewhere.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Cancels this generation; the stream then ends with
    /// [`FinishReason::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The metrics of the call, once the stream has ended successfully.
    pub fn metrics(&self) -> Option<&GenerateMetrics> {
        self.ending.as_ref().and_then(|e| e.metrics.as_ref())
    }

    /// Why the generation ended, once the stream has ended.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.ending.as_ref().map(|e| e.reason)
    }

    /// The token ids the model ran as the prompt (after templating, special
    /// tokens included), as the engine announced them with
    /// [`TokenSink::prompt`].
    ///
    /// Available once the first item has been received (or the stream has
    /// ended): the engine announces them before its first token. `None`
    /// before that, and for backends that do not announce them.
    pub fn prompt_ids(&self) -> Option<&[TokenId]> {
        self.prompt.as_deref()
    }

    /// With [`GenerateOptions::prompt_logprobs`](crate::GenerateOptions::prompt_logprobs),
    /// the log-probability (natural log, raw distribution) of each prompt id
    /// after the ids before it: one value per id but the first. Available
    /// once the first item has been received, as [`prompt_ids`](Self::prompt_ids).
    pub fn prompt_logprobs(&self) -> Option<&[f32]> {
        self.prompt_logprobs.as_deref()
    }

    /// Whether the stream has ended.
    pub fn is_finished(&self) -> bool {
        self.ending.is_some()
    }

    /// Drains the stream (blocking) into its tokens; the first error is returned.
    pub fn collect_tokens(&mut self) -> Result<Vec<Token>> {
        Iterator::by_ref(self).collect()
    }

    /// Drains the stream (blocking) into its text; the first error is returned.
    pub fn collect_text(&mut self) -> Result<String> {
        Iterator::by_ref(self).map(|t| t.map(|t| t.text)).collect()
    }

    fn end(&mut self, reason: FinishReason, metrics: Option<GenerateMetrics>) {
        self.ending = Some(Ending { reason, metrics });
    }
}

impl Stream for TokenStream {
    type Item = Result<Token>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ending.is_some() {
            return Poll::Ready(None);
        }
        loop {
            let event = match Pin::new(&mut this.rx).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(event) => event,
            };
            let item = match event {
                // Not an item: remember the ids and look at the next event.
                Some(Event::Prompt(ids)) => {
                    this.prompt = Some(ids);
                    continue;
                }
                Some(Event::PromptLogprobs(lps)) => {
                    this.prompt_logprobs = Some(lps);
                    continue;
                }
                Some(Event::Token(token)) => Some(Ok(token)),
                Some(Event::Finished { metrics, reason }) => {
                    this.end(reason, Some(metrics));
                    None
                }
                Some(Event::Failed(error)) => {
                    this.end(FinishReason::Error, None);
                    Some(Err(error))
                }
                None => {
                    this.end(FinishReason::Error, None);
                    Some(Err(Error::backend(
                        "engine",
                        "the generation ended without reporting a result (worker stopped)",
                    )))
                }
            };
            return Poll::Ready(item);
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, None)
    }
}

impl FusedStream for TokenStream {
    fn is_terminated(&self) -> bool {
        self.ending.is_some()
    }
}

impl Iterator for TokenStream {
    type Item = Result<Token>;

    /// Blocks the calling thread until the next token. In async code use the
    /// [`Stream`] implementation instead.
    fn next(&mut self) -> Option<Self::Item> {
        futures::executor::block_on(futures::future::poll_fn(|cx| {
            Pin::new(&mut *self).poll_next(cx)
        }))
    }
}

impl std::iter::FusedIterator for TokenStream {}

impl TokenSink {
    /// Whether the consumer dropped the stream or cancelled it.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.tx.is_closed()
    }

    /// Announces the prompt's token ids (after templating, special tokens
    /// included) to the consumer, who reads them with
    /// [`TokenStream::prompt_ids`]. Call it once, before the first
    /// [`send`](Self::send); a later call replaces the ids announced before.
    /// [`Error::Cancelled`] when the consumer is gone.
    pub fn prompt(&self, ids: Vec<TokenId>) -> Result<()> {
        self.tx
            .unbounded_send(Event::Prompt(ids))
            .map_err(|_| Error::Cancelled)
    }

    /// Announces the prompt's log-probabilities (see
    /// [`TokenStream::prompt_logprobs`]), before the first
    /// [`send`](Self::send); [`Error::Cancelled`] when the consumer is gone.
    pub fn prompt_logprobs(&self, logprobs: Vec<f32>) -> Result<()> {
        self.tx
            .unbounded_send(Event::PromptLogprobs(logprobs))
            .map_err(|_| Error::Cancelled)
    }

    /// Hands a token to the consumer; [`Error::Cancelled`] when the consumer is
    /// gone. (A cancel handle does not refuse tokens: the engine checks
    /// [`is_cancelled`](Self::is_cancelled) between steps, and a token produced
    /// before that is still delivered and counted.)
    pub fn send(&self, token: Token) -> Result<()> {
        self.tx
            .unbounded_send(Event::Token(token))
            .map_err(|_| Error::Cancelled)
    }

    /// Ends the stream successfully with `metrics` and `reason`.
    pub fn finish(self, metrics: GenerateMetrics, reason: FinishReason) {
        // A consumer that is gone no longer needs the ending.
        let _ = self.tx.unbounded_send(Event::Finished { metrics, reason });
    }

    /// Ends the stream with `error` as its last item.
    pub fn fail(self, error: Error) {
        let _ = self.tx.unbounded_send(Event::Failed(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_with_metrics_and_reason() {
        let (sink, mut stream) = TokenStream::channel();
        sink.send(Token::new(1, "a")).unwrap();
        sink.send(Token::new(2, "b")).unwrap();
        let m = GenerateMetrics::from_timings(
            3,
            2,
            Default::default(),
            Default::default(),
            Default::default(),
        );
        sink.finish(m.clone(), FinishReason::Length);
        assert!(stream.metrics().is_none());
        assert_eq!(stream.collect_text().unwrap(), "ab");
        assert_eq!(stream.metrics(), Some(&m));
        assert_eq!(stream.finish_reason(), Some(FinishReason::Length));
        assert!(stream.next().is_none());
    }

    #[test]
    fn error_is_the_last_item() {
        let (sink, mut stream) = TokenStream::channel();
        sink.send(Token::new(1, "a")).unwrap();
        sink.fail(Error::ContextOverflow {
            needed: 9,
            limit: 8,
        });
        assert!(stream.next().unwrap().is_ok());
        assert!(matches!(
            stream.next(),
            Some(Err(Error::ContextOverflow { .. }))
        ));
        assert!(stream.next().is_none());
        assert_eq!(stream.finish_reason(), Some(FinishReason::Error));
    }

    #[test]
    fn dropped_sink_is_an_error_not_a_silent_end() {
        let (sink, mut stream) = TokenStream::channel();
        drop(sink);
        assert!(matches!(stream.next(), Some(Err(Error::Backend { .. }))));
        assert!(stream.next().is_none());
    }

    #[test]
    fn drop_and_handle_cancel_the_sink() {
        let (sink, stream) = TokenStream::channel();
        assert!(!sink.is_cancelled());
        drop(stream);
        assert!(sink.is_cancelled());
        assert!(matches!(
            sink.send(Token::new(0, "x")),
            Err(Error::Cancelled)
        ));

        let (sink, mut stream) = TokenStream::channel();
        stream.cancel_handle().cancel();
        assert!(sink.is_cancelled());
        sink.send(Token::new(0, "x")).unwrap();
        sink.finish(GenerateMetrics::default(), FinishReason::Cancelled);
        assert_eq!(stream.collect_text().unwrap(), "x");
        assert_eq!(stream.finish_reason(), Some(FinishReason::Cancelled));
    }

    #[test]
    fn prompt_ids_arrive_with_the_first_item() {
        let (sink, mut stream) = TokenStream::channel();
        assert_eq!(stream.prompt_ids(), None);
        sink.prompt(vec![5, 6, 7]).unwrap();
        sink.send(Token::new(1, "a")).unwrap();
        // Announced, but not yet received.
        assert_eq!(stream.prompt_ids(), None);
        assert_eq!(stream.next().unwrap().unwrap(), Token::new(1, "a"));
        assert_eq!(stream.prompt_ids(), Some(&[5, 6, 7][..]));
        sink.finish(GenerateMetrics::default(), FinishReason::Stop);
        assert!(stream.next().is_none());
        assert_eq!(stream.prompt_ids(), Some(&[5, 6, 7][..]));
    }

    #[test]
    fn prompt_ids_of_a_call_that_yields_no_token() {
        // The prompt event is not an item: a stream that ends at once still
        // reports its prompt, and yields nothing for it.
        let (sink, mut stream) = TokenStream::channel();
        sink.prompt(vec![1, 2]).unwrap();
        sink.finish(GenerateMetrics::default(), FinishReason::Stop);
        assert!(stream.next().is_none());
        assert_eq!(stream.prompt_ids(), Some(&[1, 2][..]));
        assert_eq!(stream.finish_reason(), Some(FinishReason::Stop));

        // A later announcement replaces the earlier one.
        let (sink, mut stream) = TokenStream::channel();
        sink.prompt(vec![1]).unwrap();
        sink.prompt(vec![3, 4]).unwrap();
        sink.finish(GenerateMetrics::default(), FinishReason::Length);
        assert_eq!(stream.collect_tokens().unwrap(), Vec::new());
        assert_eq!(stream.prompt_ids(), Some(&[3, 4][..]));
    }

    #[test]
    fn prompt_to_a_dropped_stream_is_cancelled() {
        let (sink, stream) = TokenStream::channel();
        drop(stream);
        assert!(matches!(sink.prompt(vec![1]), Err(Error::Cancelled)));
    }

    #[test]
    fn async_consumers_see_the_prompt_too() {
        let (sink, mut stream) = TokenStream::channel();
        sink.prompt(vec![9]).unwrap();
        sink.send(Token::new(1, "x")).unwrap();
        sink.finish(GenerateMetrics::default(), FinishReason::Stop);
        let first = futures::executor::block_on(stream.recv());
        assert_eq!(first.unwrap().unwrap().text, "x");
        assert_eq!(stream.prompt_ids(), Some(&[9][..]));
    }
}

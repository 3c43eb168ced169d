//! TokenStream as a blocking iterator and as an async stream, and
//! cancellation both ways, on the scripted model.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use backend_stub::ScriptedModel;
use futures::executor::{block_on, LocalPool};
use futures::task::LocalSpawnExt;
use inference_core::{
    FinishReason, GenerateMetrics, GenerateOptions, TextModel, Token, TokenStream,
};

fn slow_model() -> ScriptedModel {
    let script = (1..=5).map(|i| Token::new(i, format!(" w{i}"))).collect();
    ScriptedModel::builder(script)
        .step_delay(Duration::from_millis(2))
        .build()
        .unwrap()
}

#[test]
fn iterator_yields_every_token_then_metrics() {
    let model = slow_model();
    let mut stream = model
        .generate("a b c", &GenerateOptions::new().max_tokens(7))
        .unwrap();
    let ids: Vec<u32> = stream.by_ref().map(|t| t.unwrap().id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 1, 2]);
    assert_eq!(stream.finish_reason(), Some(FinishReason::Length));
    let m = stream.metrics().unwrap();
    assert_eq!((m.prompt_tokens, m.generated_tokens), (3, 7));
}

#[test]
fn stream_yields_the_same_under_an_executor() {
    let model = slow_model();
    let opts = GenerateOptions::new().max_tokens(7);
    let via_iter: Vec<Token> = model
        .generate("x", &opts)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut stream = model.generate("x", &opts).unwrap();
    let via_stream: Vec<Token> = block_on(async {
        use futures::StreamExt;
        let mut out = Vec::new();
        while let Some(t) = StreamExt::next(&mut stream).await {
            out.push(t.unwrap());
        }
        out
    });
    let mut stream = model.generate("x", &opts).unwrap();
    let mut via_recv = Vec::new();
    block_on(async {
        while let Some(t) = stream.recv().await {
            via_recv.push(t.unwrap());
        }
    });
    assert_eq!(via_recv, via_stream);
    assert_eq!(via_iter, via_stream);
    assert_eq!(stream.finish_reason(), Some(FinishReason::Length));
}

/// On a single-threaded executor, a task awaiting tokens must let other tasks
/// run. Here the producer sends nothing until another task on the same
/// executor has run; a stream that blocked the executor would deadlock.
#[test]
fn awaiting_a_stream_never_blocks_the_executor() {
    let (sink, mut stream) = TokenStream::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let producer = thread::spawn(move || {
        go_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the other task never ran");
        sink.send(Token::new(7, "ok")).unwrap();
        sink.finish(GenerateMetrics::default(), FinishReason::Stop);
    });
    let mut pool = LocalPool::new();
    let consumer = pool
        .spawner()
        .spawn_local_with_handle(async move {
            let t = stream.recv().await.unwrap().unwrap();
            assert!(stream.recv().await.is_none());
            t
        })
        .unwrap();
    pool.spawner()
        .spawn_local(async move {
            go_tx.send(()).unwrap();
        })
        .unwrap();
    let token = pool.run_until(consumer);
    assert_eq!(token, Token::new(7, "ok"));
    producer.join().unwrap();
}

#[test]
fn dropping_the_stream_cancels_the_generation() {
    let model = slow_model();
    let mut stream = model
        .generate("x", &GenerateOptions::new().max_tokens(10_000))
        .unwrap();
    stream.next().unwrap().unwrap();
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        if let Some(m) = model.metrics() {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the cancelled call never finished"
        );
        thread::sleep(Duration::from_millis(2));
    };
    assert!(m.generated_tokens < 100, "generated {}", m.generated_tokens);
}

#[test]
fn a_cancel_handle_stops_it_from_another_thread() {
    let model = slow_model();
    let mut stream = model
        .generate("x", &GenerateOptions::new().max_tokens(10_000))
        .unwrap();
    let handle = stream.cancel_handle();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        handle.cancel();
    });
    let n = stream.by_ref().map(Result::unwrap).count();
    canceller.join().unwrap();
    assert!(n > 0 && n < 1_000, "{n} tokens");
    assert_eq!(stream.finish_reason(), Some(FinishReason::Cancelled));
    assert_eq!(stream.metrics().unwrap().generated_tokens, n);
}

#[test]
fn conformance_kit_passes_on_the_scripted_model() {
    // A step delay makes the long calls of the cancellation checks take long
    // enough (200 × 1 ms) for cancellation to be observable.
    let script = [
        "Paris", " is", " the", " capital", " of", " France", ".", "",
    ]
    .iter()
    .zip(1..)
    .map(|(w, id)| Token::new(id, *w))
    .collect();
    let model = ScriptedModel::builder(script)
        .eos(8)
        .step_delay(Duration::from_millis(1))
        .build()
        .unwrap();
    inference_core::conformance::assert_conformance(
        &model,
        &inference_core::conformance::ConformanceConfig::default().threads(8),
    );
}

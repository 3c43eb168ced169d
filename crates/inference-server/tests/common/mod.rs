//! What the server's integration tests share: scripted models and a server
//! on a free loopback port.

#![allow(dead_code)]

use std::sync::Arc;

use backend_stub::ScriptedModel;
use inference_core::{TextModel, Token};
use inference_server::{ServedModel, ServerConfig};

/// A running server (on its own runtime) and its base URL.
pub struct Server {
    pub base: String,
    _runtime: tokio::runtime::Runtime,
}

/// Serves `models` with `config` on 127.0.0.1, on a free port.
pub fn start(models: Vec<ServedModel>, config: ServerConfig) -> Server {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = inference_server::router(models, config);
    runtime.spawn(inference_server::serve(
        listener,
        app,
        std::future::pending(),
    ));
    Server {
        base,
        _runtime: runtime,
    }
}

/// A scripted model answering `texts` (ids 1, 2, …, then end of sequence),
/// reporting `model_type` and rendering tools instead of refusing them.
pub fn scripted(texts: &[&str], model_type: &str) -> Arc<dyn TextModel> {
    let mut script: Vec<Token> = (1..).zip(texts).map(|(id, t)| Token::new(id, *t)).collect();
    script.push(Token::new(0, ""));
    Arc::new(
        ScriptedModel::builder(script)
            .eos(0)
            .model_type(model_type)
            .renders_tools(true)
            .build()
            .unwrap(),
    )
}

//! `infer serve`: the OpenAI-compatible server (`inference-server`) over one
//! loaded model, until Ctrl-C or SIGTERM (in-flight responses finish first).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use inference_server::{ReasoningField, ServedModel, ServerConfig};

use crate::args::ModelArgs;
use crate::error::CliError;
use crate::load;

/// `infer serve`'s flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// The port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// Requests to /v1/* need `Authorization: Bearer KEY` [default:
    /// $INFER_API_KEY].
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// Requests that may wait for a slot; more are answered 429.
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,

    /// Requests decoded together (the MLX backend batches them) [default: 32].
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,

    /// An origin allowed by CORS (repeatable; `*` for any).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,

    /// The field of a thinking model's reasoning: reasoning_content
    /// (DeepSeek, vLLM, llama.cpp) or reasoning (mlx-lm).
    #[arg(long, value_name = "NAME", default_value = "reasoning_content")]
    pub reasoning_field: String,

    /// Seconds a request may take before it ends with an error.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,

    /// Bytes of finished requests' KV caches kept for later prompts that
    /// share their prefix (0: none) [default: the backend's].
    #[arg(long, value_name = "BYTES")]
    pub prompt_cache_bytes: Option<u64>,

    /// The largest request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    pub max_body: usize,

    /// Write the address actually bound to this file once listening (for
    /// scripts that start the server on port 0).
    #[arg(long, value_name = "FILE", hide = true)]
    pub address_file: Option<PathBuf>,
}

/// Loads the model and serves it.
pub fn run(args: &ServeArgs, quiet: bool) -> Result<(), CliError> {
    let reasoning_field = match args.reasoning_field.as_str() {
        "reasoning_content" => ReasoningField::ReasoningContent,
        "reasoning" => ReasoningField::Reasoning,
        other => {
            return Err(CliError::Usage(format!(
                "--reasoning-field must be reasoning_content or reasoning, got {other:?}"
            )))
        }
    };
    let request_timeout = match args.timeout {
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(CliError::Usage(format!(
                "--timeout must be a positive number of seconds, got {s}"
            )))
        }
        None => None,
    };
    let mut opts = args.model.load_options()?;
    if let Some(n) = args.max_queue {
        opts = opts.max_queue(n);
    }
    if let Some(n) = args.parallel {
        opts = opts.parallel_slots(n);
    }
    if let Some(n) = args.prompt_cache_bytes {
        opts = opts.prompt_cache_bytes(n);
    }
    let (path, _) = load::resolve_model(args.model.model.as_deref())?;
    let id = load::display_name(&path);
    let loaded = load::load(&args.model, opts, quiet)?;
    if loaded.model.info().rank > 0 {
        // Tensor parallel: rank 0 serves, this rank runs its calls
        // alongside it until rank 0 stops (Ctrl-C is rank 0's to handle:
        // it finishes its requests, then the ranks stop together).
        crate::interrupt::Interrupt::install()?.ignore();
        return Ok(loaded.model.follow()?);
    }
    let model: Arc<dyn inference_core::TextModel> = Arc::from(loaded.model);
    let config = ServerConfig {
        api_key: args.api_key.clone().or_else(|| {
            std::env::var("INFER_API_KEY")
                .ok()
                .filter(|k| !k.is_empty())
        }),
        cors_origins: args.cors_origins.clone(),
        max_body_bytes: args.max_body,
        reasoning_field,
        request_timeout,
    };
    let app = inference_server::router(vec![ServedModel::new(id.clone(), model)], config);
    // Request submissions (templating, tokenising) run on blocking threads:
    // a bounded pool, so that a burst does not leave hundreds of idle
    // threads (and their stacks) behind.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .map_err(|e| CliError::io("cannot start the server's runtime", e))?;
    runtime.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| CliError::io(format!("cannot listen on {addr}"), e))?;
        let bound: SocketAddr = listener
            .local_addr()
            .map_err(|e| CliError::io("cannot read the bound address", e))?;
        if let Some(file) = &args.address_file {
            std::fs::write(file, bound.to_string())
                .map_err(|e| CliError::io(format!("cannot write {}", file.display()), e))?;
        }
        eprintln!(
            "serving {id} ({}, {}) on http://{bound} (chat page at /, API at /v1)",
            loaded.backend, loaded.device
        );
        inference_server::serve(listener, app, shutdown_signal())
            .await
            .map_err(|e| CliError::io("the server stopped", e))
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: in-flight responses finish first");
}

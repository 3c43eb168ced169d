//! The server's counters, rendered as Prometheus text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use inference_core::{GenerateMetrics, QueueStatus};

/// Upper bounds of the time-to-first-token histogram, in seconds.
const TTFT_BUCKETS: [f64; 10] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// (path, status) → requests.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
    ttft_count: AtomicU64,
    /// Microseconds.
    ttft_sum_us: AtomicU64,
}

impl Metrics {
    pub(crate) fn request(&self, path: &str, status: u16) {
        // Unknown paths count as one, so that scans do not grow the map.
        let known = [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/health",
            "/metrics",
            "/",
        ];
        let path = if known.contains(&path) { path } else { "other" };
        let mut map = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry((path.to_owned(), status)).or_default() += 1;
    }

    pub(crate) fn first_token(&self, after: Duration) {
        let s = after.as_secs_f64();
        for (b, bound) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            if s <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
        self.ttft_sum_us.fetch_add(
            u64::try_from(after.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn usage(&self, m: Option<&GenerateMetrics>) {
        if let Some(m) = m {
            self.prompt_tokens
                .fetch_add(m.prompt_tokens as u64, Ordering::Relaxed);
            self.cached_tokens
                .fetch_add(m.cached_prompt_tokens as u64, Ordering::Relaxed);
            self.completion_tokens
                .fetch_add(m.generated_tokens as u64, Ordering::Relaxed);
        }
    }

    /// Prometheus text, with each model's queue now.
    pub(crate) fn render(&self, queues: &[(String, QueueStatus)]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP infer_requests_total HTTP requests by path and status."
        );
        let _ = writeln!(out, "# TYPE infer_requests_total counter");
        for ((path, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "infer_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}"
            );
        }
        for (name, help, v) in [
            (
                "infer_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &self.prompt_tokens,
            ),
            (
                "infer_cached_prompt_tokens_total",
                "Prompt tokens taken from a KV cache.",
                &self.cached_tokens,
            ),
            (
                "infer_completion_tokens_total",
                "Tokens generated.",
                &self.completion_tokens,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP infer_time_to_first_token_seconds Time from a request to its first token."
        );
        let _ = writeln!(out, "# TYPE infer_time_to_first_token_seconds histogram");
        for (b, bound) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            let _ = writeln!(
                out,
                "infer_time_to_first_token_seconds_bucket{{le=\"{bound}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.ttft_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "infer_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "infer_time_to_first_token_seconds_sum {}",
            self.ttft_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "infer_time_to_first_token_seconds_count {count}");
        let _ = writeln!(out, "# HELP infer_queue_depth Requests waiting to start, by model.\n# TYPE infer_queue_depth gauge");
        for (model, q) in queues {
            let _ = writeln!(out, "infer_queue_depth{{model=\"{model}\"}} {}", q.waiting);
        }
        let _ = writeln!(out, "# HELP infer_batch_size Requests running together, by model.\n# TYPE infer_batch_size gauge");
        for (model, q) in queues {
            let _ = writeln!(out, "infer_batch_size{{model=\"{model}\"}} {}", q.running);
        }
        out
    }
}

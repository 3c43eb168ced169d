//! Writing results: streamed text on stdout, statistics on stderr.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::HumanBytes;
use inference_core::{FinishReason, GenerateMetrics};

use crate::error::CliError;

/// Set on the ranks of a tensor-parallel group other than rank 0, which
/// compute alongside it but leave the printing to it.
static SILENT: AtomicBool = AtomicBool::new(false);

/// Stops [`stream_out`] and [`json_out`] from writing (a rank other than 0).
pub fn silence() {
    SILENT.store(true, Ordering::Relaxed);
}

/// Writes `text` to stdout at once (no buffering until the line ends).
/// `Ok(false)` when stdout is closed (e.g. `infer … | head -1`): the caller
/// then stops generating.
pub fn stream_out(text: &str) -> Result<bool, CliError> {
    if SILENT.load(Ordering::Relaxed) {
        return Ok(true);
    }
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::io("cannot write to stdout", e)),
    }
}

/// Writes `value` as one line of JSON on stdout.
pub fn json_out(value: &impl serde::Serialize) -> Result<(), CliError> {
    if SILENT.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = io::stdout().lock();
    let written = serde_json::to_writer(&mut out, value)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::io("cannot write to stdout", e)),
    }
}

/// The statistics line of one generation, e.g.
/// `12 prompt tokens (840.1 tok/s), 64 generated in 0.52 s (121.4 tok/s),
/// finish: length, peak memory 312.40 MiB, active 250.00 MiB`.
pub fn stats_line(m: &GenerateMetrics, reason: Option<FinishReason>) -> String {
    let reason = reason.map_or("unknown", FinishReason::as_str);
    let memory = if m.peak_memory_bytes == 0 && m.active_memory_bytes == 0 {
        "memory unknown".to_owned()
    } else {
        format!(
            "peak memory {}, active {}",
            HumanBytes(m.peak_memory_bytes),
            HumanBytes(m.active_memory_bytes)
        )
    };
    format!(
        "{} prompt tokens ({:.1} tok/s), {} generated in {:.2} s ({:.1} tok/s), finish: {reason}, {memory}",
        m.prompt_tokens,
        m.prefill_tokens_per_sec,
        m.generated_tokens,
        m.total_duration.as_secs_f64(),
        m.decode_tokens_per_sec,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stats_line_has_counts_rates_reason_and_memory() {
        let m = GenerateMetrics::from_timings(
            12,
            5,
            Duration::from_millis(100),
            Duration::from_millis(400),
            Duration::from_millis(500),
        );
        let line = stats_line(&m, Some(FinishReason::Length));
        assert_eq!(
            line,
            "12 prompt tokens (120.0 tok/s), 5 generated in 0.50 s (10.0 tok/s), \
             finish: length, memory unknown"
        );
        let line = stats_line(&m.with_memory(3 << 20, 1 << 20), None);
        assert!(
            line.ends_with("finish: unknown, peak memory 3.00 MiB, active 1.00 MiB"),
            "{line}"
        );
    }
}

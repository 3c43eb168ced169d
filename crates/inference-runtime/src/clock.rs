//! [`Clock`]: a call's timings, as the metrics report them.

use std::time::{Duration, Instant};

use inference_core::GenerateMetrics;

/// When a call was queued, when its work started and when its first token
/// was read back: prefill is start to first token, decode first token to
/// now, and the total counts the time spent queued.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    queued: Instant,
    started: Instant,
    first_token: Option<Instant>,
}

impl Clock {
    /// A clock for a call queued at `queued` whose work starts now.
    pub fn start(queued: Instant) -> Self {
        Self {
            queued,
            started: Instant::now(),
            first_token: None,
        }
    }

    /// Notes that a token was read back (only the first one counts).
    pub fn token(&mut self) {
        self.first_token.get_or_insert_with(Instant::now);
    }

    /// When the first token was read back, if one was.
    pub fn first_token(&self) -> Option<Instant> {
        self.first_token
    }

    /// The metrics of `prompt_tokens` prefilled and `generated` tokens
    /// decoded, timed until now.
    pub fn metrics(&self, prompt_tokens: usize, generated: usize) -> GenerateMetrics {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        let prefill = first.saturating_duration_since(self.started);
        let decode: Duration = now.saturating_duration_since(first);
        GenerateMetrics::from_timings(
            prompt_tokens,
            generated,
            prefill,
            decode,
            now.saturating_duration_since(self.queued.min(self.started)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_ends_at_the_first_token_and_the_total_counts_the_queue() {
        let queued = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let mut clock = Clock::start(queued);
        std::thread::sleep(Duration::from_millis(20));
        clock.token();
        let first = clock.first_token().unwrap();
        clock.token();
        assert_eq!(
            clock.first_token(),
            Some(first),
            "only the first token counts"
        );
        std::thread::sleep(Duration::from_millis(20));
        let m = clock.metrics(7, 3);
        assert_eq!((m.prompt_tokens, m.generated_tokens), (7, 3));
        assert!(m.prefill_duration >= Duration::from_millis(20), "{m:?}");
        assert!(m.decode_duration >= Duration::from_millis(20), "{m:?}");
        assert!(
            m.total_duration >= m.prefill_duration + m.decode_duration + Duration::from_millis(20),
            "{m:?}"
        );
    }

    #[test]
    fn without_a_token_everything_is_prefill() {
        let clock = Clock::start(Instant::now());
        std::thread::sleep(Duration::from_millis(10));
        let m = clock.metrics(1, 0);
        assert!(m.prefill_duration >= Duration::from_millis(10), "{m:?}");
        assert_eq!(m.decode_duration, Duration::ZERO);
    }
}

//! Ctrl-C: cancels the generation in progress, or leaves when there is none.
//!
//! While a [`Watch`] is alive, Ctrl-C cancels its generation through the
//! stream's [`CancelHandle`] (the engine stops at its next step and the
//! stream ends with `cancelled`), and the command decides what follows:
//! `generate` prints what it has and exits with 130, `chat` drops back to its
//! prompt. With no generation in progress (loading, waiting for input) the
//! process exits with 130 at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use inference_core::CancelHandle;

use crate::error::{CliError, EXIT_INTERRUPTED};

/// The process's Ctrl-C state.
#[derive(Debug, Default)]
pub struct Interrupt {
    current: Mutex<Option<CancelHandle>>,
    hit: AtomicBool,
    /// Ctrl-C does nothing (a tensor-parallel rank other than 0: rank 0
    /// decides, and the ranks end its call together).
    ignored: AtomicBool,
}

/// Cancels one generation on Ctrl-C while it lives.
#[derive(Debug)]
pub struct Watch<'a> {
    interrupt: &'a Interrupt,
}

impl Interrupt {
    /// The process-wide state, with the Ctrl-C handler installed on first use.
    pub fn install() -> Result<&'static Interrupt, CliError> {
        static STATE: OnceLock<Interrupt> = OnceLock::new();
        static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
        let state = STATE.get_or_init(Interrupt::default);
        INSTALLED
            .get_or_init(|| {
                ctrlc::set_handler(move || {
                    if !state.on_signal() {
                        std::process::exit(i32::from(EXIT_INTERRUPTED));
                    }
                })
                .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| CliError::Input(format!("cannot install the Ctrl-C handler: {e}")))?;
        Ok(state)
    }

    /// Routes Ctrl-C to `handle` until the returned [`Watch`] is dropped, and
    /// forgets earlier Ctrl-Cs.
    pub fn watch(&self, handle: CancelHandle) -> Watch<'_> {
        self.hit.store(false, Ordering::SeqCst);
        *self.lock() = Some(handle);
        Watch { interrupt: self }
    }

    /// Whether Ctrl-C cancelled a generation since the last
    /// [`watch`](Self::watch).
    pub fn was_hit(&self) -> bool {
        self.hit.load(Ordering::SeqCst)
    }

    /// From now on Ctrl-C does nothing in this process.
    pub fn ignore(&self) {
        self.ignored.store(true, Ordering::SeqCst);
    }

    /// Handles one Ctrl-C: cancels the watched generation and answers `true`,
    /// or answers `false` when none is watched (the caller then exits).
    fn on_signal(&self) -> bool {
        if self.ignored.load(Ordering::SeqCst) {
            return true;
        }
        match self.lock().as_ref() {
            Some(handle) => {
                handle.cancel();
                self.hit.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CancelHandle>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        *self.interrupt.lock() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_cancels_the_watched_generation_only() {
        let state = Interrupt::default();
        // Nothing watched: the caller must exit.
        assert!(!state.on_signal());
        assert!(!state.was_hit());

        let handle = CancelHandle::new();
        {
            let _watch = state.watch(handle.clone());
            assert!(state.on_signal());
            assert!(handle.is_cancelled());
            assert!(state.was_hit());
        }
        // The watch is gone: back to exiting.
        assert!(!state.on_signal());

        // A new watch starts clean.
        let other = CancelHandle::new();
        let _watch = state.watch(other.clone());
        assert!(!state.was_hit());
        assert!(!other.is_cancelled());
    }
}

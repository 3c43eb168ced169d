//! [`Worker`]: the thread that owns a model and runs its jobs in order.

use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Mutex, PoisonError};
use std::thread;

use inference_core::{Error, Result};

/// A model's worker thread and the only sender of its jobs.
///
/// Jobs run one at a time, in the order they were sent. When the last holder
/// (the model, or a chat session that outlives it) drops the worker, the job
/// queue closes, the thread finishes the job in flight and returns (freeing
/// whatever it owns), and the drop waits for that: no engine work may still
/// be running when the process exits and the engine's own globals are torn
/// down (with MLX, that race corrupted the heap at exit).
pub struct Worker<J> {
    /// The backend's name, for errors.
    backend: String,
    jobs: Mutex<Option<Sender<J>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

/// The worker's way to say that it is ready (or that it failed to become
/// ready), once, before it serves jobs.
pub struct Ready<T>(SyncSender<T>);

impl<T> Ready<T> {
    /// Reports `value` to [`Worker::start`]'s caller.
    pub fn send(self, value: T) {
        // The caller waits for this; if it has gone, nobody needs the value.
        let _ = self.0.send(value);
    }
}

/// The jobs a worker receives, in order; iteration ends when the last
/// [`Worker`] handle is dropped.
pub struct Jobs<J>(Receiver<J>);

/// What [`Jobs::poll`] found.
#[derive(Debug)]
pub enum Poll<J> {
    /// A job.
    Job(J),
    /// No job came in time (or none was waiting, without a wait).
    Empty,
    /// Every [`Worker`] handle was dropped and no job is left.
    Closed,
}

impl<J> Jobs<J> {
    /// The next job: waiting for one up to `wait` (`None` waits as long as
    /// it takes, a zero duration does not wait).
    pub fn poll(&self, wait: Option<std::time::Duration>) -> Poll<J> {
        use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
        match wait {
            None => match self.0.recv() {
                Ok(job) => Poll::Job(job),
                Err(_) => Poll::Closed,
            },
            Some(d) if d.is_zero() => match self.0.try_recv() {
                Ok(job) => Poll::Job(job),
                Err(TryRecvError::Empty) => Poll::Empty,
                Err(TryRecvError::Disconnected) => Poll::Closed,
            },
            Some(d) => match self.0.recv_timeout(d) {
                Ok(job) => Poll::Job(job),
                Err(RecvTimeoutError::Timeout) => Poll::Empty,
                Err(RecvTimeoutError::Disconnected) => Poll::Closed,
            },
        }
    }
}

impl<J> IntoIterator for Jobs<J> {
    type Item = J;
    type IntoIter = std::sync::mpsc::IntoIter<J>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<J: Send + 'static> Worker<J> {
    /// Starts a thread named `thread_name` running `body`, and waits until
    /// `body` reports through its [`Ready`] (typically: the model is built,
    /// or why it could not be). `body` then serves its [`Jobs`].
    ///
    /// Fails with [`Error::Backend`] (naming `backend`) when the thread
    /// cannot start or ends without reporting.
    pub fn start<T: Send + 'static>(
        backend: &str,
        thread_name: &str,
        body: impl FnOnce(Ready<T>, Jobs<J>) + Send + 'static,
    ) -> Result<(Self, T)> {
        let (ready_tx, ready_rx) = sync_channel::<T>(1);
        let (jobs, queue) = channel::<J>();
        let handle = thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || body(Ready(ready_tx), Jobs(queue)))
            .map_err(|e| Error::backend(backend, format!("cannot start the model worker: {e}")))?;
        let worker = Self {
            backend: backend.to_owned(),
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(handle)),
        };
        match ready_rx.recv() {
            Ok(value) => Ok((worker, value)),
            Err(_) => Err(Error::backend(
                backend,
                "the model worker stopped while loading",
            )),
        }
    }

    /// Queues `job`; fails with [`Error::Backend`] when the worker has
    /// stopped.
    pub fn send(&self, job: J) -> Result<()> {
        let stopped = || Error::backend(&self.backend, "the model worker has stopped");
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())
    }

    /// The name of the backend the worker serves.
    pub fn backend(&self) -> &str {
        &self.backend
    }
}

impl<J> std::fmt::Debug for Worker<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<J> Drop for Worker<J> {
    fn drop(&mut self) {
        drop(
            self.jobs
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let handle = self
            .thread
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            // The worker never holds its own handle, but guard against joining
            // ourselves all the same.
            if handle.thread().id() != thread::current().id() && handle.join().is_err() {
                tracing::warn!(backend = %self.backend, "the model worker panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn jobs_run_in_order_and_drop_waits_for_the_one_in_flight() {
        let done = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (d, s) = (Arc::clone(&done), Arc::clone(&seen));
        let (worker, ready) = Worker::<u32>::start("test", "test-worker", move |ready, jobs| {
            ready.send("ready");
            for job in jobs {
                thread::sleep(Duration::from_millis(5));
                s.lock().unwrap().push(job);
                d.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();
        assert_eq!(ready, "ready");
        for j in 0..5 {
            worker.send(j).unwrap();
        }
        drop(worker);
        // Every queued job ran before the drop returned.
        assert_eq!(done.load(Ordering::SeqCst), 5);
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_worker_that_ends_without_reporting_is_an_error() {
        let err = Worker::<()>::start::<()>("test", "test-worker", |_ready, _jobs| {})
            .err()
            .unwrap();
        assert!(matches!(err, Error::Backend { .. }), "{err}");
        assert!(err.to_string().contains("stopped while loading"), "{err}");
    }

    #[test]
    fn sending_to_a_stopped_worker_is_an_error() {
        let (worker, ()) = Worker::<u32>::start("test", "test-worker", |ready, jobs| {
            ready.send(());
            // Stops after the first job.
            let _ = jobs.into_iter().next();
        })
        .unwrap();
        worker.send(1).unwrap();
        // The thread ends after its first job; later sends fail.
        let mut failed = false;
        for _ in 0..100 {
            if worker.send(2).is_err() {
                failed = true;
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert!(failed, "sends to a stopped worker must fail");
    }
}

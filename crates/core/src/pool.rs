//! A fixed set of OS threads for CPU-heavy work (model runs, proofs), fed by a bounded queue:
//! such work never runs on the async reactor, and a full queue makes callers wait instead of
//! piling up work.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job did not produce its result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("the compute pool is shut down")]
    Closed,
    #[error("a compute job panicked")]
    Panicked,
}

/// Jobs queued per thread before submitters wait.
pub const QUEUE_PER_THREAD: usize = 64;

/// The compute pool. Dropping every handle lets the threads finish the queue and exit.
#[derive(Debug, Clone)]
pub struct ComputePool {
    tx: mpsc::Sender<Job>,
    threads: usize,
}

impl ComputePool {
    /// Starts `threads` (at least one) worker threads.
    pub fn new(name: &str, threads: usize) -> std::io::Result<ComputePool> {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>(threads * QUEUE_PER_THREAD);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    loop {
                        // One idle worker waits on the queue, the others on the lock.
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
                        match job {
                            Some(job) => job(),
                            None => break,
                        }
                    }
                })?;
        }
        Ok(ComputePool { tx, threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on a pool thread and waits (asynchronously) for its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = done.send(out);
        });
        self.tx.send(job).await.map_err(|_| PoolError::Closed)?;
        match result.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(PoolError::Panicked),
            Err(_) => Err(PoolError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_off_the_reactor_and_panics_are_errors() {
        let pool = ComputePool::new("modelhub-compute", 2).unwrap();
        let name = pool
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("modelhub-compute-"));
        let many = futures::future::join_all((0..200).map(|i| pool.run(move || i * 2))).await;
        assert_eq!(
            many.into_iter().map(Result::unwrap).sum::<i32>(),
            2 * (0..200).sum::<i32>()
        );
        let e = pool.run(|| -> i32 { panic!("boom") }).await.unwrap_err();
        assert_eq!(e, PoolError::Panicked);
        assert_eq!(
            pool.run(|| 1).await.unwrap(),
            1,
            "the pool survives a panic"
        );
    }
}

//! The compute pool with a fair share between accounts: a fixed set of OS threads takes jobs
//! from per-account queues in round robin, so an account with a long backlog waits behind its
//! own jobs, never in front of another account's. An account may have at most
//! `per_account` predictions admitted (queued or running) at once; the next one is refused at
//! once (`TooManyRequests`, gRPC `RESOURCE_EXHAUSTED`) instead of queueing. A job whose caller
//! has gone (the client hung up, so tonic dropped the request) is skipped, not run.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::error::InferenceError;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    /// Jobs waiting, per account.
    queues: HashMap<String, VecDeque<Job>>,
    /// Accounts with waiting jobs, in the order they are served.
    ring: VecDeque<String>,
    /// Predictions admitted (queued or running), per account.
    admitted: HashMap<String, usize>,
    queued: usize,
    running: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    per_account: usize,
    threads: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_job(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(account) = state.ring.pop_front() {
                let queue = state
                    .queues
                    .get_mut(&account)
                    .expect("a ring account has a queue");
                let job = queue.pop_front().expect("a ring account has a job");
                if queue.is_empty() {
                    state.queues.remove(&account);
                } else {
                    // Served one: to the back of the ring.
                    state.ring.push_back(account);
                }
                state.queued -= 1;
                state.running += 1;
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A place in the pool held by one prediction of one account, from admission until its answer;
/// dropping it gives the place back.
pub struct Admission {
    shared: Arc<Shared>,
    account: String,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("account", &self.account)
            .finish()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(n) = state.admitted.get_mut(&self.account) {
            *n -= 1;
            if *n == 0 {
                state.admitted.remove(&self.account);
            }
        }
    }
}

/// The fair compute pool. Cheap to clone; the threads stop when every handle is dropped.
#[derive(Clone)]
pub struct FairPool {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
    }
}

impl std::fmt::Debug for FairPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairPool")
            .field("threads", &self.shared.threads)
            .field("per_account", &self.shared.per_account)
            .finish()
    }
}

impl FairPool {
    /// Starts `threads` (at least one) compute threads; each account may have `per_account`
    /// (at least one) predictions admitted at once.
    pub fn new(name: &str, threads: usize, per_account: usize) -> std::io::Result<FairPool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            per_account: per_account.max(1),
            threads,
        });
        for i in 0..threads {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    while let Some(job) = shared.next_job() {
                        job();
                        shared.lock().running -= 1;
                    }
                })?;
        }
        Ok(FairPool {
            _stop: Arc::new(StopOnDrop(shared.clone())),
            shared,
        })
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Admits one prediction of `account`, or refuses it when the account already has its
    /// limit of predictions admitted.
    pub fn admit(&self, account: &str) -> Result<Admission, InferenceError> {
        let mut state = self.shared.lock();
        let n = state.admitted.entry(account.to_owned()).or_default();
        if *n >= self.shared.per_account {
            return Err(InferenceError::TooManyInFlight {
                limit: self.shared.per_account,
            });
        }
        *n += 1;
        Ok(Admission {
            shared: self.shared.clone(),
            account: account.to_owned(),
        })
    }

    /// Jobs waiting for a thread, all accounts together.
    pub fn queued(&self) -> usize {
        self.shared.lock().queued
    }

    /// Jobs running on a thread now.
    pub fn running(&self) -> usize {
        self.shared.lock().running
    }

    /// Runs `f` on a compute thread, in the account's turn, and waits (asynchronously) for it.
    pub async fn run<T, F>(&self, admission: &Admission, f: F) -> Result<T, InferenceError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller gave up (its client went away) while the job waited: skip it.
            if done.is_closed() {
                return;
            }
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = done.send(out);
        });
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(InferenceError::Pool(modelhub_core::pool::PoolError::Closed));
            }
            let account = admission.account.clone();
            let queue = state.queues.entry(account.clone()).or_default();
            queue.push_back(job);
            if queue.len() == 1 {
                state.ring.push_back(account);
            }
            state.queued += 1;
        }
        self.shared.ready.notify_one();
        match result.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(InferenceError::Pool(
                modelhub_core::pool::PoolError::Panicked,
            )),
            Err(_) => Err(InferenceError::Pool(modelhub_core::pool::PoolError::Closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Polls `f` until it holds, failing after 10 s.
    async fn until(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "condition never held");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_backlog_of_one_account_does_not_delay_another() {
        let pool = FairPool::new("test-fair", 1, 100).unwrap();
        // Hold the only thread until every job is queued.
        let (release, gate) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let blocker = tokio::spawn({
            let pool = pool.clone();
            let admission = pool.admit("a").unwrap();
            async move {
                pool.run(&admission, move || {
                    started_tx.send(()).unwrap();
                    gate.recv().unwrap()
                })
                .await
            }
        });
        until(|| started.try_recv().is_ok()).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (account, n) in [("a", 10), ("b", 1), ("c", 2)] {
            for i in 0..n {
                let (p, order) = (pool.clone(), order.clone());
                let admission = p.admit(account).unwrap();
                tasks.push(tokio::spawn(async move {
                    p.run(&admission, move || {
                        order.lock().unwrap().push(format!("{account}{i}"))
                    })
                    .await
                }));
                // Queue in a known order: each job is queued before the next is made.
                let want = tasks.len();
                until(|| pool.queued() == want).await;
            }
        }
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let order = order.lock().unwrap().clone();
        // Round robin: b's only job runs after one of a's, not after all ten.
        assert_eq!(&order[..5], &["a0", "b0", "c0", "a1", "c1"], "{order:?}");
        assert_eq!(order.len(), 13);
    }

    #[tokio::test]
    async fn a_job_whose_caller_went_away_is_not_run() {
        let pool = FairPool::new("test-cancel", 1, 10).unwrap();
        let (release, gate) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let admission = pool.admit("a").unwrap();
        let blocker = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(&admission, move || {
                    started_tx.send(()).unwrap();
                    gate.recv().unwrap()
                })
                .await
            })
        };
        until(|| started.try_recv().is_ok()).await;
        let ran = Arc::new(Mutex::new(false));
        let abandoned = {
            let (pool, ran) = (pool.clone(), ran.clone());
            let admission = pool.admit("b").unwrap();
            tokio::spawn(async move {
                pool.run(&admission, move || *ran.lock().unwrap() = true)
                    .await
            })
        };
        until(|| pool.queued() == 1).await;
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        // A later job of the same account runs, so the skipped one went before it.
        let after = pool.admit("b").unwrap();
        pool.run(&after, || ()).await.unwrap();
        assert!(!*ran.lock().unwrap());
        assert_eq!(pool.queued(), 0);
    }

    #[tokio::test]
    async fn an_account_past_its_limit_is_refused_and_gets_its_places_back() {
        let pool = FairPool::new("test-cap", 1, 2).unwrap();
        let first = pool.admit("a").unwrap();
        let _second = pool.admit("a").unwrap();
        let e = pool.admit("a").unwrap_err();
        assert_eq!(e.code(), modelhub_core::ErrorCode::TooManyRequests);
        assert_eq!(
            e.to_api().to_status().code(),
            tonic::Code::ResourceExhausted
        );
        // Another account is not affected.
        let _b = pool.admit("b").unwrap();
        drop(first);
        let third = pool.admit("a").unwrap();
        assert_eq!(pool.run(&third, || 7).await.unwrap(), 7);
    }
}

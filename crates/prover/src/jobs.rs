//! Proof jobs, durable: every job is written to the prover's own database
//! (`<data_dir>/proofs/jobs.redb`, fsync'd on every commit) before the prediction that asked for
//! it is answered, and stays there until its proof (or its failure) replaces it. A restarted
//! prover resumes every job still pending, in the order they came.
//!
//! Jobs wait in a bounded queue: a job beyond `capacity` is refused with `Unavailable` (the
//! prediction is then answered 503 and not charged), and an account may have at most
//! `per_account` jobs pending (`TooManyRequests`, 429). `GetProof` shows a pending job's place
//! in the queue and an estimate from recent proof times.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modelhub_proto::prover::v1::ProofJob;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::ProverError;

/// Every job by id: its record (JSON [`Job`]).
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Jobs still to prove by id: (arrival sequence, the job as submitted, protobuf).
const PENDING: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("pending");

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Done {
        /// The proof file (docs/ZK.md).
        proof: serde_json::Value,
        /// The proved quantized output, dequantized.
        proved_output: Vec<f32>,
    },
    Failed {
        error: String,
    },
}

/// One proof job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    pub account_id: String,
    pub model_id: String,
    /// What ONNX Runtime answered, as API JSON tensors.
    pub float_outputs: serde_json::Value,
    #[serde(flatten)]
    pub status: JobStatus,
}

/// Bounds of the queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Jobs pending (queued or being proved) before new ones are refused.
    pub capacity: usize,
    /// Jobs one account may have pending.
    pub per_account: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            capacity: 256,
            per_account: 32,
        }
    }
}

/// A pending job's place: how many jobs are ahead of it, and a guess of when it is done.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Place {
    pub ahead: usize,
    pub estimate: Duration,
}

#[derive(Debug, Default)]
struct Queue {
    /// Jobs waiting for a worker (id, account), oldest first (not the ones being proved).
    waiting: VecDeque<(String, String)>,
    /// When each account last had a job taken (a counter): the next job is the oldest of the
    /// account served least recently, so one account's backlog can't starve another's job.
    served: HashMap<String, u64>,
    ticks: u64,
    /// Pending jobs (waiting or being proved) per account.
    per_account: HashMap<String, usize>,
    /// Pending jobs in all.
    pending: usize,
    /// Moving average of recent proof times, in ms (0 before the first proof).
    proof_ms: f64,
}

/// All jobs; waiters are woken on every change.
#[derive(Debug)]
pub struct Jobs {
    db: Arc<Database>,
    queue: Mutex<Queue>,
    limits: Limits,
    workers: usize,
    changed: Notify,
    arrived: Notify,
}

/// The proof queue as the service uses it: this prover's own database ([`Jobs`]), or the
/// table shared by every replica ([`crate::shared::SharedJobs`]).
#[tonic::async_trait]
pub trait JobQueue: Send + Sync + std::fmt::Debug {
    /// Records a new job durably and queues it; returns its place. The same job submitted
    /// again (same id and account) is accepted once. `Unavailable` when the queue is full,
    /// `TooManyRequests` when the account has too many jobs pending.
    async fn enqueue(&self, job: ProofJob, record: Job) -> Result<Place, ProverError>;
    /// The next job to prove, taken for this prover; waits for one.
    async fn next(&self) -> Result<ProofJob, ProverError>;
    /// Ends a job taken with [`next`](Self::next): its record gets `status`, durably. `took`
    /// (how long proving took) feeds the estimate.
    async fn finish(
        &self,
        job_id: &str,
        status: JobStatus,
        took: Option<Duration>,
    ) -> Result<(), ProverError>;
    async fn get(&self, job_id: &str) -> Result<Option<Job>, ProverError>;
    /// Where a pending job stands (`None` when it is not waiting: being proved, or finished).
    async fn place(&self, job_id: &str) -> Option<Place>;
    /// The job once it is finished, or as it stands after `wait`; `None` when no such job
    /// appeared within `wait`.
    async fn wait(&self, job_id: &str, wait: Duration) -> Result<Option<Job>, ProverError>;
}

#[tonic::async_trait]
impl JobQueue for Jobs {
    async fn enqueue(&self, job: ProofJob, record: Job) -> Result<Place, ProverError> {
        Jobs::enqueue(self, job, record).await
    }
    async fn next(&self) -> Result<ProofJob, ProverError> {
        Jobs::next(self).await
    }
    async fn finish(
        &self,
        job_id: &str,
        status: JobStatus,
        took: Option<Duration>,
    ) -> Result<(), ProverError> {
        Jobs::finish(self, job_id, status, took).await
    }
    async fn get(&self, job_id: &str) -> Result<Option<Job>, ProverError> {
        Jobs::get(self, job_id).await
    }
    async fn place(&self, job_id: &str) -> Option<Place> {
        Jobs::place(self, job_id)
    }
    async fn wait(&self, job_id: &str, wait: Duration) -> Result<Option<Job>, ProverError> {
        Jobs::wait(self, job_id, wait).await
    }
}

/// Job ids become database keys and log fields: keep them to a safe alphabet.
pub fn valid_job_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn state(e: impl std::fmt::Display) -> ProverError {
    ProverError::State(e.to_string())
}

impl Jobs {
    /// Opens (or creates) the job database in `dir`, imports the finished jobs earlier versions
    /// kept as `<job_id>.json` files there, and queues every pending job again. `workers` is
    /// how many jobs are proved at once (for the estimate).
    pub fn open(dir: &Path, limits: Limits, workers: usize) -> Result<Jobs, ProverError> {
        std::fs::create_dir_all(dir).map_err(|e| state(format!("{}: {e}", dir.display())))?;
        let db = Database::create(dir.join("jobs.redb")).map_err(state)?;
        let txn = db.begin_write().map_err(state)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(state)?;
            txn.open_table(PENDING).map_err(state)?;
            for entry in std::fs::read_dir(dir).map_err(state)?.flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                match std::fs::read(&path).map(|b| serde_json::from_slice::<Job>(&b)) {
                    Ok(Ok(job)) if valid_job_id(&job.job_id) => {
                        let bytes = serde_json::to_vec(&job).map_err(state)?;
                        jobs.insert(job.job_id.as_str(), bytes.as_slice())
                            .map_err(state)?;
                    }
                    _ => {
                        tracing::warn!(path = %path.display(), "skipping an unreadable proof record")
                    }
                }
            }
        }
        txn.commit().map_err(state)?;
        // The imported files are in the database now.
        for entry in std::fs::read_dir(dir).map_err(state)?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "json") {
                let _ = std::fs::remove_file(entry.path());
            }
        }

        let mut queue = Queue::default();
        let read = db.begin_read().map_err(state)?;
        let pending = read.open_table(PENDING).map_err(state)?;
        let jobs = read.open_table(JOBS).map_err(state)?;
        let mut resumed = Vec::new();
        for entry in pending.iter().map_err(state)? {
            let (id, value) = entry.map_err(state)?;
            let id = id.value().to_owned();
            let account = match jobs.get(id.as_str()).map_err(state)? {
                Some(v) => serde_json::from_slice::<Job>(v.value())
                    .map(|j| j.account_id)
                    .unwrap_or_default(),
                None => String::new(),
            };
            resumed.push((value.value().0, id, account));
        }
        resumed.sort();
        for (_, id, account) in resumed {
            *queue.per_account.entry(account.clone()).or_default() += 1;
            queue.waiting.push_back((id, account));
            queue.pending += 1;
        }
        if queue.pending > 0 {
            tracing::info!(jobs = queue.pending, "resuming pending proof jobs");
        }
        drop((pending, jobs, read));
        Ok(Jobs {
            db: Arc::new(db),
            queue: Mutex::new(queue),
            limits,
            workers: workers.max(1),
            changed: Notify::new(),
            arrived: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, ProverError> + Send + 'static,
    ) -> Result<T, ProverError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(state)?
    }

    /// Records a new job durably and queues it; returns its place. The same job submitted again
    /// (same id and account) is accepted once. `Unavailable` when the queue is full,
    /// `TooManyRequests` when the account has too many jobs pending.
    pub async fn enqueue(&self, job: ProofJob, record: Job) -> Result<Place, ProverError> {
        let job_id = record.job_id.clone();
        let account = record.account_id.clone();
        let again = |existing: &str| {
            if existing == account {
                Ok(self.place(&job_id).unwrap_or(Place {
                    ahead: 0,
                    estimate: Duration::ZERO,
                }))
            } else {
                Err(ProverError::BadRequest(format!(
                    "proof job {job_id} exists"
                )))
            }
        };
        if let Some(existing) = self.get(&job_id).await? {
            return again(&existing.account_id);
        }
        {
            // Claim the room first, so concurrent submissions can't overfill the queue.
            let mut q = self.lock();
            if q.pending >= self.limits.capacity {
                return Err(ProverError::QueueFull);
            }
            let mine = q.per_account.entry(account.clone()).or_default();
            if *mine >= self.limits.per_account {
                return Err(ProverError::TooManyPending(self.limits.per_account));
            }
            *mine += 1;
            q.pending += 1;
        }
        let written = {
            let id = job_id.clone();
            let record = serde_json::to_vec(&record).map_err(state)?;
            let proto = job.encode_to_vec();
            // Checked again inside the write: of two concurrent submissions of one id, the
            // second finds the first's record (writes are serialized) and adds nothing.
            self.blocking(move |db| {
                let txn = db.begin_write().map_err(state)?;
                {
                    let mut jobs = txn.open_table(JOBS).map_err(state)?;
                    if let Some(v) = jobs.get(id.as_str()).map_err(state)? {
                        let existing: Job = serde_json::from_slice(v.value()).map_err(state)?;
                        return Ok(Some(existing.account_id));
                    }
                    jobs.insert(id.as_str(), record.as_slice()).map_err(state)?;
                    txn.open_table(PENDING)
                        .map_err(state)?
                        .insert(id.as_str(), (now_micros(), proto.as_slice()))
                        .map_err(state)?;
                }
                txn.commit().map_err(state)?;
                Ok(None)
            })
            .await
        };
        let mut q = self.lock();
        match written {
            Err(e) => {
                Self::forget(&mut q, &account);
                return Err(e);
            }
            Ok(Some(existing)) => {
                Self::forget(&mut q, &account);
                drop(q);
                return again(&existing);
            }
            Ok(None) => {}
        }
        q.waiting.push_back((job_id.clone(), account.clone()));
        let place = Self::place_in(&q, &job_id, self.workers);
        drop(q);
        self.arrived.notify_one();
        self.changed.notify_waiters();
        Ok(place.unwrap_or(Place {
            ahead: 0,
            estimate: Duration::ZERO,
        }))
    }

    fn forget(q: &mut Queue, account: &str) {
        q.pending = q.pending.saturating_sub(1);
        if let Some(n) = q.per_account.get_mut(account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                q.per_account.remove(account);
                q.served.remove(account);
            }
        }
    }

    /// The next job to prove, oldest first; waits for one.
    pub async fn next(&self) -> Result<ProofJob, ProverError> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let id = self.lock().take_fairly();
            let Some(id) = id else {
                arrived.await;
                continue;
            };
            let key = id.clone();
            let stored = self
                .blocking(move |db| {
                    let txn = db.begin_read().map_err(state)?;
                    let t = txn.open_table(PENDING).map_err(state)?;
                    Ok(t.get(key.as_str())
                        .map_err(state)?
                        .map(|v| v.value().1.to_vec()))
                })
                .await?;
            match stored.map(|b| ProofJob::decode(b.as_slice())) {
                Some(Ok(job)) => return Ok(job),
                _ => {
                    tracing::warn!(job_id = %id, "a queued proof job has no readable record");
                    self.finish(
                        &id,
                        JobStatus::Failed {
                            error: "the job's record was lost".into(),
                        },
                        None,
                    )
                    .await?;
                }
            }
        }
    }

    /// Ends a job: its record gets `status` and it leaves the pending table, in one durable
    /// write. `took` (how long proving took) feeds the estimate.
    pub async fn finish(
        &self,
        job_id: &str,
        status: JobStatus,
        took: Option<Duration>,
    ) -> Result<(), ProverError> {
        let id = job_id.to_owned();
        let account = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(state)?;
                let account = {
                    let mut jobs = txn.open_table(JOBS).map_err(state)?;
                    let mut job: Job = match jobs.get(id.as_str()).map_err(state)? {
                        Some(v) => serde_json::from_slice(v.value()).map_err(state)?,
                        None => return Err(ProverError::UnknownJob(id)),
                    };
                    job.status = status;
                    let bytes = serde_json::to_vec(&job).map_err(state)?;
                    jobs.insert(id.as_str(), bytes.as_slice()).map_err(state)?;
                    txn.open_table(PENDING)
                        .map_err(state)?
                        .remove(id.as_str())
                        .map_err(state)?;
                    job.account_id
                };
                txn.commit().map_err(state)?;
                Ok(account)
            })
            .await?;
        let mut q = self.lock();
        Self::forget(&mut q, &account);
        if let Some(took) = took {
            let ms = took.as_secs_f64() * 1000.0;
            q.proof_ms = if q.proof_ms == 0.0 {
                ms
            } else {
                0.8 * q.proof_ms + 0.2 * ms
            };
        }
        drop(q);
        self.changed.notify_waiters();
        Ok(())
    }

    pub async fn get(&self, job_id: &str) -> Result<Option<Job>, ProverError> {
        let id = job_id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(state)?;
            let t = txn.open_table(JOBS).map_err(state)?;
            t.get(id.as_str())
                .map_err(state)?
                .map(|v| serde_json::from_slice(v.value()).map_err(state))
                .transpose()
        })
        .await
    }

    /// Where a pending job stands (`None` when it is not waiting: being proved, or finished).
    pub fn place(&self, job_id: &str) -> Option<Place> {
        Self::place_in(&self.lock(), job_id, self.workers)
    }

    fn place_in(q: &Queue, job_id: &str, workers: usize) -> Option<Place> {
        // Approximate under fair sharing: the jobs that came before it.
        let ahead = q.waiting.iter().position(|(id, _)| id == job_id)?;
        // The jobs ahead, and this one, shared among the workers.
        let rounds = (ahead / workers + 1) as f64;
        Some(Place {
            ahead,
            estimate: Duration::from_millis((rounds * q.proof_ms) as u64),
        })
    }

    /// The job once it is finished, or as it stands after `wait`; `None` when no such job
    /// appeared within `wait`.
    pub async fn wait(&self, job_id: &str, wait: Duration) -> Result<Option<Job>, ProverError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let job = self.get(job_id).await?;
            if let Some(job) = &job
                && job.status != JobStatus::Pending
            {
                return Ok(Some(job.clone()));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return match job {
                    Some(job) => Ok(Some(job)),
                    None => self.get(job_id).await,
                };
            }
        }
    }
}

impl Queue {
    /// Removes and returns the oldest waiting job of the account served least recently.
    fn take_fairly(&mut self) -> Option<String> {
        let mut best: Option<(u64, usize)> = None;
        let mut seen = std::collections::HashSet::new();
        for (at, (_, account)) in self.waiting.iter().enumerate() {
            if !seen.insert(account.as_str()) {
                continue; // not this account's oldest
            }
            let last = self.served.get(account).copied().unwrap_or(0);
            if best.is_none_or(|(b, _)| last < b) {
                best = Some((last, at));
            }
        }
        let (_, at) = best?;
        let (id, account) = self.waiting.remove(at)?;
        self.ticks += 1;
        self.served.insert(account, self.ticks);
        Some(id)
    }
}

/// Microseconds since the Unix epoch: the arrival order of jobs across restarts.
pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, account: &str) -> (ProofJob, Job) {
        (
            ProofJob {
                job_id: id.into(),
                account_id: account.into(),
                ..Default::default()
            },
            Job {
                job_id: id.into(),
                account_id: account.into(),
                model_id: "mdl_1".into(),
                float_outputs: serde_json::json!([]),
                status: JobStatus::Pending,
            },
        )
    }

    fn open(dir: &Path, limits: Limits) -> Arc<Jobs> {
        Arc::new(Jobs::open(dir, limits, 1).unwrap())
    }

    #[tokio::test]
    async fn a_waiter_sees_the_job_finish_and_the_record_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open(dir.path(), Limits::default());
        let (p, r) = job("job_a", "acct_1");
        jobs.enqueue(p.clone(), r.clone()).await.unwrap();
        // The same job again is accepted once; another account can't take its id.
        jobs.enqueue(p, r).await.unwrap();
        let (p, r) = job("job_a", "acct_2");
        assert!(jobs.enqueue(p, r).await.is_err());
        let waiter = {
            let jobs = jobs.clone();
            tokio::spawn(async move { jobs.wait("job_a", Duration::from_secs(30)).await })
        };
        assert_eq!(jobs.next().await.unwrap().job_id, "job_a");
        let done = JobStatus::Done {
            proof: serde_json::json!({"format": "x"}),
            proved_output: vec![0.5],
        };
        jobs.finish("job_a", done.clone(), Some(Duration::from_millis(40)))
            .await
            .unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().unwrap().status, done);
        drop(jobs);

        let again = open(dir.path(), Limits::default());
        assert_eq!(again.get("job_a").await.unwrap().unwrap().status, done);
        assert_eq!(again.lock().pending, 0, "a finished job is not resumed");
    }

    #[tokio::test]
    async fn concurrent_submissions_of_one_job_queue_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open(dir.path(), Limits::default());
        let (p, r) = job("job_same", "acct_1");
        let sends = (0..8).map(|_| {
            let (jobs, p, r) = (jobs.clone(), p.clone(), r.clone());
            tokio::spawn(async move { jobs.enqueue(p, r).await })
        });
        for s in sends {
            s.await.unwrap().unwrap();
        }
        let q = jobs.lock();
        assert_eq!((q.waiting.len(), q.pending), (1, 1));
        assert_eq!(q.per_account.get("acct_1"), Some(&1));
    }

    #[tokio::test]
    async fn pending_jobs_survive_a_restart_in_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open(dir.path(), Limits::default());
        for id in ["job_1", "job_2", "job_3"] {
            let (p, r) = job(id, "acct_1");
            jobs.enqueue(p, r).await.unwrap();
        }
        // job_1 was being proved when the process died: it is resumed too.
        assert_eq!(jobs.next().await.unwrap().job_id, "job_1");
        assert_eq!(jobs.place("job_3").unwrap().ahead, 1);
        drop(jobs);

        let again = open(dir.path(), Limits::default());
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(again.next().await.unwrap().job_id);
        }
        assert_eq!(order, ["job_1", "job_2", "job_3"]);
        assert_eq!(
            again.get("job_2").await.unwrap().unwrap().status,
            JobStatus::Pending
        );
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_all_and_per_account() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open(
            dir.path(),
            Limits {
                capacity: 3,
                per_account: 2,
            },
        );
        for id in ["job_1", "job_2"] {
            let (p, r) = job(id, "acct_1");
            jobs.enqueue(p, r).await.unwrap();
        }
        let (p, r) = job("job_3", "acct_1");
        let e = jobs.enqueue(p, r).await.unwrap_err();
        assert_eq!(e.code(), modelhub_core::ErrorCode::TooManyRequests, "{e}");
        let (p, r) = job("job_4", "acct_2");
        jobs.enqueue(p, r).await.unwrap();
        let (p, r) = job("job_5", "acct_3");
        let e = jobs.enqueue(p, r).await.unwrap_err();
        assert_eq!(e.code(), modelhub_core::ErrorCode::Unavailable, "{e}");
        assert!(
            jobs.get("job_5").await.unwrap().is_none(),
            "nothing recorded"
        );
        // A finished job makes room.
        let first = jobs.next().await.unwrap().job_id;
        jobs.finish(&first, JobStatus::Failed { error: "x".into() }, None)
            .await
            .unwrap();
        let (p, r) = job("job_5", "acct_3");
        jobs.enqueue(p, r).await.unwrap();
    }

    #[tokio::test]
    async fn a_flooding_account_does_not_starve_another() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open(dir.path(), Limits::default());
        for i in 0..5 {
            let (p, r) = job(&format!("job_a{i}"), "acct_a");
            jobs.enqueue(p, r).await.unwrap();
        }
        let (p, r) = job("job_b0", "acct_b");
        jobs.enqueue(p, r).await.unwrap();
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(jobs.next().await.unwrap().job_id);
        }
        // B's one job comes second, not after A's whole backlog; A's keep their order.
        assert_eq!(order, ["job_a0", "job_b0", "job_a1", "job_a2"]);
    }

    #[tokio::test]
    async fn waiting_for_an_unknown_or_pending_job_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open(dir.path(), Limits::default());
        assert!(
            jobs.wait("nope", Duration::from_millis(10))
                .await
                .unwrap()
                .is_none()
        );
        let (p, r) = job("job_b", "acct_1");
        jobs.enqueue(p, r).await.unwrap();
        let got = jobs.wait("job_b", Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.unwrap().status, JobStatus::Pending);
        assert!(matches!(
            jobs.finish("nope", JobStatus::Pending, None).await,
            Err(ProverError::UnknownJob(_))
        ));
    }

    #[test]
    fn finished_jobs_of_earlier_versions_are_imported() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut old) = job("job_old", "acct_1");
        old.status = JobStatus::Failed {
            error: "old".into(),
        };
        std::fs::write(
            dir.path().join("job_old.json"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let jobs = open(dir.path(), Limits::default());
        assert_eq!(rt.block_on(jobs.get("job_old")).unwrap().unwrap(), old);
        assert!(!dir.path().join("job_old.json").exists());
    }

    #[test]
    fn job_ids_are_checked() {
        assert!(valid_job_id("job_0123abcd"));
        assert!(!valid_job_id("../etc/passwd"));
        assert!(!valid_job_id(""));
    }
}

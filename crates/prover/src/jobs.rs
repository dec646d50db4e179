//! Proof jobs: their state in memory, and each finished job as one JSON file
//! (`<data_dir>/proofs/<job_id>.json`) so proofs survive a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::ProverError;

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

/// All jobs; waiters are woken on every change.
#[derive(Debug)]
pub struct Jobs {
    dir: PathBuf,
    jobs: Mutex<HashMap<String, Job>>,
    changed: Notify,
}

/// Job ids become file names: keep them to a safe alphabet.
pub fn valid_job_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Jobs {
    /// Opens the job folder and loads the finished jobs in it.
    pub fn open(dir: &Path) -> Result<Jobs, ProverError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ProverError::State(format!("{}: {e}", dir.display())))?;
        let mut jobs = HashMap::new();
        for entry in std::fs::read_dir(dir)
            .map_err(|e| ProverError::State(e.to_string()))?
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match std::fs::read(&path).map(|b| serde_json::from_slice::<Job>(&b)) {
                    Ok(Ok(job)) => {
                        jobs.insert(job.job_id.clone(), job);
                    }
                    _ => {
                        tracing::warn!(path = %path.display(), "skipping an unreadable proof record")
                    }
                }
            }
        }
        Ok(Jobs {
            dir: dir.to_path_buf(),
            jobs: Mutex::new(jobs),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new pending job; false when the id is taken.
    pub fn start(&self, job: Job) -> bool {
        let mut jobs = self.lock();
        if jobs.contains_key(&job.job_id) {
            return false;
        }
        jobs.insert(job.job_id.clone(), job);
        drop(jobs);
        self.changed.notify_waiters();
        true
    }

    /// Ends a job, writing its record to disk first.
    pub fn finish(&self, job_id: &str, status: JobStatus) -> Result<(), ProverError> {
        let job = {
            let mut jobs = self.lock();
            let Some(job) = jobs.get_mut(job_id) else {
                return Err(ProverError::UnknownJob(job_id.to_string()));
            };
            job.status = status;
            job.clone()
        };
        let path = self.dir.join(format!("{job_id}.json"));
        let tmp = self.dir.join(format!(".{job_id}.json.tmp"));
        let bytes = serde_json::to_vec(&job).map_err(|e| ProverError::State(e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| ProverError::State(format!("{}: {e}", path.display())))?;
        self.changed.notify_waiters();
        Ok(())
    }

    pub fn get(&self, job_id: &str) -> Option<Job> {
        self.lock().get(job_id).cloned()
    }

    /// The job once it is finished, or as it stands after `wait`; `None` when no such job
    /// appeared within `wait`.
    pub async fn wait(&self, job_id: &str, wait: Duration) -> Option<Job> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let job = self.get(job_id);
            if let Some(job) = &job
                && job.status != JobStatus::Pending
            {
                return Some(job.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return job.or_else(|| self.get(job_id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: &str) -> Job {
        Job {
            job_id: id.into(),
            account_id: "acct_1".into(),
            model_id: "mdl_1".into(),
            float_outputs: serde_json::json!([]),
            status: JobStatus::Pending,
        }
    }

    #[tokio::test]
    async fn a_waiter_sees_the_job_finish_and_the_record_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = std::sync::Arc::new(Jobs::open(dir.path()).unwrap());
        assert!(jobs.start(pending("job_a")));
        assert!(!jobs.start(pending("job_a")), "ids are unique");
        let waiter = {
            let jobs = jobs.clone();
            tokio::spawn(async move { jobs.wait("job_a", Duration::from_secs(30)).await })
        };
        let done = JobStatus::Done {
            proof: serde_json::json!({"format": "x"}),
            proved_output: vec![0.5],
        };
        jobs.finish("job_a", done.clone()).unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().status, done);

        let again = Jobs::open(dir.path()).unwrap();
        assert_eq!(again.get("job_a").unwrap().status, done);
    }

    #[tokio::test]
    async fn waiting_for_an_unknown_or_pending_job_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
        assert!(jobs.wait("nope", Duration::from_millis(10)).await.is_none());
        jobs.start(pending("job_b"));
        let job = jobs.wait("job_b", Duration::from_millis(10)).await.unwrap();
        assert_eq!(job.status, JobStatus::Pending);
        assert!(matches!(
            jobs.finish("nope", JobStatus::Pending),
            Err(ProverError::UnknownJob(_))
        ));
    }

    #[test]
    fn job_ids_are_checked() {
        assert!(valid_job_id("job_0123abcd"));
        assert!(!valid_job_id("../etc/passwd"));
        assert!(!valid_job_id(""));
    }
}

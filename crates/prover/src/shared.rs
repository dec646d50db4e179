//! State shared by prover replicas, in MongoDB (`--mongodb-uri`): the proof jobs, each leased
//! by one prover at a time, and the compiled models' records (sealed openings), so any replica
//! can prove any job and answer for any job.
//!
//! **Jobs** (`proof_jobs`): `{_id: job id, account_id, model_id, seq, state:
//! "pending"|"done"|"failed", record: <Job JSON>, job: <ProofJob protobuf, while pending>,
//! lease_owner, lease_until}`. A worker takes the oldest pending job whose lease has run out
//! with one `find_one_and_update` (so two replicas can't take the same job), and renews the
//! lease every third of its length while it proves. A replica that dies stops renewing; once
//! the lease runs out another takes the job over. The result is written only by the lease
//! holder (`lease_owner` = this replica, state still pending), so a prover that lost its lease
//! to another can't overwrite what that one wrote. Writes count once the server acknowledged
//! them with its default write concern (majority on MongoDB 5 and later).
//!
//! **Model records** (`prover_models`): `{_id: model id, record: <the record JSON>}`, what a
//! single prover keeps in `<data_dir>/models/<id>.json`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use modelhub_proto::prover::v1::ProofJob;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{ClientOptions, ReturnDocument};
use mongodb::{Client, Collection};
use prost::Message;
use tokio::sync::Notify;

use crate::error::ProverError;
use crate::jobs::{Job, JobQueue, JobStatus, Limits, Place, now_micros};

/// Database used when the URI names none (the registry's default too).
const DEFAULT_DATABASE: &str = "modelhub";
/// How long a taken job stays with its prover without a renewal.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How often idle workers and waiters look at the shared table.
const POLL: Duration = Duration::from_millis(200);

const PENDING: &str = "pending";

fn db_err(e: impl std::fmt::Display) -> ProverError {
    ProverError::State(format!("shared prover state: {e}"))
}

fn now_millis() -> i64 {
    i64::try_from(now_micros() / 1000).unwrap_or(i64::MAX)
}

/// The collections of the shared state.
#[derive(Debug, Clone)]
pub struct Shared {
    jobs: Collection<Document>,
    models: Collection<Document>,
}

impl Shared {
    /// Connects (failing within `timeout` when the server does not answer).
    pub async fn connect(uri: &str, timeout: Duration) -> Result<Shared, ProverError> {
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| ProverError::BadRequest(format!("invalid MongoDB URI: {e}")))?;
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout);
        options
            .app_name
            .get_or_insert_with(|| "modelhub-prover".to_owned());
        let database = options
            .default_database
            .clone()
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let client = Client::with_options(options).map_err(db_err)?;
        let db = client.database(&database);
        let shared = Shared {
            jobs: db.collection("proof_jobs"),
            models: db.collection("prover_models"),
        };
        // Answers (or fails) now rather than at the first job; the indexes of the queue's
        // queries (taking the oldest pending job, counting an account's pending ones).
        db.run_command(doc! { "ping": 1 }).await.map_err(db_err)?;
        for keys in [
            doc! { "state": 1, "seq": 1 },
            doc! { "state": 1, "account_id": 1 },
        ] {
            shared
                .jobs
                .create_index(mongodb::IndexModel::builder().keys(keys).build())
                .await
                .map_err(db_err)?;
        }
        tracing::info!(%database, "prover state: shared (MongoDB)");
        Ok(shared)
    }

    /// The stored record of a compiled model.
    pub async fn read_model(&self, model_id: &str) -> Result<Option<Vec<u8>>, ProverError> {
        let found = self
            .models
            .find_one(doc! { "_id": model_id })
            .await
            .map_err(db_err)?;
        Ok(found.and_then(|d| d.get_str("record").ok().map(|r| r.as_bytes().to_vec())))
    }

    pub async fn write_model(&self, model_id: &str, record: &[u8]) -> Result<(), ProverError> {
        let record = std::str::from_utf8(record).map_err(db_err)?;
        self.models
            .update_one(
                doc! { "_id": model_id },
                doc! { "$set": { "record": record } },
            )
            .upsert(true)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// The ids of every stored record.
    pub async fn list_models(&self) -> Result<Vec<String>, ProverError> {
        let mut cursor = self
            .models
            .find(doc! {})
            .projection(doc! { "_id": 1 })
            .sort(doc! { "_id": 1 })
            .await
            .map_err(db_err)?;
        let mut ids = Vec::new();
        while cursor.advance().await.map_err(db_err)? {
            let d: Document = cursor.deserialize_current().map_err(db_err)?;
            if let Ok(id) = d.get_str("_id") {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }

    /// Replaces a record if it still is `old`; whether it did.
    pub async fn replace_model(
        &self,
        model_id: &str,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, ProverError> {
        let old = std::str::from_utf8(old).map_err(db_err)?;
        let new = std::str::from_utf8(new).map_err(db_err)?;
        let updated = self
            .models
            .update_one(
                doc! { "_id": model_id, "record": old },
                doc! { "$set": { "record": new } },
            )
            .await
            .map_err(db_err)?;
        Ok(updated.matched_count == 1)
    }

    /// Whether there was a record.
    pub async fn remove_model(&self, model_id: &str) -> Result<bool, ProverError> {
        let deleted = self
            .models
            .delete_one(doc! { "_id": model_id })
            .await
            .map_err(db_err)?;
        Ok(deleted.deleted_count > 0)
    }
}

/// The proof queue shared by every prover replica (see the module docs).
#[derive(Debug)]
pub struct SharedJobs {
    jobs: Collection<Document>,
    /// This replica's name in `lease_owner`.
    replica: String,
    limits: Limits,
    workers: usize,
    lease: Duration,
    /// Moving average of this replica's recent proof times, in ms.
    proof_ms: Mutex<f64>,
    /// The lease renewals of the jobs this replica is proving.
    renewals: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    arrived: Notify,
    changed: Notify,
}

impl SharedJobs {
    pub fn new(shared: &Shared, limits: Limits, workers: usize, lease: Duration) -> SharedJobs {
        SharedJobs {
            jobs: shared.jobs.clone(),
            replica: modelhub_core::id::new_id("prv"),
            limits,
            workers: workers.max(1),
            lease: lease.max(Duration::from_millis(300)),
            proof_ms: Mutex::new(0.0),
            renewals: Mutex::new(HashMap::new()),
            arrived: Notify::new(),
            changed: Notify::new(),
        }
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    async fn count(&self, filter: Document) -> Result<u64, ProverError> {
        self.jobs.count_documents(filter).await.map_err(db_err)
    }

    fn job_from(d: &Document) -> Result<Job, ProverError> {
        let record = d.get_str("record").map_err(db_err)?;
        serde_json::from_str(record).map_err(db_err)
    }

    /// Keeps this replica's lease on `job_id` while it proves it.
    fn renew(&self, job_id: &str) {
        let (jobs, replica, lease) = (self.jobs.clone(), self.replica.clone(), self.lease_ms());
        let every = self.lease / 3;
        let id = job_id.to_owned();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let renewed = jobs
                    .update_one(
                        doc! { "_id": &id, "state": PENDING, "lease_owner": &replica },
                        doc! { "$set": { "lease_until": now_millis().saturating_add(lease) } },
                    )
                    .await;
                match renewed {
                    Ok(r) if r.matched_count == 0 => return, // finished, or taken over
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(job_id = %id, error = %e, "renewing a proof lease failed")
                    }
                }
            }
        });
        if let Some(old) = self.lock_renewals().insert(job_id.to_owned(), task) {
            old.abort();
        }
    }

    fn lock_renewals(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::JoinHandle<()>>> {
        self.renewals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn place_of(&self, ahead: u64) -> Place {
        let ahead = usize::try_from(ahead).unwrap_or(usize::MAX);
        let ms = *self.proof_ms.lock().unwrap_or_else(|e| e.into_inner());
        let rounds = (ahead / self.workers + 1) as f64;
        Place {
            ahead,
            estimate: Duration::from_millis((rounds * ms) as u64),
        }
    }
}

#[tonic::async_trait]
impl JobQueue for SharedJobs {
    async fn enqueue(&self, job: ProofJob, record: Job) -> Result<Place, ProverError> {
        let again = |existing: Job| {
            if existing.account_id == record.account_id {
                Ok(Place {
                    ahead: 0,
                    estimate: Duration::ZERO,
                })
            } else {
                Err(ProverError::BadRequest(format!(
                    "proof job {} exists",
                    record.job_id
                )))
            }
        };
        if let Some(existing) = self.get(&record.job_id).await? {
            return again(existing);
        }
        // Bounds counted across replicas (two submissions at the same instant may both pass
        // the last free place: the bound is exact to within the replicas' concurrency).
        if self.count(doc! { "state": PENDING }).await? >= self.limits.capacity as u64 {
            return Err(ProverError::QueueFull);
        }
        let mine = doc! { "state": PENDING, "account_id": &record.account_id };
        if self.count(mine).await? >= self.limits.per_account as u64 {
            return Err(ProverError::TooManyPending(self.limits.per_account));
        }
        let seq = i64::try_from(now_micros()).unwrap_or(i64::MAX);
        let ahead = self
            .count(doc! { "state": PENDING, "seq": { "$lt": seq } })
            .await?;
        let document = doc! {
            "_id": &record.job_id,
            "account_id": &record.account_id,
            "model_id": &record.model_id,
            "seq": seq,
            "state": PENDING,
            "record": serde_json::to_string(&record).map_err(db_err)?,
            "job": Bson::Binary(mongodb::bson::Binary {
                subtype: mongodb::bson::spec::BinarySubtype::Generic,
                bytes: job.encode_to_vec(),
            }),
            "lease_owner": Bson::Null,
            "lease_until": 0i64,
        };
        match self.jobs.insert_one(document).await {
            Ok(_) => {}
            Err(e)
                if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Write(
                mongodb::error::WriteFailure::WriteError(w)) if w.code == 11000) =>
            {
                let existing = self
                    .get(&record.job_id)
                    .await?
                    .ok_or_else(|| db_err("a job vanished"))?;
                return again(existing);
            }
            Err(e) => return Err(db_err(e)),
        }
        self.arrived.notify_one();
        Ok(self.place_of(ahead))
    }

    async fn next(&self) -> Result<ProofJob, ProverError> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let now = now_millis();
            let taken = self
                .jobs
                .find_one_and_update(
                    doc! { "state": PENDING, "lease_until": { "$lt": now } },
                    doc! { "$set": {
                        "lease_owner": &self.replica,
                        "lease_until": now.saturating_add(self.lease_ms()),
                    } },
                )
                .sort(doc! { "seq": 1 })
                .return_document(ReturnDocument::Before)
                .await
                .map_err(db_err)?;
            let Some(d) = taken else {
                let _ = tokio::time::timeout(POLL, arrived).await;
                continue;
            };
            let job_id = d.get_str("_id").map_err(db_err)?.to_owned();
            // `d` is the job as it was before this replica took it.
            if d.get_i64("lease_until").unwrap_or(0) > 0 {
                tracing::warn!(%job_id, "taking over a proof job whose prover stopped renewing its lease");
            }
            let decoded = match d.get("job") {
                Some(Bson::Binary(b)) => ProofJob::decode(b.bytes.as_slice()).ok(),
                _ => None,
            };
            match decoded {
                Some(job) => {
                    self.renew(&job_id);
                    return Ok(job);
                }
                None => {
                    tracing::warn!(%job_id, "a shared proof job has no readable record");
                    self.renew(&job_id);
                    self.finish(
                        &job_id,
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

    async fn finish(
        &self,
        job_id: &str,
        status: JobStatus,
        took: Option<Duration>,
    ) -> Result<(), ProverError> {
        if let Some(renewal) = self.lock_renewals().remove(job_id) {
            renewal.abort();
        }
        let Some(mut job) = self.get(job_id).await? else {
            return Err(ProverError::UnknownJob(job_id.to_owned()));
        };
        let state = match &status {
            JobStatus::Pending => PENDING,
            JobStatus::Done { .. } => "done",
            JobStatus::Failed { .. } => "failed",
        };
        job.status = status;
        let written = self
            .jobs
            .update_one(
                doc! { "_id": job_id, "state": PENDING, "lease_owner": &self.replica },
                doc! {
                    "$set": {
                        "state": state,
                        "record": serde_json::to_string(&job).map_err(db_err)?,
                    },
                    "$unset": { "job": "" },
                },
            )
            .await
            .map_err(db_err)?;
        if written.matched_count == 0 {
            tracing::warn!(
                job_id,
                "another prover took this job over; its result stands"
            );
        }
        if let Some(took) = took {
            let ms = took.as_secs_f64() * 1000.0;
            let mut avg = self.proof_ms.lock().unwrap_or_else(|e| e.into_inner());
            *avg = if *avg == 0.0 {
                ms
            } else {
                0.8 * *avg + 0.2 * ms
            };
        }
        self.changed.notify_waiters();
        Ok(())
    }

    async fn get(&self, job_id: &str) -> Result<Option<Job>, ProverError> {
        let found = self
            .jobs
            .find_one(doc! { "_id": job_id })
            .await
            .map_err(db_err)?;
        found.as_ref().map(Self::job_from).transpose()
    }

    async fn place(&self, job_id: &str) -> Option<Place> {
        let d = self.jobs.find_one(doc! { "_id": job_id }).await.ok()??;
        let waiting = d.get_str("state").ok() == Some(PENDING)
            && d.get_i64("lease_until").unwrap_or(0) < now_millis();
        if !waiting {
            return None;
        }
        let seq = d.get_i64("seq").ok()?;
        let ahead = self
            .count(doc! { "state": PENDING, "seq": { "$lt": seq } })
            .await
            .ok()?;
        Some(self.place_of(ahead))
    }

    async fn wait(&self, job_id: &str, wait: Duration) -> Result<Option<Job>, ProverError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let job = self.get(job_id).await?;
            if job.as_ref().is_some_and(|j| j.status != JobStatus::Pending)
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(job);
            }
            // Finished here (woken at once) or by another replica (seen at the next poll).
            let _ =
                tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + POLL), changed)
                    .await;
        }
    }
}

//! Group commit for the embedded store: many write transactions, one `fsync`.
//!
//! Every write of [`RedbStore`](super::redb::RedbStore) goes to one committer thread. It runs
//! each operation in a write transaction of its own, committed with [`Durability::None`]
//! (visible to later transactions, not yet on disk), takes every operation already waiting
//! (up to [`MAX_GROUP`]) the same way, then makes the whole group durable with one empty
//! [`Durability::Immediate`] commit, and only then answers the group's callers.
//!
//! Invariants:
//! - A caller gets `Ok` only after its transaction is durable: a crash at any point loses
//!   only operations whose callers have not been answered (or got an error).
//! - Each operation is its own transaction: one that fails (an error or a panic) is rolled
//!   back alone and answered at once; the others in its group are unaffected.
//! - Operations apply in the order they arrive, one at a time (redb has one writer), so a
//!   check and the update it guards never interleave with another operation.
//! - A failed durable commit fails every operation of its group, and later groups too: redb
//!   latches the I/O error, so the store answers errors until it is reopened.
//!
//! Reads run beside it and may see a group's writes a moment before they are durable. No
//! answer that promises durability (a receipt, a charge) comes from a read: writes make them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::error::{RegistryError, Result};

/// Most operations made durable by one `fsync`; more wait for the next group.
pub const MAX_GROUP: usize = 256;
/// Operations that may wait for the committer; callers beyond it wait to enqueue.
const QUEUE: usize = 4096;

/// An operation run by the committer: it runs its transaction and returns what answers its
/// caller once the group's durable commit has succeeded (`Ok`) or failed (`Err`).
type Op = Box<dyn FnOnce(&Database) -> Answer + Send>;
/// Answers a caller; `None` when the operation failed and was answered already.
type Answer = Option<Box<dyn FnOnce(std::result::Result<(), String>) + Send>>;

/// The committer thread's handle; joins the thread when the last store clone is dropped, so
/// the database file is closed when the store is gone (a reopen right after works).
pub struct GroupCommitter {
    queue: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Durable commits made so far (one per group), for tests.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the tests"))]
    groups: Arc<AtomicU64>,
}

impl std::fmt::Debug for GroupCommitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommitter").finish_non_exhaustive()
    }
}

impl GroupCommitter {
    /// Starts the committer thread for `db`.
    pub fn start(db: Arc<Database>) -> Result<GroupCommitter> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let groups = Arc::new(AtomicU64::new(0));
        let counted = groups.clone();
        let thread = std::thread::Builder::new()
            .name("registry-commit".into())
            .spawn(move || run(&db, rx, &counted))
            .map_err(RegistryError::store)?;
        Ok(GroupCommitter {
            queue: Some(tx),
            thread: Some(thread),
            groups,
        })
    }

    /// Durable commits made so far: one per group of writes.
    #[cfg(test)]
    pub fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    /// Runs `f` in a write transaction of its own, made durable with its group; answers once
    /// it is durable (or failed). `f`'s error aborts its transaction alone.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let op: Op = Box::new(move |db| {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(db, f))) {
                Ok(Ok(out)) => Some(Box::new(move |flushed| {
                    let _ = tx.send(match flushed {
                        Ok(()) => Ok(out),
                        Err(e) => Err(RegistryError::store(e)),
                    });
                })),
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e));
                    None
                }
                Err(_) => {
                    let _ = tx.send(Err(RegistryError::store("a store operation panicked")));
                    None
                }
            }
        });
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        queue.send(op).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has answered what it took.
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> RegistryError {
    RegistryError::store("the store's committer has stopped")
}

/// Runs `f` in a write transaction committed without `fsync`.
fn apply<T>(db: &Database, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::None)
        .map_err(RegistryError::store)?;
    let out = f(&txn)?;
    txn.commit()?;
    Ok(out)
}

/// Makes every commit so far durable: an empty transaction committed with `fsync`.
fn flush(db: &Database) -> std::result::Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())
}

/// The committer loop: one group per pass, until every sender is gone.
fn run(db: &Database, mut rx: mpsc::Receiver<Op>, groups: &AtomicU64) {
    let mut answers = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        answers.extend(first(db));
        for _ in 1..MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => answers.extend(op(db)),
                Err(_) => break,
            }
        }
        let flushed = if answers.is_empty() {
            Ok(())
        } else {
            groups.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(writes = answers.len(), "group commit");
            flush(db)
        };
        for answer in answers.drain(..) {
            answer(flushed.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn put(txn: &WriteTransaction, k: u64) -> Result<()> {
        txn.open_table(T)?.insert(k, k)?;
        Ok(())
    }

    /// Many concurrent writes, every third failing after it wrote and one panicking: each
    /// failure is rolled back alone, every success is there after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_roll_back_alone_and_successes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.redb");
        let db = Arc::new(Database::create(&path).unwrap());
        let committer = Arc::new(GroupCommitter::start(db.clone()).unwrap());
        let tasks: Vec<_> = (0..300u64)
            .map(|k| {
                let c = committer.clone();
                tokio::spawn(async move {
                    c.write(move |txn| {
                        put(txn, k)?;
                        if k == 150 {
                            panic!("planted");
                        }
                        if k % 3 == 0 {
                            return Err(RegistryError::conflict("planted"));
                        }
                        Ok(k)
                    })
                    .await
                })
            })
            .collect();
        let mut ok = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(k) => ok.push(k),
                Err(e) => assert!(
                    e.to_string().contains("planted") || e.to_string().contains("panicked"),
                    "{e}"
                ),
            }
        }
        let expected: Vec<u64> = (0..300).filter(|k| k % 3 != 0 && *k != 150).collect();
        ok.sort_unstable();
        assert_eq!(ok, expected);
        // The committer still works after the panic.
        committer.write(|txn| put(txn, 1000)).await.unwrap();
        drop(committer);
        drop(db);
        let db = Database::create(&path).unwrap();
        let read = db.begin_read().unwrap();
        let t = read.open_table(T).unwrap();
        let stored: Vec<u64> = t.iter().unwrap().map(|e| e.unwrap().0.value()).collect();
        let mut want = expected.clone();
        want.push(1000);
        assert_eq!(stored, want);
    }

    /// Concurrent writes are made durable in groups, fewer `fsync`s than writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_durable_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("g.redb")).unwrap());
        let committer = Arc::new(GroupCommitter::start(db.clone()).unwrap());
        let tasks: Vec<_> = (0..512u64)
            .map(|k| {
                let c = committer.clone();
                tokio::spawn(async move { c.write(move |txn| put(txn, k)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let groups = committer.groups();
        assert!(
            (1..512).contains(&groups),
            "512 concurrent writes took {groups} durable commits"
        );
    }
}

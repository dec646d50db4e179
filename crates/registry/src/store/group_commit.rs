//! Group commit for the embedded store: many writes, one transaction, one `fsync`.
//!
//! Every write of [`RedbStore`](super::redb::RedbStore) goes to one committer thread. It takes
//! the first waiting write and every other one already waiting (up to [`MAX_GROUP`]), runs
//! them one after the other in one write transaction and commits it durably (one `fsync`),
//! and only then answers the group's callers. When a write of the group fails (an error or a
//! panic), the transaction is dropped and the group runs again with each write in a
//! transaction of its own (committed with [`Durability::None`], then made durable together by
//! one empty [`Durability::Immediate`] commit), so the failed one is rolled back alone. A
//! write may therefore run twice, its first run discarded: writes are closures without side
//! effects outside the transaction.
//!
//! Invariants:
//! - A caller gets `Ok` only after its write is durable: a crash at any point loses only
//!   writes whose callers have not been answered (or got an error).
//! - A write that fails leaves nothing behind; the others of its group are unaffected.
//! - Writes apply in the order they arrive, one at a time (redb has one writer), so a check
//!   and the update it guards never interleave with another write.
//! - A failed durable commit fails every write of its group, and later groups too: redb
//!   latches the I/O error, so the store answers errors until it is reopened.
//!
//! Reads run beside it and may see a group's writes a moment before they are durable (in the
//! fallback path only). No answer that promises durability (a receipt, a charge) comes from a
//! read: writes make them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::error::{RegistryError, Result};

/// Most operations made durable by one `fsync`; more wait for the next group.
pub const MAX_GROUP: usize = 256;
/// Operations that may wait for the committer; callers beyond it wait to enqueue.
const QUEUE: usize = 4096;

/// A write waiting in the committer's queue.
trait PendingWrite: Send {
    /// Runs the write in `txn` and keeps its outcome; false when it failed (error or panic).
    fn run(&mut self, txn: &WriteTransaction) -> bool;
    /// Answers the caller: its outcome once durable (`flushed` is `Ok`), else the failure.
    fn answer(self: Box<Self>, flushed: std::result::Result<(), String>);
}

struct Pending<T, F> {
    f: F,
    out: Option<Result<T>>,
    tx: oneshot::Sender<Result<T>>,
}

impl<T, F> PendingWrite for Pending<T, F>
where
    T: Send,
    F: Fn(&WriteTransaction) -> Result<T> + Send,
{
    fn run(&mut self, txn: &WriteTransaction) -> bool {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(txn)))
            .unwrap_or_else(|_| Err(RegistryError::store("a store operation panicked")));
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn answer(self: Box<Self>, flushed: std::result::Result<(), String>) {
        let out = match (self.out, flushed) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(_)), Err(e)) => Err(RegistryError::store(e)),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, _) => Err(RegistryError::store("a store operation was not run")),
        };
        let _ = self.tx.send(out);
    }
}

type Op = Box<dyn PendingWrite>;

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

    /// Runs `f` in a write transaction, made durable with its group; answers once it is
    /// durable (or failed). `f`'s error rolls back its writes alone. `f` may run twice (see
    /// the module docs), so it must not act outside the transaction.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let op: Op = Box::new(Pending { f, out: None, tx });
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

/// Runs `ops` in one transaction committed durably; when one fails, runs each in its own
/// transaction (without `fsync`) and makes the successful ones durable together.
fn commit_group(db: &Database, ops: &mut [Op]) -> std::result::Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    if ops.iter_mut().all(|op| op.run(&txn)) {
        return txn.commit().map_err(|e| e.to_string());
    }
    drop(txn);
    for op in ops.iter_mut() {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::None)
            .map_err(|e| e.to_string())?;
        if op.run(&txn) {
            txn.commit().map_err(|e| e.to_string())?;
        }
    }
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())
}

/// The committer loop: one group per pass, until every sender is gone.
fn run(db: &Database, mut rx: mpsc::Receiver<Op>, groups: &AtomicU64) {
    let mut ops = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        ops.push(first);
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        groups.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(writes = ops.len(), "group commit");
        let flushed = commit_group(db, &mut ops);
        for op in ops.drain(..) {
            op.answer(flushed.clone());
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

    /// Read-modify-write of one key by many concurrent writes, some failing after their
    /// write: each success sees every earlier one (in its group or before it), each failure
    /// leaves nothing, whichever path its group took.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_of_a_group_see_each_other_and_failures_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("g.redb")).unwrap());
        let committer = Arc::new(GroupCommitter::start(db.clone()).unwrap());
        let tasks: Vec<_> = (0..400u64)
            .map(|i| {
                let c = committer.clone();
                tokio::spawn(async move {
                    c.write(move |txn| {
                        let mut t = txn.open_table(T)?;
                        let n = t.get(0)?.map_or(0, |v| v.value()) + 1;
                        t.insert(0, n)?;
                        if i % 5 == 0 {
                            return Err(RegistryError::conflict("planted"));
                        }
                        Ok(n)
                    })
                    .await
                })
            })
            .collect();
        let mut seen = Vec::new();
        for t in tasks {
            if let Ok(n) = t.await.unwrap() {
                seen.push(n);
            }
        }
        seen.sort_unstable();
        // 320 successes, each saw a distinct count: 1..=320.
        assert_eq!(seen, (1..=320).collect::<Vec<u64>>());
        let read = db.begin_read().unwrap();
        let n = read.open_table(T).unwrap().get(0).unwrap().unwrap().value();
        assert_eq!(n, 320);
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

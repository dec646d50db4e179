//! Reconciliation between the registry's CIDs and a blob store, for operators
//! (`modelhub storage verify`, `modelhub storage export --to-ipfs`).
//!
//! - [`verify`] compares the CIDs the registry names with what a store holds (on IPFS: its
//!   recursive pins, since an unpinned blob can be garbage-collected at any time): `missing`
//!   ones break reads, `unexpected` ones are space that nothing names (left-overs of deleted
//!   versions or failed uploads). [`verify_contents`] also reads every expected blob back and
//!   checks its CID; [`prune`] removes (on IPFS: unpins) the unexpected ones.
//! - [`export`] copies every blob of a local store into an IPFS node and checks that the node
//!   names each one exactly as the local store does, so the registry needs no change when
//!   storage switches to `--ipfs-api`.

use std::collections::HashSet;

use futures::StreamExt;

use crate::blob::{BlobStore, LocalBlobStore};
use crate::error::{Result, StorageError};
use crate::ipfs::IpfsBlobStore;

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Expected and held (on IPFS: pinned).
    pub ok: Vec<String>,
    /// Expected but not held (on IPFS: not pinned, whether or not the node still has bytes).
    pub missing: Vec<String>,
    /// Expected and held, but reading failed or the bytes do not hash to the CID, with why
    /// (only [`verify_contents`] reads).
    pub unreadable: Vec<(String, String)>,
    /// Held but not expected: nothing in the registry names them.
    pub unexpected: Vec<String>,
}

impl VerifyReport {
    /// Every expected blob is there (and, for [`verify_contents`], readable).
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unreadable.is_empty()
    }
}

/// Compares `expected` (the CIDs the registry names; duplicates are fine) with what `store`
/// holds. Fails only when the store can't be listed (an IPFS node down is
/// [`StorageError::Unavailable`]).
pub async fn verify(store: &dyn BlobStore, expected: &[String]) -> Result<VerifyReport> {
    let held: HashSet<String> = store.list().await?.into_iter().collect();
    let mut report = VerifyReport::default();
    let mut seen = HashSet::new();
    for cid in expected {
        let name = normalize(cid);
        if !seen.insert(name.clone()) {
            continue;
        }
        if held.contains(&name) {
            report.ok.push(name);
        } else {
            report.missing.push(name);
        }
    }
    report.unexpected = held.into_iter().filter(|c| !seen.contains(c)).collect();
    report.unexpected.sort();
    Ok(report)
}

/// [`verify`], then reads every held expected blob back in full (the stores check the CID
/// while streaming) and moves those that fail to `unreadable`.
pub async fn verify_contents(store: &dyn BlobStore, expected: &[String]) -> Result<VerifyReport> {
    let mut report = verify(store, expected).await?;
    let mut ok = Vec::with_capacity(report.ok.len());
    for cid in std::mem::take(&mut report.ok) {
        match read_through(store, &cid).await {
            Ok(()) => ok.push(cid),
            Err(e @ StorageError::Unavailable { .. }) => return Err(e),
            Err(e) => report.unreadable.push((cid, e.to_string())),
        }
    }
    report.ok = ok;
    Ok(report)
}

/// Reads a blob to its end and checks its CID (the local store doesn't check on read).
async fn read_through(store: &dyn BlobStore, cid: &str) -> Result<()> {
    let want = cid::Cid::try_from(cid).map_err(|_| StorageError::invalid("not a CID"))?;
    let mut stream = store.get(cid).await?;
    let mut builder = crate::unixfs::CidBuilder::new();
    while let Some(piece) = stream.next().await {
        builder.update(&piece?);
    }
    let got = builder.finish();
    if got != want {
        return Err(StorageError::Integrity {
            reason: format!("the bytes hash to {got}"),
        });
    }
    Ok(())
}

fn normalize(cid: &str) -> String {
    cid::Cid::try_from(cid).map_or_else(|_| cid.to_owned(), |c| c.to_string())
}

/// Removes (on IPFS: unpins) every blob `store` holds that `expected` doesn't name, and
/// returns their CIDs. `expected` must be complete and current: a blob whose upload finished
/// but whose registry record is not written yet would go too, so run it when no uploads are
/// in flight (or keep blobs younger than the listing out of it).
pub async fn prune(store: &dyn BlobStore, expected: &[String]) -> Result<Vec<String>> {
    let report = verify(store, expected).await?;
    let mut removed = Vec::with_capacity(report.unexpected.len());
    for cid in report.unexpected {
        if store.remove(&cid).await? {
            tracing::info!(cid = %cid, "unreferenced blob removed");
            removed.push(cid);
        }
    }
    Ok(removed)
}

/// What [`export`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Copied to the node (or already pinned there) under the identical CID.
    pub copied: Vec<String>,
    /// Total bytes sent.
    pub bytes: u64,
    /// Not copied, with why (a local file that is not its CID's bytes, a node that names the
    /// blob differently: an integrity error, and the node's pin is removed).
    pub failed: Vec<(String, String)>,
}

/// Copies every blob of `from` into the node behind `to`, streaming each one, and checks that
/// the node returns the identical CID. Blobs already pinned on the node are checked for
/// presence only. An unreachable or slow node stops the export with
/// [`StorageError::Unavailable`]; blobs copied before stay pinned (running again resumes).
pub async fn export(from: &LocalBlobStore, to: &IpfsBlobStore) -> Result<ExportReport> {
    let mut local = from.list().await?;
    local.sort();
    let pinned = to.pins().await?;
    let mut report = ExportReport::default();
    for cid in local {
        if pinned.contains(&cid) {
            report.copied.push(cid);
            continue;
        }
        let data = from.get(&cid).await?;
        let size = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = size.clone();
        let data = data
            .inspect(move |piece| {
                if let Ok(piece) = piece {
                    counter.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .boxed();
        match to.put_stream(data).await {
            Ok(got) if got == cid => {
                report.bytes += size.load(std::sync::atomic::Ordering::Relaxed);
                tracing::info!(cid = %cid, "blob exported to IPFS");
                report.copied.push(cid);
            }
            Ok(got) => {
                // The local file is not the bytes its name says: leave no pin for it.
                to.remove(&got).await?;
                tracing::warn!(cid = %cid, actual = %got, "local blob does not match its name");
                report
                    .failed
                    .push((cid, format!("the local file's bytes have the CID {got}")));
            }
            Err(e @ StorageError::Unavailable { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(cid = %cid, error = %e, "blob not exported");
                report.failed.push((cid, e.to_string()));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn verify_sorts_expected_blobs_into_ok_missing_and_unexpected() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let a = store.put(Bytes::from_static(b"a")).await.unwrap();
        let b = store.put(Bytes::from_static(b"b")).await.unwrap();
        let gone = crate::unixfs::cid_of_bytes(b"gone").to_string();
        let report = verify(&store, &[a.clone(), gone.clone(), a.clone()])
            .await
            .unwrap();
        assert_eq!(report.ok, std::slice::from_ref(&a));
        assert_eq!(report.missing, std::slice::from_ref(&gone));
        assert_eq!(report.unexpected, std::slice::from_ref(&b));
        assert!(!report.is_clean());

        // A corrupted file is held but unreadable.
        std::fs::write(store.dir().join(&b), b"not b").unwrap();
        let report = verify_contents(&store, &[a.clone(), b.clone()])
            .await
            .unwrap();
        assert_eq!(report.ok, std::slice::from_ref(&a));
        assert_eq!(report.unreadable.len(), 1);
        assert_eq!(report.unreadable[0].0, b);
        assert!(report.missing.is_empty() && report.unexpected.is_empty());

        assert_eq!(
            prune(&store, std::slice::from_ref(&b)).await.unwrap(),
            std::slice::from_ref(&a)
        );
        assert_eq!(store.list().await.unwrap(), std::slice::from_ref(&b));
    }
}

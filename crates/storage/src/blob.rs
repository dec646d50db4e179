//! Content-addressed blob stores: the [`BlobStore`] trait, its local-disk implementation and
//! (from [`crate::ipfs`]) the IPFS node one.
//!
//! A blob is named by the IPFS CIDv1 of its bytes ([`crate::unixfs`]), so the same bytes are
//! one blob in either store and blobs move between them without renaming.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Result, StorageError};
use crate::unixfs::CidBuilder;

pub use crate::ipfs::{IpfsBlobStore, IpfsOptions};

/// Bytes per chunk when a blob is streamed back.
pub const READ_CHUNK: usize = 256 * 1024;

/// A blob's bytes as a stream of pieces of any size.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// Where encrypted model blobs live.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `bytes` and returns their CID; storing the same bytes twice is harmless.
    async fn put(&self, bytes: Bytes) -> Result<String>;
    /// Stores a blob arriving in pieces and returns its CID, holding only bounded buffers.
    /// An error from `data` aborts the put and stores nothing.
    async fn put_stream(&self, mut data: ByteStream) -> Result<String> {
        let mut all = BytesMut::new();
        while let Some(piece) = data.next().await {
            all.extend_from_slice(&piece?);
        }
        self.put(all.freeze()).await
    }
    /// Streams a blob back; an unknown CID is [`StorageError::NotFound`].
    async fn get(&self, cid: &str) -> Result<ByteStream>;
    async fn contains(&self, cid: &str) -> Result<bool>;
    /// Removes a blob; `false` when there was none. (On IPFS: unpins it.)
    async fn remove(&self, cid: &str) -> Result<bool>;
    /// The CIDs of every blob held (on IPFS: every recursive pin), in no particular order.
    async fn list(&self) -> Result<Vec<String>>;
}

/// Blobs as files `<data_dir>/blobs/<cid>`, written atomically (temporary file, fsync, rename).
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    dir: Arc<PathBuf>,
}

impl LocalBlobStore {
    /// Opens (and creates) `<data_dir>/blobs`.
    pub fn open(data_dir: &Path) -> Result<LocalBlobStore> {
        let dir = data_dir.join("blobs");
        std::fs::create_dir_all(&dir).map_err(StorageError::io(format!(
            "creating blob directory {}",
            dir.display()
        )))?;
        Ok(LocalBlobStore { dir: Arc::new(dir) })
    }

    /// The folder holding the blobs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of a CID, after checking that the text really is a CID (so never `../x`).
    fn path_of(&self, cid: &str) -> Result<PathBuf> {
        let parsed = cid::Cid::try_from(cid)
            .map_err(|_| StorageError::invalid(format!("{cid:?} is not a CID")))?;
        Ok(self.dir.join(parsed.to_string()))
    }
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Result<String> {
    let mut builder = CidBuilder::new();
    builder.update(bytes);
    let cid = builder.finish().to_string();
    let path = dir.join(&cid);
    if path.exists() {
        return Ok(cid);
    }
    modelhub_core::fs::write_durably(&path, bytes).map_err(StorageError::io("writing blob"))?;
    Ok(cid)
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, bytes: Bytes) -> Result<String> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_blob(&dir, &bytes))
            .await
            .map_err(task_failed)?
    }

    async fn put_stream(&self, mut data: ByteStream) -> Result<String> {
        let dir = self.dir.clone();
        let tmp = tokio::task::spawn_blocking(move || {
            tempfile::Builder::new()
                .prefix(".tmp-")
                .tempfile_in(&*dir)
                .map_err(StorageError::io("creating temporary blob file"))
        })
        .await
        .map_err(task_failed)??;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(StorageError::io("opening temporary blob file"))?;
        let mut file = tokio::fs::File::from_std(file);
        let mut builder = CidBuilder::new();
        while let Some(piece) = data.next().await {
            let piece = piece?;
            builder.update(&piece);
            file.write_all(&piece)
                .await
                .map_err(StorageError::io("writing blob"))?;
        }
        file.sync_all()
            .await
            .map_err(StorageError::io("syncing blob"))?;
        drop(file);
        let cid = builder.finish().to_string();
        let dir = self.dir.clone();
        let name = cid.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let path = dir.join(&name);
            if path.exists() {
                return Ok(()); // the temporary file goes away on drop
            }
            tmp.persist(&path)
                .map_err(|e| StorageError::io("renaming blob into place")(e.error))?;
            if let Ok(d) = std::fs::File::open(&*dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })
        .await
        .map_err(task_failed)??;
        Ok(cid)
    }

    async fn get(&self, cid: &str) -> Result<ByteStream> {
        let path = self.path_of(cid)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotFound {
                    cid: cid.to_owned(),
                });
            }
            Err(e) => return Err(StorageError::io("opening blob")(e)),
        };
        let stream = futures::stream::try_unfold(file, |mut file| async move {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            while buf.len() < READ_CHUNK {
                let n = file
                    .read_buf(&mut buf)
                    .await
                    .map_err(StorageError::io("reading blob"))?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                Ok(None)
            } else {
                Ok(Some((buf.freeze(), file)))
            }
        });
        Ok(stream.boxed())
    }

    async fn contains(&self, cid: &str) -> Result<bool> {
        let path = self.path_of(cid)?;
        tokio::fs::try_exists(&path)
            .await
            .map_err(StorageError::io("checking blob"))
    }

    async fn remove(&self, cid: &str) -> Result<bool> {
        let path = self.path_of(cid)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StorageError::io("removing blob")(e)),
        }
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut entries = tokio::fs::read_dir(&*self.dir)
            .await
            .map_err(StorageError::io("listing blobs"))?;
        let mut cids = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(StorageError::io("listing blobs"))?
        {
            let name = entry.file_name();
            // Temporary files and anything else that is not named by a CID are not blobs.
            if let Some(name) = name.to_str()
                && cid::Cid::try_from(name).is_ok_and(|c| c.to_string() == name)
            {
                cids.push(name.to_owned());
            }
        }
        Ok(cids)
    }
}

fn task_failed(e: tokio::task::JoinError) -> StorageError {
    StorageError::Task {
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn put_get_contains_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        let cid = store.put(Bytes::from(data.clone())).await.unwrap();
        assert_eq!(cid, crate::unixfs::cid_of_bytes(&data).to_string());
        assert_eq!(store.put(Bytes::from(data.clone())).await.unwrap(), cid);
        assert_eq!(
            std::fs::read_dir(store.dir()).unwrap().count(),
            1,
            "one file, no temp left"
        );
        assert!(store.contains(&cid).await.unwrap());
        let chunks: Vec<Bytes> = store.get(&cid).await.unwrap().try_collect().await.unwrap();
        assert!(chunks.len() > 1 && chunks.iter().all(|c| c.len() <= READ_CHUNK));
        assert_eq!(chunks.concat(), data);
        assert_eq!(store.list().await.unwrap(), std::slice::from_ref(&cid));

        // Streamed in uneven pieces: the same CID, still one file.
        let pieces: Vec<Result<Bytes>> = data
            .chunks(100_003)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let streamed = store
            .put_stream(futures::stream::iter(pieces).boxed())
            .await
            .unwrap();
        assert_eq!(streamed, cid);
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1);
        let other = store
            .put_stream(futures::stream::iter(vec![Ok(Bytes::from_static(b"abc"))]).boxed())
            .await
            .unwrap();
        assert_eq!(other, crate::unixfs::cid_of_bytes(b"abc").to_string());
        assert_eq!(std::fs::read(store.dir().join(&other)).unwrap(), b"abc");
        assert!(store.remove(&other).await.unwrap());

        // A failing source stores nothing.
        let failing = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"partial")),
            Err(StorageError::invalid("source failed")),
        ]);
        assert!(store.put_stream(failing.boxed()).await.is_err());
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1);

        assert!(store.remove(&cid).await.unwrap());
        assert!(!store.remove(&cid).await.unwrap());
        assert!(store.list().await.unwrap().is_empty());
        assert!(!store.contains(&cid).await.unwrap());
        assert!(matches!(
            store.get(&cid).await.err(),
            Some(StorageError::NotFound { .. })
        ));
        assert!(matches!(
            store.get("../../etc/passwd").await.err(),
            Some(StorageError::InvalidArgument { .. })
        ));
    }
}

//! The IPFS blob store: blobs kept (and pinned) by an IPFS node through the kubo RPC API
//! (`ipfs-api-backend-hyper`), named by the same CIDv1 the local store computes.
//!
//! - `put` streams the bytes to `add` (CIDv1, raw leaves, 256 KiB chunks, sha2-256, pinned)
//!   while [`CidBuilder`] computes the CID locally; a node that answers another CID is an
//!   integrity error and its pin is removed.
//! - `get` streams `cat` back and recomputes the CID on the way: a mismatch (or a truncated
//!   answer) fails the stream's last item, so a reader never mistakes it for the whole blob.
//! - `remove` unpins; `list` and `contains` read the recursive pins.
//!
//! The client has no timeouts of its own and some nodes hang on an unknown CID, so every call
//! here has one ([`IpfsOptions`]). An unreachable, failing or slow node is
//! [`StorageError::Unavailable`] (503 "IPFS node unavailable" for clients).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use ipfs_api_backend_hyper::{IpfsApi, IpfsClient, TryFromUri, request};
use tokio_stream::wrappers::ReceiverStream;

use crate::blob::{BlobStore, ByteStream};
use crate::error::{Result, StorageError};
use crate::unixfs::{CHUNK_SIZE, CidBuilder};

/// The `add` chunker matching [`CHUNK_SIZE`].
const CHUNKER: &str = "size-262144";
const _: () = assert!(CHUNK_SIZE == 262_144, "CHUNKER must name CHUNK_SIZE");

/// Largest piece handed to the node at a time by [`BlobStore::put`].
const PUT_PIECE: usize = 1024 * 1024;

/// Timeouts of the IPFS client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpfsOptions {
    /// Bound on every call: a whole metadata call (pins, unpin, version), the node's answer
    /// once an upload is sent, and each wait for progress while a blob streams either way.
    pub timeout: Duration,
    /// Bound on the first byte of a `cat` (connecting included): short, since a node that
    /// lacks the blob may never answer.
    pub first_byte_timeout: Duration,
}

impl Default for IpfsOptions {
    fn default() -> IpfsOptions {
        IpfsOptions {
            timeout: Duration::from_secs(30),
            first_byte_timeout: Duration::from_secs(5),
        }
    }
}

/// Blobs on an IPFS node (kubo RPC API), pinned while they are in use.
#[derive(Clone)]
pub struct IpfsBlobStore {
    client: IpfsClient,
    api: Arc<str>,
    options: IpfsOptions,
}

impl std::fmt::Debug for IpfsBlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpfsBlobStore")
            .field("api", &self.api)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn parse_cid(cid: &str) -> Result<cid::Cid> {
    cid::Cid::try_from(cid).map_err(|_| StorageError::invalid(format!("{cid:?} is not a CID")))
}

/// Any failure of a call to the node: connection, HTTP, an API error or a bad answer.
fn node_error(op: &'static str) -> impl FnOnce(ipfs_api_backend_hyper::Error) -> StorageError {
    move |e| StorageError::unavailable(format!("{op}: {e}"))
}

fn too_slow(op: &'static str, limit: Duration) -> StorageError {
    StorageError::unavailable(format!("{op}: no answer within {limit:?}"))
}

impl IpfsBlobStore {
    /// A store on the node whose RPC API is at `api` (e.g. `http://127.0.0.1:5001`). Nothing
    /// is contacted yet: see [`IpfsBlobStore::check`].
    pub fn new(api: &str, options: IpfsOptions) -> Result<IpfsBlobStore> {
        let host = api.strip_prefix("http://").unwrap_or_default();
        if host.is_empty() || host.starts_with(['/', ':']) || host.contains(char::is_whitespace) {
            return Err(StorageError::invalid(format!(
                "IPFS API {api:?} must be an http://host:port URL"
            )));
        }
        let client = IpfsClient::from_str(api)
            .map_err(|_| StorageError::invalid(format!("IPFS API {api:?} is not a URL")))?;
        Ok(IpfsBlobStore {
            client,
            api: Arc::from(api),
            options,
        })
    }

    /// The RPC API URL.
    pub fn api(&self) -> &str {
        &self.api
    }

    pub fn options(&self) -> IpfsOptions {
        self.options
    }

    /// Asks the node for its version: `Ok` when it answers within the timeout.
    pub async fn check(&self) -> Result<String> {
        let version = self
            .call("version", self.client.version())
            .await?
            .map_err(node_error("version"))?;
        Ok(version.version)
    }

    /// The CIDs the node pins recursively (what [`BlobStore::put`] pins).
    pub async fn pins(&self) -> Result<HashSet<String>> {
        let pins = self
            .call("pin ls", self.client.pin_ls(None, Some("recursive")))
            .await?
            .map_err(node_error("pin ls"))?;
        // Normalize, so a node printing another base still matches our names.
        Ok(pins
            .keys
            .into_keys()
            .map(|k| cid::Cid::try_from(k.as_str()).map_or(k, |c| c.to_string()))
            .collect())
    }

    /// Runs one call under the per-call timeout.
    async fn call<T>(&self, op: &'static str, fut: impl Future<Output = T>) -> Result<T> {
        tokio::time::timeout(self.options.timeout, fut)
            .await
            .map_err(|_| too_slow(op, self.options.timeout))
    }

    /// Unpins, logging instead of failing: clean-up after a failed put.
    async fn unpin_quietly(&self, cid: &str) {
        let result = self.call("pin rm", self.client.pin_rm(cid, true)).await;
        match result {
            Ok(Ok(_)) => tracing::info!(cid, "unpinned the blob of a failed put"),
            Ok(Err(e)) => tracing::debug!(cid, error = %e, "nothing to unpin after a failed put"),
            Err(e) => tracing::warn!(cid, error = %e, "could not unpin after a failed put"),
        }
    }
}

#[async_trait]
impl BlobStore for IpfsBlobStore {
    async fn put(&self, bytes: Bytes) -> Result<String> {
        let pieces: Vec<Result<Bytes>> = (0..bytes.len())
            .step_by(PUT_PIECE)
            .map(|at| Ok(bytes.slice(at..(at + PUT_PIECE).min(bytes.len()))))
            .collect();
        self.put_stream(futures::stream::iter(pieces).boxed()).await
    }

    async fn put_stream(&self, mut data: ByteStream) -> Result<String> {
        let timeout = self.options.timeout;
        // The request body reads from this channel: the node pulls, we push, one piece ahead.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(1);
        let body = ReceiverStream::new(rx).into_async_read();
        let options = request::Add {
            cid_version: Some(1),
            raw_leaves: Some(true),
            chunker: Some(CHUNKER),
            hash: Some("sha2-256"),
            pin: Some(true),
            ..Default::default()
        };
        let add = self.client.add_async_with_options(body, options);
        let feed = async move {
            let mut builder = CidBuilder::new();
            while let Some(piece) = data.next().await {
                let piece = piece?;
                builder.update(&piece);
                match tokio::time::timeout(timeout, tx.send(Ok(piece))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        return Err(StorageError::unavailable(
                            "add: the node stopped reading the upload",
                        ));
                    }
                    Err(_) => return Err(too_slow("add (upload)", timeout)),
                }
            }
            Ok(builder.finish().to_string())
            // `tx` drops here: the body ends.
        };
        tokio::pin!(add);
        tokio::pin!(feed);
        let expected = tokio::select! {
            biased;
            answer = &mut add => {
                // The node answered before the whole blob went out: it failed.
                return Err(match answer {
                    Err(e) => node_error("add")(e),
                    Ok(r) => StorageError::unavailable(format!(
                        "add: the node answered {} before the upload ended", r.hash
                    )),
                });
            }
            fed = &mut feed => match fed {
                Ok(cid) => cid,
                Err(e) => {
                    // Prefer the node's own error when it has one ready.
                    if let Ok(Err(node)) =
                        tokio::time::timeout(Duration::from_millis(200), &mut add).await
                    {
                        return Err(node_error("add")(node));
                    }
                    return Err(e);
                }
            },
        };
        let answer = match tokio::time::timeout(timeout, add).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(node_error("add")(e)),
            Err(_) => {
                // The node may still finish and pin it: take the pin back.
                self.unpin_quietly(&expected).await;
                return Err(too_slow("add", timeout));
            }
        };
        let got = cid::Cid::try_from(answer.hash.as_str())
            .map(|c| c.to_string())
            .unwrap_or(answer.hash);
        if got != expected {
            self.unpin_quietly(&got).await;
            return Err(StorageError::Integrity {
                reason: format!("the IPFS node named the blob {got}, its CID is {expected}"),
            });
        }
        Ok(expected)
    }

    async fn get(&self, cid: &str) -> Result<ByteStream> {
        let want = parse_cid(cid)?;
        let IpfsOptions {
            timeout,
            first_byte_timeout,
        } = self.options;
        let mut cat = self.client.cat(&want.to_string());
        let first = match tokio::time::timeout(first_byte_timeout, cat.next()).await {
            Ok(Some(Ok(first))) => Some(first),
            Ok(None) => None,
            // Cannot connect: nothing else will work either.
            Ok(Some(Err(e @ ipfs_api_backend_hyper::Error::Client(_)))) => {
                return Err(node_error("cat")(e));
            }
            // The node refused or (some nodes, on a CID they lack) hangs: ask the pins
            // whether the blob is ours at all.
            failed => {
                let why = match failed {
                    Ok(Some(Err(e))) => node_error("cat")(e),
                    _ => too_slow("cat", first_byte_timeout),
                };
                return match self.pins().await {
                    Ok(pins) if !pins.contains(&want.to_string()) => Err(StorageError::NotFound {
                        cid: want.to_string(),
                    }),
                    Ok(_) => Err(why),
                    Err(e) => Err(e),
                };
            }
        };
        struct State {
            cat: Box<
                dyn futures::Stream<Item = Result<Bytes, ipfs_api_backend_hyper::Error>>
                    + Send
                    + Unpin,
            >,
            first: Option<Bytes>,
            builder: Option<CidBuilder>,
            want: cid::Cid,
        }
        let state = State {
            cat,
            first,
            builder: Some(CidBuilder::new()),
            want,
        };
        let stream = futures::stream::try_unfold(state, move |mut st| async move {
            let Some(builder) = st.builder.as_mut() else {
                return Ok(None);
            };
            let next = match st.first.take() {
                Some(first) => Some(first),
                None => match tokio::time::timeout(timeout, st.cat.next()).await {
                    Ok(Some(Ok(piece))) => Some(piece),
                    Ok(Some(Err(e))) => return Err(node_error("cat")(e)),
                    Ok(None) => None,
                    Err(_) => return Err(too_slow("cat", timeout)),
                },
            };
            match next {
                Some(piece) => {
                    builder.update(&piece);
                    Ok(Some((piece, st)))
                }
                None => {
                    let got = st.builder.take().map(CidBuilder::finish);
                    if got != Some(st.want) {
                        return Err(StorageError::Integrity {
                            reason: format!(
                                "the IPFS node's bytes for {} hash to {}",
                                st.want,
                                got.map(|c| c.to_string()).unwrap_or_default()
                            ),
                        });
                    }
                    Ok(None)
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn contains(&self, cid: &str) -> Result<bool> {
        let cid = parse_cid(cid)?.to_string();
        Ok(self.pins().await?.contains(&cid))
    }

    async fn remove(&self, cid: &str) -> Result<bool> {
        let cid = parse_cid(cid)?.to_string();
        if !self.pins().await?.contains(&cid) {
            return Ok(false);
        }
        self.call("pin rm", self.client.pin_rm(&cid, true))
            .await?
            .map_err(node_error("pin rm"))?;
        Ok(true)
    }

    async fn list(&self) -> Result<Vec<String>> {
        Ok(self.pins().await?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(IpfsBlobStore::new("http://127.0.0.1:5001", IpfsOptions::default()).is_ok());
        for bad in ["", "127.0.0.1:5001", "ftp://x:1", "not a url"] {
            assert!(
                matches!(
                    IpfsBlobStore::new(bad, IpfsOptions::default()),
                    Err(StorageError::InvalidArgument { .. })
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_node_that_is_not_there_is_unavailable() {
        // A port nobody listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = IpfsBlobStore::new(&format!("http://127.0.0.1:{port}"), IpfsOptions::default())
            .unwrap();
        let e = store.put(Bytes::from_static(b"hello")).await.unwrap_err();
        assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
        assert_eq!(e.code(), modelhub_core::ErrorCode::Unavailable);
        let cid = crate::unixfs::cid_of_bytes(b"hello").to_string();
        assert!(matches!(
            store.get(&cid).await.err(),
            Some(StorageError::Unavailable { .. })
        ));
        assert!(matches!(
            store.list().await.err(),
            Some(StorageError::Unavailable { .. })
        ));
        assert!(matches!(
            store.get("../x").await.err(),
            Some(StorageError::InvalidArgument { .. })
        ));
    }
}

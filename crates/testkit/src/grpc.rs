//! gRPC helpers for service tests: a spawned server that stops on demand, and putting a model
//! into storage the way the gateway does.

use modelhub_mtls::Identity;
use modelhub_proto::common::v1::ModelRef;
use modelhub_proto::storage::v1 as spb;
use modelhub_proto::storage::v1::put_model_request::Part;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A service started with `run(settings, listener, shutdown)` on a loopback port.
#[derive(Debug)]
pub struct Server {
    /// `https://127.0.0.1:PORT` (the services speak mutual TLS: connect with
    /// [`crate::tls::TestPki::channel`]).
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// Binds `127.0.0.1:0` and spawns `run(listener, shutdown)`.
    pub async fn start<F, Fut>(run: F) -> Server
    where
        F: FnOnce(
            tokio::net::TcpListener,
            std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        ) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(
            listener,
            Box::pin(async {
                let _ = stopped.await;
            }),
        ));
        Server {
            url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A lazily connected channel to the `server` service it runs, as `caller`, with the
    /// shared test certificates ([`crate::tls::TestPki::shared`]).
    pub fn channel(&self, caller: Identity, server: Identity) -> Channel {
        crate::tls::TestPki::shared().channel(caller, server, &self.url)
    }

    /// Stops the server and waits until it has returned (panics if it failed).
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

/// Puts `bytes` into storage as `model_id` version 1, in 1000-byte chunks; returns the
/// reference a registry would keep and storage's whole answer.
pub async fn put_model(
    storage: &mut StorageClient<Channel>,
    model_id: &str,
    bytes: &[u8],
) -> Result<(ModelRef, spb::PutModelResponse), tonic::Status> {
    let part = |p| spb::PutModelRequest { part: Some(p) };
    let mut msgs = vec![part(Part::Header(spb::PutHeader {
        model_id: model_id.into(),
        version: "1".into(),
    }))];
    msgs.extend(bytes.chunks(1000).map(|c| part(Part::Chunk(c.to_vec()))));
    msgs.push(part(Part::Finish(spb::PutFinish {})));
    let put = storage
        .put_model(tokio_stream::iter(msgs))
        .await?
        .into_inner();
    let model = ModelRef {
        model_id: model_id.into(),
        version: "1".into(),
        cid: put.cid.clone(),
        wrapped_dek: put.wrapped_dek.clone(),
        sha256: put.sha256.clone(),
        size: put.size,
    };
    Ok((model, put))
}

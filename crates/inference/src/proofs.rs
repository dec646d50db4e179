//! The one long-lived `Submit` stream to the prover: predictions that asked for a proof are
//! queued here and streamed as `(job id, model, input, float output)`. A broken stream is
//! reopened (after a short pause); jobs already handed to a broken stream are lost and their
//! proof stays unknown, which clients see as `not_found` (docs/ZK.md).

use std::time::Duration;

use modelhub_mtls::{Identity, TlsDir};
use modelhub_proto::prover::v1::ProofJob;
use modelhub_proto::prover::v1::prover_client::ProverClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Jobs waiting for the stream before new proof requests are refused.
pub const QUEUE: usize = 1024;

/// Where proof jobs go.
#[derive(Debug, Clone)]
pub struct ProofSink {
    tx: mpsc::Sender<ProofJob>,
}

impl ProofSink {
    /// Starts the forwarding task for a prover endpoint (`https://`, mutual TLS with `tls`).
    pub fn connect(tls: &TlsDir, endpoint: &str) -> Result<ProofSink, String> {
        let channel = tls
            .endpoint(Identity::Prover, endpoint)
            .map_err(|e| e.to_string())?
            .connect_lazy();
        let client = ProverClient::new(channel).max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(forward(client, rx));
        Ok(ProofSink { tx })
    }

    /// Queues a job; fails when the queue is full or the sink is gone.
    pub fn submit(&self, job: ProofJob) -> Result<(), &'static str> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "the proof queue is full",
            mpsc::error::TrySendError::Closed(_) => "the prover link is closed",
        })
    }
}

/// Moves jobs from the queue onto a `Submit` stream, reopening the stream when it breaks.
async fn forward(client: ProverClient<Channel>, mut rx: mpsc::Receiver<ProofJob>) {
    let mut pending: Option<ProofJob> = None;
    loop {
        let (stream_tx, stream_rx) = mpsc::channel::<ProofJob>(64);
        let mut c = client.clone();
        let call = tokio::spawn(async move { c.submit(ReceiverStream::new(stream_rx)).await });
        loop {
            let job = match pending.take() {
                Some(job) => job,
                None => match rx.recv().await {
                    Some(job) => job,
                    // Every sender is gone: the service is stopping.
                    None => return,
                },
            };
            if let Err(mpsc::error::SendError(job)) = stream_tx.send(job).await {
                pending = Some(job);
                break;
            }
        }
        match call.await {
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "prover stream broke; reopening")
            }
            Ok(Ok(_)) => tracing::warn!("prover stream ended; reopening"),
            Err(e) => tracing::warn!(error = %e, "prover stream task failed; reopening"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

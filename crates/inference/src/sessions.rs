//! One cached model: its input signature and a small pool of ONNX Runtime sessions.
//!
//! `ort`'s `Session::run` needs `&mut`, so a session serves one run at a time. A model keeps
//! up to `max_sessions` of them, opened on demand: the first at load time, more only when runs
//! overlap. To open more it keeps the plaintext model bytes in memory (never on disk); with
//! `max_sessions = 1` it keeps none. The plaintext is zeroized when it is freed
//! ([`SecretBytes`]); what ONNX Runtime copies into its session is the runtime's.

use std::sync::{Condvar, Mutex, MutexGuard};

use modelhub_core::secret::SecretBytes;
use modelhub_core::{Tensor, TensorSpec};
use modelhub_onnx::{Model, OnnxError, RunLimits};

struct Pool {
    idle: Vec<Model>,
    open: usize,
}

/// An open model in the session cache.
pub struct Loaded {
    inputs: Vec<TensorSpec>,
    plaintext: Option<SecretBytes>,
    intra_op_threads: usize,
    max_sessions: usize,
    pool: Mutex<Pool>,
    returned: Condvar,
    bytes: u64,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("inputs", &self.inputs)
            .field("bytes", &self.bytes)
            .field("max_sessions", &self.max_sessions)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    /// Opens the first session of a model (CPU work: call it off the reactor).
    pub fn open(
        plaintext: SecretBytes,
        intra_op_threads: usize,
        max_sessions: usize,
    ) -> Result<Loaded, OnnxError> {
        let max_sessions = max_sessions.max(1);
        let first = modelhub_onnx::load(&plaintext, intra_op_threads)?;
        Ok(Loaded {
            inputs: first.inputs().to_vec(),
            bytes: plaintext.len() as u64,
            plaintext: (max_sessions > 1).then_some(plaintext),
            intra_op_threads,
            max_sessions,
            pool: Mutex::new(Pool {
                idle: vec![first],
                open: 1,
            }),
            returned: Condvar::new(),
        })
    }

    /// The model's declared inputs.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// Size of the model in bytes (its weight in the cache).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Sessions opened so far.
    pub fn sessions(&self) -> usize {
        self.lock().open
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the model on an idle session, opening one more when all are busy and the limit
    /// allows, else waiting for one (blocking: call it on a compute thread).
    pub fn run(&self, inputs: &[Tensor], limits: &RunLimits) -> Result<Vec<Tensor>, OnnxError> {
        let mut session = self.checkout()?;
        let model = session.model.as_mut().expect("a checkout holds a session");
        model.run_limited(inputs, limits)
    }

    fn checkout(&self) -> Result<Checkout<'_>, OnnxError> {
        let mut pool = self.lock();
        loop {
            if let Some(model) = pool.idle.pop() {
                return Ok(Checkout {
                    loaded: self,
                    model: Some(model),
                });
            }
            if let Some(bytes) = &self.plaintext
                && pool.open < self.max_sessions
            {
                pool.open += 1;
                drop(pool);
                return match modelhub_onnx::load(bytes, self.intra_op_threads) {
                    Ok(model) => Ok(Checkout {
                        loaded: self,
                        model: Some(model),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.returned.notify_one();
                        Err(e)
                    }
                };
            }
            pool = self.returned.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A session taken from the pool; it goes back when dropped, even after a panic.
struct Checkout<'a> {
    loaded: &'a Loaded,
    model: Option<Model>,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(model) = self.model.take() {
            self.loaded.lock().idle.push(model);
            self.loaded.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn digits() -> SecretBytes {
        std::fs::read(modelhub_testkit::test_model("digits_mlp.onnx"))
            .unwrap()
            .into()
    }

    #[test]
    fn overlapping_runs_open_at_most_the_limit() {
        let loaded = Arc::new(Loaded::open(digits(), 1, 2).unwrap());
        assert_eq!(loaded.sessions(), 1);
        let x = Tensor::from_f32("X", vec![1, 64], &[0.5; 64]).unwrap();
        let want = loaded
            .run(std::slice::from_ref(&x), &RunLimits::default())
            .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (loaded, x, want) = (loaded.clone(), x.clone(), want.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        assert_eq!(
                            loaded
                                .run(std::slice::from_ref(&x), &RunLimits::default())
                                .unwrap(),
                            want
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let open = loaded.sessions();
        assert!((1..=2).contains(&open), "{open} sessions");
        let idle = loaded.lock().idle.len();
        assert_eq!(idle, open, "every session went back to the pool");
    }

    #[test]
    fn one_session_keeps_no_plaintext() {
        let loaded = Loaded::open(digits(), 1, 1).unwrap();
        assert!(loaded.plaintext.is_none());
        let x = Tensor::from_f32("X", vec![2, 64], &[0.0; 128]).unwrap();
        assert_eq!(
            loaded.run(&[x], &RunLimits::default()).unwrap()[1].shape,
            vec![2, 10]
        );
        assert_eq!(loaded.sessions(), 1);
    }
}

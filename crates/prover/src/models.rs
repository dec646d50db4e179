//! Compiled models: circuit, weight commitment and the commitment's private opening.
//!
//! At upload the prover compiles the model and commits to its weights; the opening (the
//! blinding factors) is stored sealed by the KEK in `<data_dir>/models/<model_id>.json`, beside
//! the public spec and commitment. The quantized weights themselves are never written: after a
//! restart the model is fetched from storage again and recompiled (compilation is
//! deterministic), and the result must give the stored spec.

use modelhub_core::secret::SecretBytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use modelhub_core::crypto::Kek;
use modelhub_core::pool::ComputePool;
use modelhub_core::{InputRange, TensorSpec};
use modelhub_proto::common::v1::{ModelRef, ResealReport};
use modelhub_proto::storage::v1::storage_client::StorageClient;
use modelhub_zk::{
    CircuitSpec, Commitment, KeySource, Keys, ModelDigest, Opening, Params, QuantizedModel,
};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::error::ProverError;

/// Largest circuit size the prover accepts (params for larger k are too slow to make here).
pub const MAX_K: u32 = 18;

/// A model ready to prove.
pub struct Compiled {
    pub model: QuantizedModel,
    pub commitment: Commitment,
    pub opening: Opening,
    pub params: Arc<Params>,
    pub keys: Keys,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("commitment", &self.commitment)
            .finish_non_exhaustive()
    }
}

/// What compiling a model gave.
#[derive(Debug)]
pub enum Outcome {
    Supported {
        commitment: Commitment,
        spec: CircuitSpec,
        digest: ModelDigest,
        /// For the owner, once (the gateway passes it on and stores it nowhere).
        opening: Opening,
    },
    Unsupported {
        reason: String,
    },
}

/// The stored record of a compiled model.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: CircuitSpec,
    commitment: Commitment,
    input_len: usize,
    /// The declared input range calibration used (records from before it existed: `[0, 1]`).
    #[serde(default)]
    input_range: InputRange,
    /// The opening, JSON sealed by the KEK (AAD: model id), base64.
    sealed_opening: String,
}

/// Params per circuit size and proving keys per circuit spec, made once and cached on disk
/// (`<params_dir>/params-k{k}.bin`, `<params_dir>/keys/keys-<spec hash>.bin`).
#[derive(Debug)]
pub struct ParamsCache {
    dir: PathBuf,
    loaded: Mutex<HashMap<u32, Arc<Params>>>,
}

impl ParamsCache {
    pub fn new(dir: PathBuf) -> ParamsCache {
        ParamsCache {
            dir,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// Blocking: loads or makes the params for `k`.
    pub fn get(&self, k: u32) -> Result<Arc<Params>, ProverError> {
        if k > MAX_K {
            return Err(ProverError::BadRequest(format!(
                "circuit size k={k} is above the limit {MAX_K}"
            )));
        }
        // Holding the lock while making params keeps two callers from making the same file.
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = loaded.get(&k) {
            return Ok(p.clone());
        }
        let params = Arc::new(Params::load_or_create(&self.dir, k)?);
        loaded.insert(k, params.clone());
        Ok(params)
    }

    /// Where proving keys are stored.
    pub fn keys_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }

    /// Blocking: the proving keys for `spec`, read from disk, or made by keygen and stored.
    pub fn keys(&self, params: &Params, spec: &CircuitSpec) -> Result<Keys, ProverError> {
        let started = std::time::Instant::now();
        let (keys, source) = Keys::load_or_create(params, spec, &self.keys_dir())?;
        let ms = started.elapsed().as_millis() as u64;
        match source {
            KeySource::Disk => tracing::info!(k = spec.k, ms, "proving keys read from disk"),
            KeySource::Keygen { stale, not_stored } => {
                if let Some(reason) = stale {
                    tracing::warn!(%reason, "stored proving keys not usable; making them again");
                }
                match not_stored {
                    None => tracing::info!(k = spec.k, ms, "proving keys made and stored"),
                    Some(reason) => tracing::warn!(
                        k = spec.k,
                        ms,
                        %reason,
                        "proving keys made but not stored: the next start makes them again"
                    ),
                }
            }
        }
        Ok(keys)
    }
}

/// Compiled models kept in memory (each holds its circuit keys); others are rebuilt on use.
const COMPILED_MODELS: u64 = 64;

/// Where the records of compiled models (spec, commitment, sealed opening) are kept.
#[derive(Debug, Clone)]
pub enum Records {
    /// `<dir>/<model_id>.json`, written durably: one prover.
    Dir(PathBuf),
    /// The state every replica shares.
    Shared(crate::shared::Shared),
}

impl Records {
    async fn read(&self, model_id: &str) -> Result<Option<Vec<u8>>, ProverError> {
        match self {
            Records::Dir(dir) => match std::fs::read(dir.join(format!("{model_id}.json"))) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(state_err(dir, e)),
            },
            Records::Shared(s) => s.read_model(model_id).await,
        }
    }

    async fn write(&self, model_id: &str, record: &[u8]) -> Result<(), ProverError> {
        match self {
            Records::Dir(dir) => {
                let path = dir.join(format!("{model_id}.json"));
                modelhub_core::fs::write_durably(&path, record).map_err(|e| state_err(&path, e))
            }
            Records::Shared(s) => s.write_model(model_id, record).await,
        }
    }

    /// The ids of every stored record.
    async fn list(&self) -> Result<Vec<String>, ProverError> {
        match self {
            Records::Dir(dir) => {
                let entries = std::fs::read_dir(dir).map_err(|e| state_err(dir, e))?;
                let mut ids = Vec::new();
                for entry in entries {
                    let name = entry.map_err(|e| state_err(dir, e))?.file_name();
                    if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
                        ids.push(id.to_owned());
                    }
                }
                ids.sort();
                Ok(ids)
            }
            Records::Shared(s) => s.list_models().await,
        }
    }

    /// Replaces a record if it still is `old`; whether it did. (A directory has one prover
    /// writing it, so there the check is a read.)
    async fn replace(&self, model_id: &str, old: &[u8], new: &[u8]) -> Result<bool, ProverError> {
        match self {
            Records::Dir(_) => {
                if self.read(model_id).await?.as_deref() != Some(old) {
                    return Ok(false);
                }
                self.write(model_id, new).await?;
                Ok(true)
            }
            Records::Shared(s) => s.replace_model(model_id, old, new).await,
        }
    }

    /// Whether there was a record.
    async fn remove(&self, model_id: &str) -> Result<bool, ProverError> {
        match self {
            Records::Dir(dir) => {
                let path = dir.join(format!("{model_id}.json"));
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(state_err(&path, e)),
                }
            }
            Records::Shared(s) => s.remove_model(model_id).await,
        }
    }
}

/// The compiled models of this prover.
pub struct Models {
    records: Records,
    kek: Kek,
    storage: StorageClient<Channel>,
    pub params: Arc<ParamsCache>,
    pool: ComputePool,
    /// Compiled models by id. One load per model at a time (callers of that model wait for
    /// it), while other models load and prove meanwhile: a slow model stalls only its own
    /// callers.
    cache: moka::future::Cache<String, Arc<Compiled>>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("records", &self.records)
            .finish_non_exhaustive()
    }
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> ProverError {
    ProverError::State(format!("{}: {e}", path.display()))
}

pub use modelhub_zk::calibration_inputs;

/// Compiles a stored model again (after a restart) into the circuit its record names. A model
/// committed under an earlier lane layout keeps it, since its commitment has one point per
/// lane, even where the compiler would choose wider lanes today. Anything else that differs
/// from the stored spec is an error.
pub fn recompile(
    bytes: &[u8],
    stored: &CircuitSpec,
    input_len: usize,
    input_range: InputRange,
) -> Result<QuantizedModel, ProverError> {
    let mut quantized = modelhub_zk::compile(bytes, &calibration_inputs(input_len, input_range))?;
    if quantized.spec.lanes != stored.lanes {
        quantized = quantized.with_lanes(stored.lanes)?;
    }
    if quantized.spec != *stored {
        return Err(ProverError::State(
            "recompiled circuit differs from the stored spec".into(),
        ));
    }
    Ok(quantized)
}

pub use modelhub_zk::input_len;

impl Models {
    pub fn new(
        records: Records,
        params_dir: PathBuf,
        kek: Kek,
        storage: StorageClient<Channel>,
        pool: ComputePool,
    ) -> Result<Models, ProverError> {
        if let Records::Dir(dir) = &records {
            std::fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
        }
        Ok(Models {
            records,
            kek,
            storage,
            params: Arc::new(ParamsCache::new(params_dir)),
            pool,
            cache: moka::future::Cache::builder()
                .max_capacity(COMPILED_MODELS)
                .build(),
        })
    }

    /// The model's plaintext from storage, checked like an upload (no external data, standard
    /// operator domains only) before the circuit compiler parses it: storage checked it at
    /// upload, this is defence in depth for anything that reached storage otherwise.
    async fn fetch(&self, model: &ModelRef) -> Result<SecretBytes, ProverError> {
        let mut storage = self.storage.clone();
        let bytes = modelhub_storage::client::fetch_model(&mut storage, model.clone()).await?;
        modelhub_onnx::check_untrusted(&bytes)
            .map_err(|e| ProverError::BadRequest(format!("model refused: {e}")))?;
        Ok(bytes)
    }

    /// Compiles a newly stored model and commits to its weights.
    pub async fn compile(
        &self,
        model: ModelRef,
        inputs: &[TensorSpec],
        input_range: InputRange,
    ) -> Result<Outcome, ProverError> {
        if !crate::jobs::valid_job_id(&model.model_id) {
            return Err(ProverError::BadRequest("a model id is required".into()));
        }
        let input_len = match input_len(inputs) {
            Ok(n) => n,
            Err(reason) => return Ok(Outcome::Unsupported { reason }),
        };
        let bytes = self.fetch(&model).await?;
        let params_cache = self.params.clone();
        let built = self
            .pool
            .run(move || -> Result<Result<Compiled, String>, ProverError> {
                let quantized =
                    match modelhub_zk::compile(&bytes, &calibration_inputs(input_len, input_range))
                    {
                        Ok(q) => q,
                        Err(e @ modelhub_zk::ZkError::Unsupported { .. }) => {
                            return Ok(Err(e.to_string()));
                        }
                        Err(e) => return Err(e.into()),
                    };
                let params = params_cache.get(quantized.spec.k)?;
                let (commitment, opening) = modelhub_zk::commit(&quantized, &params)?;
                let keys = params_cache.keys(&params, &quantized.spec)?;
                Ok(Ok(Compiled {
                    model: quantized,
                    commitment,
                    opening,
                    params,
                    keys,
                }))
            })
            .await??;
        let compiled = match built {
            Ok(c) => c,
            Err(reason) => return Ok(Outcome::Unsupported { reason }),
        };
        let opening_json =
            serde_json::to_vec(&compiled.opening).map_err(|e| ProverError::State(e.to_string()))?;
        let record = Record {
            spec: compiled.model.spec.clone(),
            commitment: compiled.commitment.clone(),
            input_len,
            input_range,
            sealed_opening: STANDARD
                .encode(self.kek.wrap(&opening_json, model.model_id.as_bytes())),
        };
        let bytes =
            serde_json::to_vec_pretty(&record).map_err(|e| ProverError::State(e.to_string()))?;
        self.records.write(&model.model_id, &bytes).await?;
        let outcome = Outcome::Supported {
            commitment: compiled.commitment.clone(),
            spec: compiled.model.spec.clone(),
            digest: ModelDigest::of(&compiled.model.spec, &compiled.commitment),
            opening: compiled.opening.clone(),
        };
        self.cache
            .insert(model.model_id.clone(), Arc::new(compiled))
            .await;
        Ok(outcome)
    }

    /// A KEK rotation's re-wrap: every stored opening sealed again under the current key of
    /// the KEK ring (resumable: openings already under it are left alone).
    pub async fn reseal(&self) -> Result<ResealReport, ProverError> {
        let mut tally = modelhub_core::kek::ResealTally::default();
        for model_id in self.records.list().await? {
            let path = Path::new(&model_id);
            let Some(bytes) = self.records.read(&model_id).await? else {
                tally.gone();
                continue;
            };
            let record: Record = serde_json::from_slice(&bytes).map_err(|e| state_err(path, e))?;
            let sealed = STANDARD
                .decode(&record.sealed_opening)
                .map_err(|e| state_err(path, e))?;
            let store = async |again: Vec<u8>| {
                let record = Record {
                    sealed_opening: STANDARD.encode(again),
                    ..record.clone()
                };
                let new = serde_json::to_vec_pretty(&record)
                    .map_err(|e| ProverError::State(e.to_string()))?;
                self.records.replace(&model_id, &bytes, &new).await
            };
            let name = || format!("opening of model {model_id}");
            tally
                .value(&self.kek, &sealed, model_id.as_bytes(), name, store)
                .await?;
        }
        Ok(tally.finish(&self.kek, "commitment openings"))
    }

    /// Removes the stored record (the sealed opening) and the cached circuit of a model that
    /// was never registered; whether there was a record.
    pub async fn forget(&self, model_id: &str) -> Result<bool, ProverError> {
        self.cache.invalidate(model_id).await;
        self.records.remove(model_id).await
    }

    /// The compiled model, from memory or rebuilt from storage and its stored record.
    pub async fn get(&self, model: &ModelRef) -> Result<Arc<Compiled>, ProverError> {
        self.cache
            .try_get_with(model.model_id.clone(), self.load(model))
            .await
            .map_err(ProverError::Shared)
    }

    /// Rebuilds a compiled model from storage and its stored record.
    async fn load(&self, model: &ModelRef) -> Result<Arc<Compiled>, ProverError> {
        let path = Path::new(&model.model_id); // names the record in errors
        let record: Record = match self.records.read(&model.model_id).await? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| state_err(path, e))?,
            None => return Err(ProverError::NoCircuit(model.model_id.clone())),
        };
        let sealed = STANDARD
            .decode(&record.sealed_opening)
            .map_err(|e| state_err(path, e))?;
        let opening_json = self
            .kek
            .unwrap(&sealed, model.model_id.as_bytes())
            .map_err(|e| state_err(path, e))?;
        let opening: Opening =
            serde_json::from_slice(&opening_json).map_err(|e| state_err(path, e))?;
        let bytes = self.fetch(model).await?;
        let params_cache = self.params.clone();
        let compiled = self
            .pool
            .run(move || -> Result<Compiled, ProverError> {
                let quantized =
                    recompile(&bytes, &record.spec, record.input_len, record.input_range)?;
                let params = params_cache.get(quantized.spec.k)?;
                let keys = params_cache.keys(&params, &quantized.spec)?;
                Ok(Compiled {
                    model: quantized,
                    commitment: record.commitment,
                    opening,
                    params,
                    keys,
                })
            })
            .await??;
        Ok(Arc::new(compiled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelhub_core::DataType;

    /// A 64 → 96 → 10 MLP: the compiler lays it out in wide lanes.
    fn wide_mlp(seed: u64) -> Vec<u8> {
        use modelhub_zk::onnx::{mlp_onnx, random_dense};
        mlp_onnx(&[
            random_dense(64, 96, true, seed ^ 1, 2.0),
            random_dense(96, 10, false, seed ^ 2, 2.0),
        ])
    }

    #[test]
    fn a_model_stored_under_an_older_lane_layout_keeps_it() {
        let bytes = wide_mlp(7);
        let today = recompile(&bytes, &compile_now(&bytes), 64, InputRange::default()).unwrap();
        assert!(today.spec.lanes > 8, "the test model must pick wide lanes");

        // A record written when every model had 8 lanes.
        let old = today.with_lanes(8).unwrap().spec;
        let again = recompile(&bytes, &old, 64, InputRange::default()).unwrap();
        assert_eq!(again.spec, old);
        assert_eq!(again.spec.lanes, 8);

        // A spec the model doesn't compile to is still refused (the spec covers shapes and
        // scales; the weights are bound by the commitment, checked at proving).
        let mut wrong = old.clone();
        wrong.k += 1;
        let refused = recompile(&bytes, &wrong, 64, InputRange::default());
        assert!(matches!(refused, Err(ProverError::State(_))), "{refused:?}");
    }

    #[test]
    fn a_model_recompiles_with_the_input_range_it_was_stored_with() {
        let bytes = wide_mlp(3);
        let range = InputRange::new(-6.0, 6.0).unwrap();
        let spec = modelhub_zk::compile(&bytes, &calibration_inputs(64, range))
            .unwrap()
            .spec;
        assert_ne!(
            spec,
            compile_now(&bytes),
            "the range changes the calibration"
        );
        assert_eq!(recompile(&bytes, &spec, 64, range).unwrap().spec, spec);
        let refused = recompile(&bytes, &spec, 64, InputRange::default());
        assert!(matches!(refused, Err(ProverError::State(_))), "{refused:?}");
        // Records written before ranges existed read as [0, 1].
        let old: Record = serde_json::from_value(serde_json::json!({
            "spec": compile_now(&bytes),
            "commitment": "00".repeat(32 * 8),
            "input_len": 64,
            "sealed_opening": "",
        }))
        .unwrap();
        assert_eq!(old.input_range, InputRange::default());
    }

    fn compile_now(bytes: &[u8]) -> CircuitSpec {
        modelhub_zk::compile(bytes, &calibration_inputs(64, InputRange::default()))
            .unwrap()
            .spec
    }

    #[test]
    fn calibration_inputs_are_deterministic_and_in_range() {
        let a = calibration_inputs(64, InputRange::default());
        assert_eq!(a, calibration_inputs(64, InputRange::default()));
        assert_eq!(a.len(), modelhub_zk::CALIBRATION_SAMPLES + 2);
        assert!(a.iter().flatten().all(|v| (0.0..=1.0).contains(v)));
        assert!(
            a[2..].iter().flatten().any(|v| *v > 0.5) && a[2..].iter().flatten().any(|v| *v < 0.5)
        );
        // A declared range: the samples fill it, ends included.
        let r = InputRange::new(-4.0, 12.0).unwrap();
        let b = calibration_inputs(16, r);
        assert!(b.iter().flatten().all(|v| (-4.0..=12.0).contains(v)));
        assert_eq!((b[0][0], b[1][0]), (-4.0, 12.0));
        assert!(
            b[2..].iter().flatten().any(|v| *v < 0.0) && b[2..].iter().flatten().any(|v| *v > 8.0)
        );
    }

    #[test]
    fn input_len_reads_the_signature() {
        let spec = |shape: Vec<i64>, datatype| {
            vec![TensorSpec {
                name: "X".into(),
                datatype,
                shape,
            }]
        };
        assert_eq!(input_len(&spec(vec![-1, 64], DataType::Fp32)), Ok(64));
        assert_eq!(input_len(&spec(vec![1, 1, 8, 8], DataType::Fp32)), Ok(64));
        assert!(
            input_len(&spec(vec![-1, -1], DataType::Fp32))
                .unwrap_err()
                .contains("fixed input shape")
        );
        assert!(
            input_len(&spec(vec![-1, 64], DataType::Int64))
                .unwrap_err()
                .contains("FP32")
        );
        assert!(input_len(&[]).unwrap_err().contains("one input"));
        // Shape bombs: refused without allocating, never an overflow.
        for shape in [
            vec![-1, 1 << 24],
            vec![1, 1 << 31],
            vec![1, 1 << 31, 1 << 31],
            vec![-1, i64::MAX, 2],
        ] {
            let err = input_len(&spec(shape, DataType::Fp32)).unwrap_err();
            assert!(err.contains("more than"), "{err}");
        }
    }
}

//! `modelhub proofs verify`: a proof is checked against the model the caller expects (its
//! digest from the gateway's model record, or given with `--digest`), never only against
//! itself: a valid proof of another model, or of another input, is refused (docs/ZK.md).

use std::path::{Path, PathBuf};

use anyhow::Context;
use modelhub_zk::{ModelDigest, ProofBundle};
use serde_json::{Value, json};

use crate::commands::{ClientArgs, print_json, resolve_model};

/// What `proofs verify` was told to expect.
#[derive(Debug)]
pub struct VerifyArgs {
    pub file: PathBuf,
    pub params_dir: PathBuf,
    /// A model id, `HANDLE/NAME@VERSION`, or `NAME@VERSION` (yours), resolved through the gateway.
    pub model: Option<String>,
    pub digest: Option<String>,
    /// A JSON file with the caller's float input (a list of numbers, or a tensor with `data`).
    pub input: Option<PathBuf>,
    pub self_consistent_only: bool,
    pub client: ClientArgs,
    pub on_chain: crate::chain::OnChainArgs,
}

/// Runs `proofs verify`; an error (non-zero exit) says what did not match.
pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let bundle = ProofBundle::from_json(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let (expected, record) = match (&args.model, &args.digest, args.self_consistent_only) {
        // The contract's record alone: no gateway involved.
        (Some(model_id), None, false) if args.on_chain.chain => {
            (Some(args.on_chain.digest(model_id).await?), None)
        }
        (Some(model), None, false) => {
            let client = args.client.client()?;
            let id = resolve_model(&client, model).await?;
            let record = client.get(&format!("/v1/models/{id}")).await?.ok()?;
            let digest = record["digest"].as_str().with_context(|| {
                format!("model {model} has no registered digest (no circuit, or uploaded before digests)")
            })?;
            (Some(digest.parse::<ModelDigest>()?), Some(record))
        }
        (None, Some(d), false) => (Some(d.parse::<ModelDigest>()?), None),
        (None, None, true) => (None, None),
        (None, None, false) => anyhow::bail!(
            "say which model the proof must be for: --model NAME@VERSION|ID or --digest HEX \
             (a proof checked only against itself proves nothing about which model answered)"
        ),
        _ => anyhow::bail!("give one of --model, --digest, --self-consistent-only"),
    };
    if let Some(record) = &record {
        // Say which part differs when the registry's record has the spec and commitment.
        if let (Ok(spec), Some(c)) = (
            serde_json::from_value::<modelhub_zk::CircuitSpec>(record["circuit_spec"].clone()),
            record["commitment"].as_str(),
        ) && let Ok(c) = modelhub_zk::Commitment::from_hex(c)
        {
            bundle
                .check_model(&spec, &c)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    if let Some(input) = &args.input {
        check_input(&bundle, input)?;
    }
    let bundle = verify_file_bundle(bundle, &args.params_dir, expected).await?;
    let input_hash = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for v in &bundle.public.input {
            h.update(v.to_le_bytes());
        }
        hex::encode(h.finalize())
    };
    let mut out = json!({
        "valid": true,
        "model_digest": bundle.public.model_digest,
        "job_id": bundle.public.job_id,
        "input_sha256": input_hash,
        "output": bundle.public.output,
        "output_dequantized": modelhub_zk::dequantize_output(&bundle.spec, &bundle.public.output),
    });
    if args.on_chain.chain {
        out["model_id"] = args.model.clone().into();
        out["checked_against"] = "chain".into();
    }
    if let Some(record) = record {
        out["model_id"] = record["model_id"].clone();
        out["model"] = record["name"].clone();
        out["version"] = record["version"].clone();
    }
    if expected.is_none() {
        out["warning"] = Value::from(
            "self-consistent only: this proves nothing about which model produced the output",
        );
    }
    print_json(&out);
    Ok(())
}

/// The caller's input, quantized with the proof's (verified, digest-bound) spec, must be the
/// proof's input.
fn check_input(bundle: &ProofBundle, path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).context("--input is not JSON")?;
    let data = match &v {
        Value::Array(_) => &v,
        _ => v
            .get("data")
            .or_else(|| v.pointer("/inputs/0/data"))
            .context("--input must be a list of numbers or a tensor with \"data\"")?,
    };
    let floats: Vec<f32> = data
        .as_array()
        .context("--input data must be a list")?
        .iter()
        .map(|x| {
            x.as_f64()
                .map(|f| f as f32)
                .context("--input data must be numbers")
        })
        .collect::<anyhow::Result<_>>()?;
    let q = modelhub_zk::quantize_input(&bundle.spec, &floats)
        .map_err(|e| anyhow::anyhow!("--input: {e}"))?;
    anyhow::ensure!(
        q == bundle.public.input,
        "input mismatch: the proof is for another input than {}",
        path.display()
    );
    Ok(())
}

/// Verifies a proof against `expected` (or only against itself when `None`); params and the
/// verifying key are made from the public spec on first use and cached in `params_dir`.
pub async fn verify_file_bundle(
    bundle: ProofBundle,
    params_dir: &Path,
    expected: Option<ModelDigest>,
) -> anyhow::Result<ProofBundle> {
    let params_dir = params_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let params = modelhub_zk::Params::load_or_create(&params_dir, bundle.spec.k)?;
        let expected = expected.unwrap_or_else(|| bundle.computed_digest());
        modelhub_zk::verify_cached(&params, &bundle, &expected, &params_dir.join("keys"))?;
        Ok::<_, anyhow::Error>(bundle)
    })
    .await?
    .context("the proof does not verify")
}

/// What `models check-commitment` was given.
#[derive(Debug)]
pub struct CheckArgs {
    pub file: PathBuf,
    pub opening: PathBuf,
    pub model: String,
    pub input_range: modelhub_core::InputRange,
    pub client: ClientArgs,
    pub params_dir: PathBuf,
    pub on_chain: crate::chain::OnChainArgs,
}

/// Compiles the ONNX file as the hub does (deterministic calibration over the declared input
/// range), commits to its weights with the upload's opening, and compares spec, commitment and
/// digest with the model's record; an error (non-zero exit) says which differs.
pub async fn check_commitment(args: CheckArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let opening: Value = serde_json::from_slice(
        &std::fs::read(&args.opening)
            .with_context(|| format!("reading {}", args.opening.display()))?,
    )
    .with_context(|| format!("{} is not JSON", args.opening.display()))?;
    // The upload answer itself, or just its `zk_opening`.
    let opening = opening.get("zk_opening").cloned().unwrap_or(opening);
    let opening: modelhub_zk::Opening = serde_json::from_value(opening)
        .with_context(|| format!("{} holds no opening (`zk_opening`)", args.opening.display()))?;
    let client = args.client.client()?;
    let id = resolve_model(&client, &args.model).await?;
    let record = client.get(&format!("/v1/models/{id}")).await?.ok()?;
    let registered: ModelDigest = record["digest"]
        .as_str()
        .with_context(|| format!("model {} has no registered digest", args.model))?
        .parse()?;
    let spec: modelhub_zk::CircuitSpec = serde_json::from_value(record["circuit_spec"].clone())
        .context("the model record has no circuit spec")?;
    let inputs: Vec<modelhub_core::TensorSpec> = serde_json::from_value(record["inputs"].clone())
        .context("the model record has no inputs")?;
    let input_len = modelhub_zk::input_len(&inputs).map_err(|e| anyhow::anyhow!(e))?;
    let (range, params_dir) = (args.input_range, args.params_dir.clone());
    let (local_spec, commitment) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut model =
            modelhub_zk::compile(&bytes, &modelhub_zk::calibration_inputs(input_len, range))?;
        if model.spec.lanes != spec.lanes {
            model = model.with_lanes(spec.lanes)?;
        }
        let params = modelhub_zk::Params::load_or_create(&params_dir, model.spec.k)?;
        let commitment = modelhub_zk::recommit(&model, &params, &opening)?;
        Ok((model.spec, commitment))
    })
    .await??;
    let digest = ModelDigest::of(&local_spec, &commitment);
    let on_chain = match args.on_chain.chain {
        true => Some(args.on_chain.digest(&id).await?),
        false => None,
    };
    let mut out = json!({
        "model_id": record["model_id"],
        "model": record["name"],
        "version": record["version"],
        "registered_digest": registered.to_hex(),
        "local_digest": digest.to_hex(),
        "matches": digest == registered && on_chain.is_none_or(|c| c == digest),
    });
    if let Some(c) = &on_chain {
        out["chain_digest"] = c.to_hex().into();
    }
    print_json(&out);
    anyhow::ensure!(
        local_spec == spec,
        "the circuit compiled from this file (with input range {}..{}) differs from the \
         registered spec: another file, or another input range",
        range.min,
        range.max
    );
    anyhow::ensure!(
        digest == registered,
        "the commitment made with this opening differs from the registered one: other weights, \
         or another opening"
    );
    anyhow::ensure!(
        on_chain.is_none_or(|c| c == digest),
        "the chain records another digest for this model than the one this file and opening give"
    );
    Ok(())
}

//! KEK rotation (`modelhub admin rotate-kek`) against a running marketplace: predictions go on
//! throughout, a rotation cut short after staging is resumed, a second run re-wraps nothing,
//! `--retire` leaves only the new key, and a restart with that file alone opens every model,
//! API key secret and commitment opening.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use crate::harness::{Cluster, digits_input, predict_with_proof, upload_digits};
use crate::processes::{modelhub, succeed};

/// Runs `modelhub admin rotate-kek` against `cluster` (and `extra` flags); its JSON output.
fn rotate_kek(cluster: &Cluster, extra: &[&str]) -> Value {
    let running = cluster.running.as_ref().unwrap();
    let out = succeed(
        modelhub()
            .args(["admin", "rotate-kek", "--kek-file"])
            .arg(cluster.data_dir().join("kek"))
            .args(["--registry", &running.endpoints.registry])
            .args(["--prover", &running.endpoints.prover])
            .arg("--mtls-dir")
            .arg(&running.mtls_dir)
            .args(["--settle-secs", "2"])
            .args(extra),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn keys_in_file(cluster: &Cluster) -> usize {
    std::fs::read_to_string(cluster.data_dir().join("kek"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kek_rotates_while_predictions_go_on_and_a_restart_needs_only_the_new_key() {
    let cluster = Cluster::start().await;
    let owner = cluster.user("owner", 0).await;
    let user = cluster.user("user", 100_000).await;
    let record = upload_digits(&owner, "digits", 1).await;
    let model = record["model_id"].as_str().unwrap().to_owned();
    assert!(record["commitment"].is_string(), "the model has a circuit");
    assert_eq!(keys_in_file(&cluster), 1);

    // Signed, charged predictions all through the rotation; none may fail.
    let going = Arc::new(AtomicBool::new(true));
    let load = tokio::spawn({
        let (user, model, going) = (user.clone(), model.clone(), going.clone());
        async move {
            let (mut answered, mut failed) = (0u64, Vec::new());
            while going.load(Ordering::Relaxed) {
                let answer = user.predict(&model, digits_input(1)).await.unwrap();
                if answer.status == 200 {
                    answered += 1;
                } else {
                    failed.push((answer.status, answer.body));
                }
            }
            (answered, failed)
        }
    });

    // A rotation whose command died right after staging the new key: the next run resumes.
    assert!(modelhub_core::kek::stage_new_key(&cluster.data_dir().join("kek")).unwrap());
    assert_eq!(keys_in_file(&cluster), 2);
    let run = rotate_kek(&cluster, &[]);
    assert_eq!(run["staged"], false, "{run}");
    // The model's data key and the admin's, owner's and user's key secrets.
    assert!(run["registry"]["resealed"].as_u64().unwrap() >= 4, "{run}");
    assert_eq!(
        run["registry"]["unreadable"],
        serde_json::json!([]),
        "{run}"
    );
    assert_eq!(
        run["registry"]["keys"], 2,
        "the registry followed the file: {run}"
    );
    assert_eq!(run["prover"]["resealed"], 1, "the model's opening: {run}");
    assert_eq!(run["retired_keys"], 0);

    // Everything is under the new key now: another run re-wraps nothing.
    let again = rotate_kek(&cluster, &[]);
    assert_eq!(again["registry"]["resealed"], 0, "{again}");
    assert_eq!(again["prover"]["resealed"], 0, "{again}");
    assert!(
        again["registry"]["current"].as_u64().unwrap() >= 4,
        "{again}"
    );

    // An upload during the rotation is wrapped with the new key; a new API key too.
    let second = upload_digits(&owner, "second", 1).await;
    let late_user = cluster.user("late", 10).await;
    let retired = rotate_kek(&cluster, &["--retire"]);
    assert_eq!(retired["registry"]["resealed"], 0, "{retired}");
    assert_eq!(retired["prover"]["resealed"], 0, "{retired}");
    assert_eq!(retired["retired_keys"], 1, "{retired}");
    assert_eq!(keys_in_file(&cluster), 1);

    going.store(false, Ordering::Relaxed);
    let (answered, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "predictions failed during the rotation: {failed:?}"
    );
    assert!(answered > 0, "no prediction ran during the rotation");

    // Restarted with the retired file alone: every model, key secret and opening opens.
    let cluster = cluster.restart().await;
    let user = cluster.admin.with_key(user.key().clone());
    let late_user = cluster.admin.with_key(late_user.key().clone());
    for id in [model.as_str(), second["model_id"].as_str().unwrap()] {
        let answer = user.predict(id, digits_input(2)).await.unwrap();
        assert_eq!(answer.status, 200, "{id}: {:?}", answer.body);
    }
    let answer = late_user.predict(&model, digits_input(3)).await.unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let (_, proof) = predict_with_proof(&user, &model, &digits_input(4)).await;
    assert_eq!(proof["status"], "done", "{proof}");
    cluster.stop().await;
}

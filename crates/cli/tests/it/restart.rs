//! State survives a restart of `modelhub up`; a tampered ciphertext never decrypts.

use crate::harness::*;

async fn a_restart_keeps_models_keys_and_balances(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let record = upload_digits(&creator, "digits", 4).await;
    let model_id = record["model_id"].as_str().unwrap().to_string();
    user.predict(&model_id, digits_input(0))
        .await
        .unwrap()
        .ok()
        .unwrap();
    let admin_key = cluster.admin.key().clone();

    let cluster = cluster.restart().await;
    assert_eq!(
        cluster.admin.key(),
        &admin_key,
        "the admin key file is reused, not replaced"
    );
    // Same keys, new gateway address.
    let user = cluster.admin.with_key(user.key().clone());
    let creator = cluster.admin.with_key(creator.key().clone());
    assert_eq!(account(&user).await["credits"], 6);
    assert_eq!(account(&creator).await["earnings"], 4);
    let fetched = user
        .get(&format!("/v1/models/{model_id}"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(fetched, record);
    let answer = user
        .predict(&model_id, digits_input(1))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_matches_onnxruntime(&answer, 1);
    assert_eq!(account(&user).await["credits"], 2);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_ciphertext_segment_fails_to_decrypt_and_charges_nothing() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let record = upload_digits(&creator, "digits", 1).await;
    let model_id = record["model_id"].as_str().unwrap().to_string();
    let blob = cluster
        .data_dir()
        .join("storage/blobs")
        .join(record["cid"].as_str().unwrap());
    let keys = (user.key().clone(), cluster.admin.key().clone());

    // Stop first, so no worker has the model in its session cache.
    let dir = cluster.stop().await;
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();
    let running = modelhub_cli::up::start(modelhub_cli::up::UpSettings::for_test(dir.path()))
        .await
        .unwrap();
    let user = modelhub_cli::client::Client::new(&running.gateway_url, keys.0).unwrap();

    let answer = user.predict(&model_id, digits_input(0)).await.unwrap();
    assert!(
        !answer.is_success(),
        "a tampered model must not run: {:?}",
        answer.body
    );
    assert_eq!(answer.status, 500, "{:?}", answer.body);
    assert!(answer.body.get("outputs").is_none());
    assert_eq!(
        account(&user).await["credits"],
        10,
        "a failed prediction is not charged"
    );
    running.stop().await;
}

crate::on_every_backend!(a_restart_keeps_models_keys_and_balances);

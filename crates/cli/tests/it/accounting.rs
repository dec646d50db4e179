//! Credits are debited exactly once per successful prediction and never on a failed one; the
//! owner's earnings grow by the same amount.

use serde_json::json;

use crate::harness::*;

async fn credits_are_charged_once_per_success_and_never_on_failure(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let record = upload_digits(&creator, "digits", 3).await;
    let model_id = record["model_id"].as_str().unwrap();

    let mut receipts = Vec::new();
    for case in 0..3 {
        let answer = user
            .predict(model_id, digits_input(case))
            .await
            .unwrap()
            .ok()
            .unwrap();
        assert_eq!(answer["receipt"]["credits_charged"], 3);
        receipts.push(answer["receipt"]["id"].as_str().unwrap().to_string());
    }
    receipts.sort();
    receipts.dedup();
    assert_eq!(receipts.len(), 3, "one receipt per prediction");
    assert_eq!(account(&user).await["credits"], 1);
    assert_eq!(account(&creator).await["earnings"], 9);

    // Failures charge nothing: a bad tensor, and then a balance too small for the price.
    let bad = user
        .predict(
            model_id,
            json!([{ "name": "X", "shape": [1, 63], "datatype": "FP32", "data": vec![0.0; 63] }]),
        )
        .await
        .unwrap();
    assert_error(&bad, 400, "bad_request", "shape");
    let short = user.predict(model_id, digits_input(0)).await.unwrap();
    assert_error(&short, 402, "payment_required", "insufficient credits");
    let after = account(&user).await;
    assert_eq!(after["credits"], 1);
    assert_eq!(after["earnings"], 0);
    assert_eq!(account(&creator).await["earnings"], 9);
    cluster.stop().await;
}

async fn a_retried_predict_with_an_idempotency_key_is_charged_once(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let record = upload_digits(&creator, "digits", 3).await;
    let model_id = record["model_id"].as_str().unwrap();
    let path = format!("/v1/models/{model_id}/predict");
    let body = serde_json::to_vec(&json!({ "inputs": digits_input(0) })).unwrap();

    let send_body = |key: &'static str, body: Vec<u8>| {
        let req = user
            .prepare_keyed(reqwest::Method::POST, &path, body, Some(key))
            .unwrap();
        user.send(req)
    };
    let send = |key: &'static str| send_body(key, body.clone());
    let first = send("retry-me-1").await.unwrap().ok().unwrap();
    let second = send("retry-me-1").await.unwrap().ok().unwrap();
    assert_eq!(
        second, first,
        "the retry gets the first answer, receipt included"
    );
    assert_eq!(account(&user).await["credits"], 7, "charged once");
    // The same key with another request: 409, nothing run, nothing charged.
    let other = serde_json::to_vec(&json!({ "inputs": digits_input(5) })).unwrap();
    let reused = send_body("retry-me-1", other).await.unwrap();
    assert_error(&reused, 409, "conflict", "another request");
    assert_eq!(account(&user).await["credits"], 7);
    // An idempotency-key that is not signed is refused.
    let mut unsigned = user
        .prepare(reqwest::Method::POST, &path, body.clone())
        .unwrap();
    unsigned.set_header("idempotency-key", Some("retry-me-9"));
    assert_error(
        &user.send(unsigned).await.unwrap(),
        401,
        "unauthenticated",
        "idempotency-key",
    );
    let third = send("retry-me-2").await.unwrap().ok().unwrap();
    assert_ne!(third["receipt"]["id"], first["receipt"]["id"]);
    assert_eq!(
        account(&user).await["credits"],
        4,
        "a new key is a new charge"
    );

    let bad = user
        .prepare_keyed(
            reqwest::Method::POST,
            &path,
            body.clone(),
            Some("no/slashes/allowed"),
        )
        .unwrap();
    assert_error(
        &user.send(bad).await.unwrap(),
        400,
        "bad_request",
        "idempotency-key",
    );
    cluster.stop().await;
}

/// Admin writes with an `idempotency-key` take effect once: the retry answers as the first.
async fn retried_admin_writes_take_effect_once(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let admin = &cluster.admin;
    let keyed = |path: &str, body: serde_json::Value, key: &'static str| {
        let req = admin
            .prepare_keyed(
                reqwest::Method::POST,
                path,
                serde_json::to_vec(&body).unwrap(),
                Some(key),
            )
            .unwrap();
        admin.send(req)
    };
    let first = keyed("/v1/accounts", json!({ "name": "bob" }), "acct-bob")
        .await
        .unwrap()
        .ok()
        .unwrap();
    let again = keyed("/v1/accounts", json!({ "name": "bob" }), "acct-bob")
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(first["account_id"], again["account_id"]);
    let other = keyed("/v1/accounts", json!({ "name": "carol" }), "acct-bob")
        .await
        .unwrap();
    assert_error(&other, 409, "conflict", "idempotency key");
    let account_id = first["account_id"].as_str().unwrap();

    let key = keyed("/v1/keys", json!({ "account_id": account_id }), "key-1")
        .await
        .unwrap()
        .ok()
        .unwrap();
    let key_again = keyed("/v1/keys", json!({ "account_id": account_id }), "key-1")
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(key, key_again, "the retry returns the same key and secret");

    let grant = json!({ "account_id": account_id, "amount": 25 });
    keyed("/v1/credits/grant", grant.clone(), "grant-1")
        .await
        .unwrap()
        .ok()
        .unwrap();
    let again = keyed("/v1/credits/grant", grant.clone(), "grant-1")
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(again["credits"], 25, "granted once");
    let more = keyed("/v1/credits/grant", grant, "grant-2")
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(more["credits"], 50);
    let bob = admin.with_key(serde_json::from_value(key).unwrap());
    assert_eq!(account(&bob).await["credits"], 50);
    cluster.stop().await;
}

async fn concurrent_predictions_never_overspend(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 20).await;
    let record = upload_digits(&creator, "digits", 2).await;
    let model_id = record["model_id"].as_str().unwrap().to_string();

    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let user = user.clone();
            let model_id = model_id.clone();
            tokio::spawn(async move { user.predict(&model_id, digits_input(i % 8)).await.unwrap() })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let answer = t.await.unwrap();
        match answer.status {
            200 => ok += 1,
            402 => assert_eq!(answer.error_code(), Some("payment_required")),
            s => panic!("unexpected status {s}: {:?}", answer.body),
        }
    }
    assert_eq!(
        ok, 10,
        "20 credits at 2 per call buy exactly 10 predictions"
    );
    assert_eq!(account(&user).await["credits"], 0);
    assert_eq!(account(&creator).await["earnings"], 20);
    cluster.stop().await;
}

crate::on_every_backend!(
    retried_admin_writes_take_effect_once,
    credits_are_charged_once_per_success_and_never_on_failure,
    a_retried_predict_with_an_idempotency_key_is_charged_once,
    concurrent_predictions_never_overspend
);

//! Bad input gets a clear JSON error with the right status, and changes nothing.

use modelhub_cli::client::ModelUpload;
use serde_json::{Value, json};

use crate::harness::*;

async fn bad_uploads_are_rejected_and_store_nothing(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;

    let not_onnx = std::fs::read(modelhub_testkit::test_model("not_onnx.bin")).unwrap();
    let answer = creator
        .upload(&ModelUpload::new("junk", "1", 1), not_onnx)
        .await
        .unwrap();
    assert_error(&answer, 422, "unprocessable", "ONNX");

    let mut truncated = digits_bytes();
    truncated.truncate(truncated.len() / 2);
    let answer = creator
        .upload(&ModelUpload::new("half", "1", 1), truncated)
        .await
        .unwrap();
    assert_error(&answer, 422, "unprocessable", "ONNX");

    let models = creator.get("/v1/models").await.unwrap().ok().unwrap();
    assert_eq!(models, json!([]), "nothing was registered");
    let blobs = cluster.data_dir().join("storage/blobs");
    let stored = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(stored, 0, "nothing was stored");

    // Missing or bad query parameters.
    let answer = creator
        .call(reqwest::Method::POST, "/v1/models?name=x&version=1", None)
        .await
        .unwrap();
    assert_error(&answer, 400, "bad_request", "price");
    let answer = creator
        .upload(&ModelUpload::new("bad name!", "1", 1), digits_bytes())
        .await
        .unwrap();
    assert_error(&answer, 400, "bad_request", "name");

    // An owner publishes a name and version once: with other bytes it is a conflict; the
    // same upload retried answers with the first record. Another account's `digits@1` is its
    // own model, in its own namespace.
    let first = upload_digits(&creator, "digits", 1).await;
    let rival = cluster.user("rival", 0).await;
    let theirs = rival
        .upload(&ModelUpload::new("digits", "1", 1), digits_bytes())
        .await
        .unwrap();
    assert_eq!(theirs.status, 201, "{:?}", theirs.body);
    assert_ne!(theirs.body["model_id"], first["model_id"]);
    let other_bytes =
        std::fs::read(modelhub_testkit::test_model("digits_mlp_logits.onnx")).unwrap();
    let again = creator
        .upload(&ModelUpload::new("digits", "1", 1), other_bytes)
        .await
        .unwrap();
    assert_error(&again, 409, "conflict", "digits");
    let retried = creator
        .upload(&ModelUpload::new("digits", "1", 1), digits_bytes())
        .await
        .unwrap();
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    assert_eq!(retried.body, first);
    let models = creator.get("/v1/models").await.unwrap().ok().unwrap();
    assert_eq!(
        models.as_array().unwrap().len(),
        2,
        "the creator's and the rival's"
    );
    cluster.stop().await;
}

async fn bad_predictions_say_what_is_wrong(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 100).await;
    let record = upload_digits(&creator, "digits", 1).await;
    let model_id = record["model_id"].as_str().unwrap();

    let answer = user
        .predict("mdl_00000000000000000000000000000000", digits_input(0))
        .await
        .unwrap();
    assert_error(&answer, 404, "not_found", "model");

    let row = vec![0.0; 64];
    let cases = [
        (
            json!([{ "name": "input", "shape": [1, 64], "datatype": "FP32", "data": row }]),
            "unknown input \"input\"",
        ),
        (
            json!([{ "name": "X", "shape": [1, 32], "datatype": "FP32", "data": vec![0.0; 32] }]),
            "expected shape",
        ),
        (
            json!([{ "name": "X", "shape": [1, 64], "datatype": "FP64", "data": row }]),
            "expected datatype FP32, got FP64",
        ),
        (
            json!([{ "name": "X", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 3] }]),
            "needs 64 values, got 3",
        ),
        (
            json!([{ "name": "X", "shape": [1, 64], "datatype": "FP99", "data": row }]),
            "datatype",
        ),
        (json!([]), "missing input \"X\""),
    ];
    for (inputs, why) in cases {
        let answer = user.predict(model_id, inputs).await.unwrap();
        assert_error(&answer, 400, "bad_request", why);
    }
    let answer = user
        .post(
            &format!("/v1/models/{model_id}/predict"),
            &json!({ "inputs": "nope" }),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 400);
    assert_eq!(answer.error_code(), Some("bad_request"));

    let raw = user
        .prepare(
            reqwest::Method::POST,
            &format!("/v1/models/{model_id}/predict"),
            "{not json",
        )
        .unwrap();
    let answer = user.send(raw).await.unwrap();
    assert_eq!(answer.status, 400);
    assert_eq!(answer.error_code(), Some("bad_request"));

    // A price above the caller's `max_price` is refused before any charge.
    let answer = user
        .predict_body(
            model_id,
            &json!({ "inputs": digits_input(0), "max_price": 0 }),
        )
        .await
        .unwrap();
    assert_error(&answer, 409, "conflict", "above max_price 0");
    assert_eq!(
        account(&user).await["credits"],
        100,
        "no failed request was charged"
    );
    let answer = user
        .predict_body(
            model_id,
            &json!({ "inputs": digits_input(0), "max_price": 1 }),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(account(&user).await["credits"], 99);

    let answer = user.get("/v1/no-such-route").await.unwrap();
    assert_eq!(answer.status, 404);
    assert_eq!(answer.error_code(), Some("not_found"));
    cluster.stop().await;
}

async fn admin_routes_need_an_admin_and_keys_belong_to_their_account(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let alice = cluster.user("alice", 0).await;
    let bob = cluster.user("bob", 0).await;

    let answer = alice
        .post(
            "/v1/credits/grant",
            &json!({ "account_id": alice.key().account_id, "amount": 5 }),
        )
        .await
        .unwrap();
    assert_error(&answer, 403, "forbidden", "admin");
    let answer = alice
        .post("/v1/accounts", &json!({ "name": "mallory" }))
        .await
        .unwrap();
    assert_error(&answer, 403, "forbidden", "admin");
    let answer = alice
        .post("/v1/keys", &json!({ "account_id": bob.key().account_id }))
        .await
        .unwrap();
    assert_error(&answer, 403, "forbidden", "");
    let answer = alice
        .delete(&format!("/v1/keys/{}", bob.key().key_id))
        .await
        .unwrap();
    // Another account's key answers like a missing one (no oracle for which key ids exist).
    assert_error(
        &answer,
        404,
        "not_found",
        "no key with this id belongs to the caller",
    );
    let answer = alice
        .delete("/v1/keys/mhk_00000000000000000000000000000000")
        .await
        .unwrap();
    assert_error(
        &answer,
        404,
        "not_found",
        "no key with this id belongs to the caller",
    );

    // A user makes a second key for itself, and revokes it.
    let second = alice
        .post("/v1/keys", &json!({}))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(second["account_id"], alice.key().account_id.as_str());
    let second = alice.with_key(serde_json::from_value(second).unwrap());
    assert_eq!(
        account(&second).await["account_id"],
        alice.key().account_id.as_str()
    );
    let answer = alice
        .delete(&format!("/v1/keys/{}", second.key().key_id))
        .await
        .unwrap();
    assert_eq!(answer.status, 204);
    let answer = second.get("/v1/account").await.unwrap();
    assert_error(&answer, 401, "unauthenticated", "revoked");
    cluster.stop().await;
}

crate::on_every_backend!(
    bad_uploads_are_rejected_and_store_nothing,
    bad_predictions_say_what_is_wrong,
    admin_routes_need_an_admin_and_keys_belong_to_their_account
);

/// The free-model policy: a free model is metered by a quota per account (60 predictions per
/// minute by default), not by credits. Past it the account gets 429 with `retry-after`; another
/// account, and paid models, are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_models_are_metered_per_account() {
    let cluster = Cluster::start().await;
    let owner = cluster.user("owner", 0).await;
    let flooder = cluster.user("flooder", 10).await;
    let other = cluster.user("other", 0).await;
    let free = upload_digits(&owner, "free", 0).await;
    let free = free["model_id"].as_str().unwrap();
    let paid = upload_digits(&owner, "paid", 1).await;
    let paid = paid["model_id"].as_str().unwrap();

    // A burst of 60, then one more per second: the first refusal comes after at least 60
    // answers and at most 60 plus one per second the burst took.
    // Sent once each (`predict` would retry a 429 after its `retry-after`).
    let path = format!("/v1/models/{free}/predict");
    let body = json!({ "inputs": digits_input(0) });
    let started = std::time::Instant::now();
    let mut answered = 0u64;
    let answer = loop {
        let answer = flooder.post(&path, &body).await.unwrap();
        if answer.status != 200 {
            break answer;
        }
        assert_eq!(answer.body["receipt"]["credits_charged"], 0);
        answered += 1;
        assert!(answered <= 200, "the quota never ran out");
    };
    let refill = started.elapsed().as_secs() + 1;
    assert!(
        (60..=60 + refill).contains(&answered),
        "{answered} free predictions in {refill} s"
    );
    assert_error(
        &answer,
        429,
        "too_many_requests",
        "60 predictions of free models",
    );
    let wait: u64 = answer.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");

    let answer = other.predict(free, digits_input(0)).await.unwrap();
    assert_eq!(answer.status, 200, "another account has its own quota");
    let answer = flooder.predict(paid, digits_input(0)).await.unwrap();
    assert_eq!(answer.status, 200, "paid predictions don't count");
    assert_eq!(account(&flooder).await["credits"], 9);
    cluster.stop().await;
}

/// A batch is priced per row: a predict of n rows (the model's dynamic first dimension) is
/// charged n times the price on one receipt that says so, reserved before the model runs
/// (short: 402, nothing charged); more rows than the gateway takes (1024) is a 413, a proof of
/// more than one row a 400, both uncharged. Free models count rows against their quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_charged_per_row() {
    let cluster = Cluster::start().await;
    let owner = cluster.user("owner", 0).await;
    let user = cluster.user("user", 100).await;
    let paid = upload_digits(&owner, "paid", 2).await;
    let paid = paid["model_id"].as_str().unwrap();

    let answer = user
        .predict(paid, digits_batch(5))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(answer["receipt"]["rows"], 5, "{answer}");
    assert_eq!(answer["receipt"]["credits_charged"], 10, "{answer}");
    let labels = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap();
    assert_eq!(labels["shape"], json!([5]));
    assert_eq!(account(&user).await["credits"], 90);
    assert_eq!(account(&owner).await["earnings"], 10);
    let single = user
        .predict(paid, digits_input(0))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(
        (
            &single["receipt"]["rows"],
            &single["receipt"]["credits_charged"]
        ),
        (&json!(1), &json!(2))
    );

    let path = format!("/v1/models/{paid}/predict");
    let huge = user
        .post(&path, &json!({ "inputs": digits_batch(1025) }))
        .await
        .unwrap();
    assert_error(&huge, 413, "payload_too_large", "1025 rows");
    let proved = user
        .post(&path, &json!({ "inputs": digits_batch(2), "proof": true }))
        .await
        .unwrap();
    assert_error(&proved, 400, "bad_request", "a proof covers one row");
    assert_eq!(
        account(&user).await["credits"],
        88,
        "refusals are not charged"
    );

    // 45 rows cost 90 credits; 88 are left.
    let short = user
        .post(&path, &json!({ "inputs": digits_batch(45) }))
        .await
        .unwrap();
    assert_error(&short, 402, "payment_required", "insufficient credits");
    assert_eq!(account(&user).await["credits"], 88);

    // Free models: rows count against the quota (60 per minute).
    let free = upload_digits(&owner, "free", 0).await;
    let free_path = format!("/v1/models/{}/predict", free["model_id"].as_str().unwrap());
    let answer = user
        .post(&free_path, &json!({ "inputs": digits_batch(61) }))
        .await
        .unwrap();
    assert_error(
        &answer,
        413,
        "payload_too_large",
        "free models take at most 60 rows",
    );
    let answer = user
        .post(&free_path, &json!({ "inputs": digits_batch(60) }))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let answer = user
        .post(&free_path, &json!({ "inputs": digits_input(0) }))
        .await
        .unwrap();
    assert_error(&answer, 429, "too_many_requests", "free models");

    // An owner may cap the rows of one predict of a model version: beyond it 413, uncharged.
    let mut capped = ModelUpload::new("capped", "1", 1);
    capped.max_rows = Some(3);
    let record = owner
        .upload(&capped, digits_bytes())
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(record["max_rows"], 3, "{record}");
    let capped_id = record["model_id"].as_str().unwrap();
    let listed = user
        .get(&format!("/v1/models/{capped_id}"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(listed["max_rows"], 3, "{listed}");
    assert_eq!(
        account(&user).await["credits"],
        88,
        "before the capped model"
    );
    let answer = user.predict(capped_id, digits_batch(4)).await.unwrap();
    assert_error(
        &answer,
        413,
        "payload_too_large",
        "this model takes at most 3 rows",
    );
    assert_eq!(
        account(&user).await["credits"],
        88,
        "refusals are not charged"
    );
    let answer = user
        .predict(capped_id, digits_batch(3))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(answer["receipt"]["credits_charged"], 3, "{answer}");
    assert_eq!(account(&user).await["credits"], 85);
    // The cap is at least 1; an uncapped model shows none.
    let mut zero = ModelUpload::new("capped", "2", 1);
    zero.max_rows = Some(0);
    let answer = owner.upload(&zero, digits_bytes()).await.unwrap();
    assert_error(&answer, 400, "bad_request", "max_rows must be at least 1");
    assert_eq!(free["max_rows"], Value::Null, "{free}");
    cluster.stop().await;
}

//! Rates against a gateway process started with its rate flags: signed requests per API key
//! and per account (`--requests-per-second-per-key`, `--requests-per-second-per-account`)
//! and an owner's quota per model (`calls_per_minute`). Over a rate: 429 with `retry-after`,
//! nothing charged, and the request's nonce not spent.

use std::time::Instant;

use modelhub_cli::client::{Answer, Client, ModelUpload, SignedRequest};
use serde_json::json;

use crate::faults::{Market, Processes};
use crate::harness::{account, assert_error, digits_batch, digits_bytes, digits_input};

/// Sends `requests` (signed beforehand) all at once to a gateway that allows `rate` per
/// second; checks that at least one and at most the burst plus the refill during the burst
/// passed. The answers in order, and the index of the first refused one.
async fn burst(client: &Client, requests: Vec<SignedRequest>, rate: u64) -> (Vec<Answer>, usize) {
    let started = Instant::now();
    let answers = futures::future::join_all(requests.into_iter().map(|r| client.send(r))).await;
    // Whole seconds, rounded up: the buckets refill meanwhile.
    let secs = started.elapsed().as_secs() + 1;
    let answers: Vec<Answer> = answers.into_iter().map(Result::unwrap).collect();
    let passed = answers.iter().filter(|a| a.status == 200).count() as u64;
    assert!(
        (1..=rate + rate * secs).contains(&passed),
        "{passed} passed in {secs} s"
    );
    let refused = answers.iter().position(|a| a.status != 200).unwrap();
    (answers, refused)
}

fn account_reads(client: &Client, n: usize) -> Vec<SignedRequest> {
    (0..n)
        .map(|_| {
            client
                .prepare(reqwest::Method::GET, "/v1/account", Vec::new())
                .unwrap()
        })
        .collect()
}

/// A key over its rate gets 429 `retry-after: 1`, and the refused request's nonce is not
/// spent: the same signed request is answered once the bucket refilled (and only once). Two
/// keys of one account share the account's rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_accounts_over_their_rate_get_429_and_spend_no_nonce() {
    const RATE: u64 = 2;
    let mut p = Processes::start(None, None);
    let Market { user, .. } = Market::open(&p).await;
    let rate = RATE.to_string();
    p.replica(
        "gateway-keys",
        "gateway",
        &[
            ("--requests-per-second-per-key", &rate),
            ("--requests-per-second-per-account", "0"),
        ],
    );
    p.replica(
        "gateway-accounts",
        "gateway",
        &[
            ("--requests-per-second-per-key", "0"),
            ("--requests-per-second-per-account", &rate),
        ],
    );

    // Per key: 12 at once pass only as far as the burst and the refill during the burst.
    let per_key = p.client("gateway-keys", user.key());
    let requests = account_reads(&per_key, 12);
    let (answers, refused) = burst(&per_key, requests.clone(), RATE).await;
    assert_error(
        &answers[refused],
        429,
        "too_many_requests",
        "this API key may make 2 requests per second",
    );
    assert_eq!(answers[refused].retry_after.as_deref(), Some("1"));
    // The refused request, sent again as it was once the key's bucket has refilled, is
    // answered: its nonce was not spent. Then it is a replay.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let again = per_key.send(requests[refused].clone()).await.unwrap();
    assert_eq!(again.status, 200, "{:?}", again.body);
    let replay = per_key.send(requests[refused].clone()).await.unwrap();
    assert_error(&replay, 401, "unauthenticated", "nonce was already used");

    // Per account: a second key of the same account draws on the same bucket.
    let account_id = account(&user).await["account_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second_key = user
        .post("/v1/keys", &json!({ "account_id": account_id }))
        .await
        .unwrap()
        .ok()
        .unwrap();
    let first = p.client("gateway-accounts", user.key());
    let second = first.with_key(serde_json::from_value(second_key).unwrap());
    let mut requests = account_reads(&first, 6);
    requests.extend(account_reads(&second, 6));
    let (answers, refused) = burst(&first, requests, RATE).await;
    assert_error(
        &answers[refused],
        429,
        "too_many_requests",
        "this account may make 2 requests per second",
    );
}

/// An owner's `calls_per_minute` meters each account's predictions (rows) of that model
/// version: past it 429 with `retry-after`, uncharged; other accounts and models are not
/// touched; 0 is refused at upload; the record shows the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_quota_meters_each_account_per_minute() {
    let cluster = crate::harness::Cluster::start().await;
    let owner = cluster.user("owner", 0).await;
    let user = cluster.user("user", 100).await;
    let other = cluster.user("other", 100).await;
    let mut quoted = ModelUpload::new("quoted", "1", 1);
    quoted.calls_per_minute = Some(3);
    let record = owner
        .upload(&quoted, digits_bytes())
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(record["calls_per_minute"], 3, "{record}");
    let model = record["model_id"].as_str().unwrap();
    let path = format!("/v1/models/{model}/predict");

    let answer = user
        .post(&path, &json!({ "inputs": digits_batch(2) }))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    // Two more rows do not fit in the minute's three.
    let answer = user
        .post(&path, &json!({ "inputs": digits_batch(2) }))
        .await
        .unwrap();
    assert_error(
        &answer,
        429,
        "too_many_requests",
        "this model takes at most 3 predictions per minute from one account",
    );
    let wait: u64 = answer.retry_after.as_deref().unwrap().parse().unwrap();
    assert!(
        (2..=60).contains(&wait),
        "a row comes back every 20 s: {wait}"
    );
    assert_eq!(
        account(&user).await["credits"],
        98,
        "the refusal is uncharged"
    );
    let answer = user
        .post(&path, &json!({ "inputs": digits_input(0) }))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "the third row fits");
    let answer = other
        .post(&path, &json!({ "inputs": digits_batch(3) }))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "another account has its own quota");
    let unquoted = crate::harness::upload_digits(&owner, "unquoted", 1).await;
    assert_eq!(unquoted["calls_per_minute"], serde_json::Value::Null);
    let answer = user
        .predict(unquoted["model_id"].as_str().unwrap(), digits_batch(5))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "another model is not metered");

    let mut zero = ModelUpload::new("quoted", "2", 1);
    zero.calls_per_minute = Some(0);
    let answer = owner.upload(&zero, digits_bytes()).await.unwrap();
    assert_error(
        &answer,
        400,
        "bad_request",
        "calls_per_minute must be at least 1",
    );
    cluster.stop().await;
}

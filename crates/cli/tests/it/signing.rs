//! Every rejection of API.md's "Request signing", through the real gateway.

use modelhub_cli::client::{Client, SignedRequest};
use modelhub_core::id::unix_now;
use modelhub_core::signing::{self, decode_secret, sha256_hex};
use reqwest::Method;

use crate::harness::*;

/// A request signed with an explicit date and nonce.
fn signed_at(
    client: &Client,
    method: Method,
    path: &str,
    body: &[u8],
    date: i64,
    nonce: &str,
) -> SignedRequest {
    let url = reqwest::Url::parse(client.base_url()).unwrap();
    let host = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let secret = decode_secret(&client.key().secret).unwrap();
    let headers = signing::sign(
        &client.key().key_id,
        &secret,
        method.as_str(),
        p,
        q,
        &host,
        &sha256_hex(body),
        date,
        nonce,
    );
    SignedRequest {
        method,
        url: format!("{}{path}", client.base_url()),
        headers: headers
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect(),
        body: body.to_vec().into(),
    }
}

async fn expect_401(client: &Client, req: SignedRequest, why: &str) {
    let answer = client.send(req).await.unwrap();
    assert_error(&answer, 401, "unauthenticated", why);
}

async fn every_signing_rejection(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let user = cluster.user("user", 0).await;
    let now = unix_now();
    let nonce = || signing::new_nonce();
    let get = |date, n: &str| signed_at(&user, Method::GET, "/v1/account", b"", date, n);

    // The baseline passes, with a query string too.
    assert_eq!(user.send(get(now, &nonce())).await.unwrap().status, 200);
    let listed = user
        .send(signed_at(
            &user,
            Method::GET,
            "/v1/models?b=2&a=x+y",
            b"",
            now,
            &nonce(),
        ))
        .await
        .unwrap();
    assert_eq!(listed.status, 200, "{:?}", listed.body);

    // Missing or malformed headers.
    for header in [
        "authorization",
        "x-mh-date",
        "x-mh-nonce",
        "x-mh-content-sha256",
    ] {
        let mut req = get(now, &nonce());
        req.set_header(header, None);
        expect_401(&user, req, header_word(header)).await;
    }
    let mut req = get(now, &nonce());
    req.set_header("authorization", Some("Bearer abc"));
    expect_401(&user, req, "MH-HMAC-SHA256").await;
    let mut req = get(now, &nonce());
    let auth = req.header("authorization").unwrap().replace("host;", "");
    req.set_header("authorization", Some(&auth));
    expect_401(&user, req, "host").await;
    let mut req = get(now, &nonce());
    req.set_header("x-mh-date", Some("yesterday"));
    expect_401(&user, req, "x-mh-date").await;

    // Unknown key.
    let mut req = get(now, &nonce());
    let auth = req
        .header("authorization")
        .unwrap()
        .replace(&user.key().key_id, "mhk_00000000000000000000000000000000");
    req.set_header("authorization", Some(&auth));
    expect_401(&user, req, "unknown key").await;

    // Dates more than 300 s away, either side; less is still fine. (Each date is taken just
    // before its request, with a few seconds' margin, so a slow machine can't move the line.)
    expect_401(&user, get(unix_now() - 305, &nonce()), "date").await;
    expect_401(&user, get(unix_now() + 305, &nonce()), "date").await;
    assert_eq!(
        user.send(get(unix_now() - 295, &nonce()))
            .await
            .unwrap()
            .status,
        200
    );

    // Nonces: bad form, and replay (the same signed request sent twice).
    expect_401(&user, get(now, "short"), "nonce").await;
    expect_401(&user, get(now, "has/slash/0123456789"), "nonce").await;
    let req = get(now, &nonce());
    assert_eq!(user.send(req.clone()).await.unwrap().status, 200);
    expect_401(&user, req, "nonce").await;

    // A body that is not the one signed.
    let body = br#"{"name":"x"}"#;
    let mut req = signed_at(&user, Method::POST, "/v1/keys", body, now, &nonce());
    req.body = br#"{"name":"y"}"#.to_vec().into();
    expect_401(&user, req, "x-mh-content-sha256").await;

    // A wrong signature: another secret, or the same signature moved to another path.
    let mut req = get(now, &nonce());
    let sig = req.header("authorization").unwrap().to_string();
    let flipped = flip_last_hex(&sig);
    req.set_header("authorization", Some(&flipped));
    expect_401(&user, req, "signature").await;
    let mut req = get(now, &nonce());
    req.url = format!("{}/v1/models", user.base_url());
    expect_401(&user, req, "signature").await;

    // Messages never carry the expected signature.
    let mut req = get(now, &nonce());
    req.set_header(
        "authorization",
        Some(&flip_last_hex(req.header("authorization").unwrap())),
    );
    let answer = user.send(req.clone()).await.unwrap();
    let good_sig = &sig[sig.len() - 64..];
    assert!(!answer.body.to_string().contains(good_sig));

    // Health is the one unsigned route.
    let health = reqwest::get(format!("{}/v1/health", user.base_url()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({ "status": "ok" })
    );
    cluster.stop().await;
}

fn header_word(header: &str) -> &str {
    match header {
        "authorization" => "authorization",
        other => other,
    }
}

fn flip_last_hex(auth: &str) -> String {
    let mut s = auth.to_string();
    let last = s.pop().unwrap();
    s.push(if last == '0' { '1' } else { '0' });
    s
}

crate::on_every_backend!(every_signing_rejection);

/// `modelhub keys rotate` gives a key a new secret without downtime: during the grace period
/// both secrets sign; a rotation with no grace retires the old one at once; only the key's
/// account may rotate it, and a revoked key can't be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotates_without_downtime() {
    let cluster = Cluster::start().await;
    let user = cluster.user("rotating", 0).await;
    let stranger = cluster.user("stranger", 0).await;
    let dir = tempfile::tempdir().unwrap();
    let old_file = dir.path().join("old.json");
    user.key().write_new(&old_file).unwrap();
    let new_file = dir.path().join("new.json");
    let rotated = crate::processes::client(
        user.base_url(),
        &old_file,
        &[
            "keys",
            "rotate",
            "--grace-secs",
            "600",
            "--out",
            new_file.to_str().unwrap(),
        ],
    );
    assert_eq!(rotated["key_id"], user.key().key_id.as_str());
    let grace_end = rotated["previous_valid_until"].as_i64().unwrap();
    assert!(
        (unix_now() + 590..=unix_now() + 600).contains(&grace_end),
        "{rotated}"
    );
    let renewed = user.with_key(modelhub_cli::client::KeyFile::read(&new_file).unwrap());
    assert_ne!(renewed.key().secret, user.key().secret);
    // Both secrets sign during the grace period.
    for client in [&user, &renewed] {
        assert_eq!(client.get("/v1/account").await.unwrap().status, 200);
    }

    // No grace: the secret before this rotation stops at once, and so does the one before it.
    let newest = renewed
        .post(
            &format!("/v1/keys/{}/rotate", user.key().key_id),
            &serde_json::json!({ "grace_secs": 0 }),
        )
        .await
        .unwrap()
        .ok()
        .unwrap();
    let newest = user.with_key(serde_json::from_value(newest).unwrap());
    assert_eq!(newest.get("/v1/account").await.unwrap().status, 200);
    for retired in [&user, &renewed] {
        let answer = retired.get("/v1/account").await.unwrap();
        assert_error(&answer, 401, "unauthenticated", "");
    }

    // Only the key's account rotates it; bounds; a revoked key stays revoked.
    let path = format!("/v1/keys/{}/rotate", user.key().key_id);
    let answer = stranger.post(&path, &serde_json::json!({})).await.unwrap();
    assert_error(&answer, 404, "not_found", "no key with this id");
    let answer = newest
        .post(&path, &serde_json::json!({ "grace_secs": 8 * 86_400 }))
        .await
        .unwrap();
    assert_error(&answer, 400, "bad_request", "grace_secs must be at most");
    let second = cluster
        .admin
        .post(
            "/v1/keys",
            &serde_json::json!({ "account_id": user.key().account_id }),
        )
        .await
        .unwrap()
        .ok()
        .unwrap();
    let second_id = second["key_id"].as_str().unwrap();
    newest
        .delete(&format!("/v1/keys/{second_id}"))
        .await
        .unwrap();
    let answer = newest
        .post(
            &format!("/v1/keys/{second_id}/rotate"),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_error(&answer, 409, "conflict", "revoked key");
    cluster.stop().await;
}

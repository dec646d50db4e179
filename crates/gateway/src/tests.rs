//! Tests of the whole application without the backing services: the fixed-key source signs
//! requests in, the gRPC addresses point at a closed port, so these cover everything a request
//! meets before (or instead of) a backing service.

use actix_web::http::StatusCode;
use actix_web::test;

use crate::auth::tests::{ADMIN_KEY, Signer, USER_ACCOUNT, USER_KEY, fixed_keys};
use crate::{Settings, Shared, app};

/// An address where nothing listens.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://{}", l.local_addr().unwrap())
}

fn settings() -> Settings {
    let mut s = Settings::for_test(closed_port(), closed_port(), closed_port());
    s.max_json_bytes = 1024;
    s.max_upload_bytes = 4096;
    s.mtls_dir = modelhub_testkit::tls::TestPki::shared().dir().to_path_buf();
    s
}

/// Sends one request through a fresh application; returns status, headers and JSON body.
async fn call(
    req: test::TestRequest,
) -> (
    StatusCode,
    actix_web::http::header::HeaderMap,
    serde_json::Value,
) {
    let shared = Shared::new(&settings()).unwrap();
    let auth = crate::auth::Authenticator::new(
        fixed_keys(),
        std::sync::Arc::new(crate::auth::NonceCache::new()),
    );
    let svc = test::init_service(app(shared.state(Some(auth)))).await;
    let res = test::call_service(&svc, req.to_request()).await;
    let status = res.status();
    let headers = res.headers().clone();
    let body = test::read_body(res).await;
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {body:?}"));
    (status, headers, json)
}

/// Asserts the documented error shape, the status of its code, and a message containing `want`.
fn assert_error(
    (status, headers, body): &(
        StatusCode,
        actix_web::http::header::HeaderMap,
        serde_json::Value,
    ),
    want_status: u16,
    want_code: &str,
    want: &str,
) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/json",
        "{body}"
    );
    assert_eq!(body["error"]["code"], want_code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(want), "{message:?} should say {want:?}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert_eq!(body["error"].as_object().unwrap().len(), 2, "{body}");
}

#[actix_web::test]
async fn health_needs_no_signature() {
    let (status, _, body) = call(test::TestRequest::get().uri("/v1/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"status": "ok"}));
}

#[actix_web::test]
async fn unknown_routes_are_json_404s() {
    let res = call(test::TestRequest::get().uri("/v2/nothing?x=1")).await;
    assert_error(&res, 404, "not_found", "no route for GET /v2/nothing");
    let res = call(test::TestRequest::get().uri("/v1/models/a/b/c")).await;
    assert_error(&res, 404, "not_found", "no route");
}

#[actix_web::test]
async fn wrong_methods_are_json_errors() {
    let res = call(test::TestRequest::post().uri("/v1/health")).await;
    assert_error(&res, 404, "not_found", "no route for POST /v1/health");
    let res = call(test::TestRequest::delete().uri("/v1/models")).await;
    assert_error(&res, 404, "not_found", "another method");
    let allow = res.1.get("allow").expect("allow header").to_str().unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
}

#[actix_web::test]
async fn unsigned_requests_are_rejected() {
    let res = call(test::TestRequest::get().uri("/v1/account")).await;
    assert_error(&res, 401, "unauthenticated", "missing authorization header");
    let res = call(
        test::TestRequest::post()
            .uri("/v1/models?name=a&version=1&price=1")
            .set_payload("onnx"),
    )
    .await;
    assert_error(&res, 401, "unauthenticated", "missing authorization header");
}

#[actix_web::test]
async fn bad_json_is_a_400_with_the_parser_message() {
    let s = Signer::new(ADMIN_KEY, "POST", "/v1/accounts", b"{\"name\": ");
    let res = call(s.request()).await;
    assert_error(
        &res,
        400,
        "bad_request",
        "invalid JSON body: EOF while parsing",
    );

    let s = Signer::new(
        ADMIN_KEY,
        "POST",
        "/v1/credits/grant",
        br#"{"account_id":"a","amount":-5}"#,
    );
    let res = call(s.request()).await;
    assert_error(&res, 400, "bad_request", "invalid value");

    let s = Signer::new(ADMIN_KEY, "POST", "/v1/accounts", br#"{"nmae":"x"}"#);
    let res = call(s.request()).await;
    assert_error(&res, 400, "bad_request", "unknown field `nmae`");
}

#[actix_web::test]
async fn oversize_json_bodies_are_413() {
    let body = format!("{{\"name\":\"{}\"}}", "x".repeat(2000));
    let s = Signer::new(ADMIN_KEY, "POST", "/v1/accounts", body.as_bytes());
    let res = call(s.request()).await;
    assert_error(&res, 413, "payload_too_large", "larger than 1024 bytes");
}

#[actix_web::test]
async fn admin_routes_refuse_other_keys() {
    let s = Signer::new(USER_KEY, "POST", "/v1/accounts", br#"{"name":"x"}"#);
    assert_error(&call(s.request()).await, 403, "forbidden", "admin");
    let s = Signer::new(
        USER_KEY,
        "POST",
        "/v1/credits/grant",
        br#"{"account_id":"a","amount":5}"#,
    );
    assert_error(&call(s.request()).await, 403, "forbidden", "admin");
}

#[actix_web::test]
async fn an_account_may_not_create_keys_for_another() {
    let s = Signer::new(
        USER_KEY,
        "POST",
        "/v1/keys",
        br#"{"account_id":"acct_other"}"#,
    );
    assert_error(
        &call(s.request()).await,
        403,
        "forbidden",
        "only create keys for itself",
    );
}

#[actix_web::test]
async fn a_backing_service_that_is_down_is_503() {
    // for itself: allowed, so it gets as far as the (unreachable) registry
    let body = format!("{{\"account_id\":\"{USER_ACCOUNT}\"}}");
    let s = Signer::new(USER_KEY, "POST", "/v1/keys", body.as_bytes());
    let res = call(s.request()).await;
    assert_error(&res, 503, "unavailable", "unavailable");
    assert!(!res.2.to_string().contains("127.0.0.1"), "{}", res.2);

    let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
    assert_error(&call(s.request()).await, 503, "unavailable", "unavailable");
}

#[actix_web::test]
async fn upload_query_is_checked_after_the_signature() {
    let s = Signer::new(USER_KEY, "POST", "/v1/models?name=a&version=1", b"onnx");
    assert_error(&call(s.request()).await, 400, "bad_request", "price");
    let s = Signer::new(
        USER_KEY,
        "POST",
        "/v1/models?name=a&version=1&price=-3",
        b"onnx",
    );
    assert_error(&call(s.request()).await, 400, "bad_request", "price");
    let s = Signer::new(
        USER_KEY,
        "POST",
        "/v1/models?name=&version=1&price=3",
        b"onnx",
    );
    assert_error(
        &call(s.request()).await,
        400,
        "bad_request",
        "must not be empty",
    );
    // a bad signature wins over a bad query
    let s = Signer::new(USER_KEY, "POST", "/v1/models?name=a&version=1", b"onnx");
    let req = s.request().uri("/v1/models?name=a");
    assert_error(
        &call(req).await,
        401,
        "unauthenticated",
        "signature does not match",
    );
}

#[actix_web::test]
async fn an_upload_declared_larger_than_the_limit_is_413_at_once() {
    let body = vec![7u8; 5000];
    let s = Signer::new(
        USER_KEY,
        "POST",
        "/v1/models?name=a&version=1&price=3",
        &body,
    );
    assert_error(&call(s.request()).await, 413, "payload_too_large", "4096");
}

#[actix_web::test]
async fn predict_rejects_bad_requests_before_any_backing_call() {
    let path = "/v1/models/mdl_1/predict";
    let x = r#"{"name":"X","shape":[1,2],"datatype":"FP32","data":[1,2]}"#;

    let body = format!(r#"{{"inputs":[{x}],"proof":true}}"#);
    let s = Signer::new(USER_KEY, "POST", path, body.as_bytes());
    assert_error(
        &call(s.request()).await,
        400,
        "bad_request",
        "proofs are not enabled on this gateway",
    );

    let bad = r#"{"inputs":[{"name":"X","shape":[1,3],"datatype":"FP32","data":[1,2]}]}"#;
    let s = Signer::new(USER_KEY, "POST", path, bad.as_bytes());
    assert_error(
        &call(s.request()).await,
        400,
        "bad_request",
        "needs 3 values, got 2",
    );

    let bad = r#"{"inputs":[{"name":"X","shape":[1],"datatype":"FP128","data":[1]}]}"#;
    let s = Signer::new(USER_KEY, "POST", path, bad.as_bytes());
    assert_error(
        &call(s.request()).await,
        400,
        "bad_request",
        "unknown datatype",
    );

    let s = Signer::new(USER_KEY, "POST", path, b"[]");
    assert_error(
        &call(s.request()).await,
        400,
        "bad_request",
        "invalid JSON body",
    );

    // a valid body gets as far as the (unreachable) registry
    let body = format!(r#"{{"inputs":[{x}],"proof":false}}"#);
    let s = Signer::new(USER_KEY, "POST", path, body.as_bytes());
    assert_error(&call(s.request()).await, 503, "unavailable", "unavailable");
}

#[actix_web::test]
async fn settings_defaults_and_validation() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }
    let s = Cli::parse_from(["gateway"]).settings;
    assert_eq!(s.registry, "https://127.0.0.1:50051");
    assert_eq!(s.storage, "https://127.0.0.1:50052");
    assert_eq!(s.inference, "https://127.0.0.1:50053");
    assert_eq!(s.max_upload_bytes, 1 << 30);
    assert_eq!(s.max_json_bytes, 64 << 20);
    assert_eq!(s.workers, 2);

    let mut bad = s.clone();
    bad.workers = 0;
    assert!(Shared::new(&bad).is_err());
    let mut bad = s.clone();
    bad.registry = "not a uri at all".into();
    let e = Shared::new(&bad).err().unwrap().to_string();
    assert!(e.contains("registry address"), "{e}");
    // Internal calls are never sent in the clear.
    let mut bad = s;
    bad.storage = "http://127.0.0.1:50052".into();
    let e = Shared::new(&bad).err().unwrap().to_string();
    assert!(
        e.contains("storage address") && e.contains("https://"),
        "{e}"
    );
}

/// `modelhub up` spawns `run` on a multi-thread runtime: its future must be `Send`.
#[actix_web::test]
async fn run_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fut = crate::run(settings(), listener, async {});
    assert_send(&fut);
}

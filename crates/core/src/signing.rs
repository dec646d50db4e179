//! The `MH-HMAC-SHA256` request signature (`docs/API.md`, "Request signing").
//!
//! The gateway verifies with exactly the functions the `modelhub` CLI signs with.

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};

pub const ALGORITHM: &str = "MH-HMAC-SHA256";
pub const HEADER_DATE: &str = "x-mh-date";
pub const HEADER_NONCE: &str = "x-mh-nonce";
pub const HEADER_CONTENT_SHA256: &str = "x-mh-content-sha256";
/// Headers every signature must cover.
pub const REQUIRED_SIGNED_HEADERS: [&str; 4] =
    ["host", HEADER_CONTENT_SHA256, HEADER_DATE, HEADER_NONCE];
/// How far a request's date may be from the verifier's clock, in seconds.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// RFC 3986 unreserved characters stay as they are; everything else is `%XX`.
const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

type HmacSha256 = Hmac<Sha256>;

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Decodes a key secret as given to users (base64url without padding).
pub fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(secret.trim()).ok()
}

pub fn encode_secret(secret: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(secret)
}

/// A fresh nonce: 32 characters of `[A-Za-z0-9_-]`.
pub fn new_nonce() -> String {
    let mut raw = [0u8; 24];
    OsRng.fill_bytes(&mut raw);
    URL_SAFE_NO_PAD.encode(raw)
}

/// 16 to 64 characters of `[A-Za-z0-9_-]`.
pub fn is_valid_nonce(nonce: &str) -> bool {
    (16..=64).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The canonical form of a raw query string (without the `?`).
pub fn canonical_query(raw: &str) -> String {
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| {
            (
                utf8_percent_encode(&k, RFC3986).to_string(),
                utf8_percent_encode(&v, RFC3986).to_string(),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The parts of a request that a signature covers.
#[derive(Debug, Clone)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// As sent, percent-encoded, without the query.
    pub path: &'a str,
    /// Raw query string without the `?` ("" when there is none).
    pub query: &'a str,
    /// The signed headers, lowercase names sorted, each with its value as sent.
    pub headers: Vec<(String, String)>,
    pub content_sha256: &'a str,
}

impl RequestParts<'_> {
    pub fn signed_headers(&self) -> String {
        self.headers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(";")
    }

    pub fn canonical_request(&self) -> String {
        let mut s = String::with_capacity(256);
        s.push_str(self.method);
        s.push('\n');
        s.push_str(self.path);
        s.push('\n');
        s.push_str(&canonical_query(self.query));
        s.push('\n');
        for (name, value) in &self.headers {
            s.push_str(name);
            s.push(':');
            s.push_str(value.trim());
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&self.signed_headers());
        s.push('\n');
        s.push_str(self.content_sha256);
        s
    }

    pub fn string_to_sign(&self, date: &str, nonce: &str) -> String {
        format!(
            "{ALGORITHM}\n{date}\n{nonce}\n{}",
            sha256_hex(self.canonical_request().as_bytes())
        )
    }
}

fn mac(secret: &[u8], string_to_sign: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any size");
    mac.update(string_to_sign.as_bytes());
    mac
}

/// Lowercase hex HMAC-SHA256 of the string to sign.
pub fn signature(secret: &[u8], string_to_sign: &str) -> String {
    hex::encode(mac(secret, string_to_sign).finalize().into_bytes())
}

/// Checks a hex signature in constant time.
pub fn verify_signature(secret: &[u8], string_to_sign: &str, signature_hex: &str) -> bool {
    match hex::decode(signature_hex) {
        Ok(sig) => mac(secret, string_to_sign).verify_slice(&sig).is_ok(),
        Err(_) => false,
    }
}

/// A parsed `authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub key_id: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

impl Authorization {
    /// Parses `MH-HMAC-SHA256 Credential=<key_id>, SignedHeaders=<a;b>, Signature=<hex>`; the
    /// error says what is wrong with it.
    pub fn parse(value: &str) -> Result<Authorization, &'static str> {
        let rest = value
            .strip_prefix(ALGORITHM)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or("authorization header must start with \"MH-HMAC-SHA256 \"")?;
        let (mut key_id, mut signed, mut sig) = (None, None, None);
        for part in rest.split(',') {
            let (k, v) = part
                .trim()
                .split_once('=')
                .ok_or("malformed authorization header")?;
            let slot = match k {
                "Credential" => &mut key_id,
                "SignedHeaders" => &mut signed,
                "Signature" => &mut sig,
                _ => return Err("unknown field in authorization header"),
            };
            if slot.replace(v.to_string()).is_some() {
                return Err("repeated field in authorization header");
            }
        }
        let key_id = key_id
            .filter(|k| !k.is_empty())
            .ok_or("authorization header has no Credential")?;
        let signed = signed.ok_or("authorization header has no SignedHeaders")?;
        let signature = sig.ok_or("authorization header has no Signature")?;
        if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("Signature must be 64 hex characters");
        }
        let signed_headers: Vec<String> = signed.split(';').map(str::to_string).collect();
        let sorted = signed_headers.windows(2).all(|w| w[0] < w[1]);
        let lower = signed_headers
            .iter()
            .all(|h| !h.is_empty() && h.bytes().all(|b| !b.is_ascii_uppercase()));
        if !sorted || !lower {
            return Err("SignedHeaders must be lowercase, sorted and without repeats");
        }
        if let Some(missing) = REQUIRED_SIGNED_HEADERS
            .iter()
            .find(|h| !signed_headers.iter().any(|s| s == *h))
        {
            return Err(match *missing {
                "host" => "SignedHeaders must include host",
                HEADER_CONTENT_SHA256 => "SignedHeaders must include x-mh-content-sha256",
                HEADER_DATE => "SignedHeaders must include x-mh-date",
                _ => "SignedHeaders must include x-mh-nonce",
            });
        }
        Ok(Authorization {
            key_id,
            signed_headers,
            signature,
        })
    }

    pub fn to_header(&self) -> String {
        format!(
            "{ALGORITHM} Credential={}, SignedHeaders={}, Signature={}",
            self.key_id,
            self.signed_headers.join(";"),
            self.signature
        )
    }
}

/// Headers a client adds to sign a request: `(name, value)` pairs for `x-mh-date`,
/// `x-mh-nonce`, `x-mh-content-sha256` and `authorization`.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    key_id: &str,
    secret: &[u8],
    method: &str,
    path: &str,
    query: &str,
    host: &str,
    content_sha256: &str,
    date: i64,
    nonce: &str,
) -> Vec<(&'static str, String)> {
    sign_with(
        key_id,
        secret,
        method,
        path,
        query,
        host,
        content_sha256,
        date,
        nonce,
        &[],
    )
}

/// [`sign`], with more headers signed too (`extra`: lowercase name and value, e.g. the
/// `idempotency-key`, which must be signed whenever it is sent). The caller sends `extra`
/// itself; the returned headers are the `x-mh-*` ones and `authorization`.
#[allow(clippy::too_many_arguments)]
pub fn sign_with(
    key_id: &str,
    secret: &[u8],
    method: &str,
    path: &str,
    query: &str,
    host: &str,
    content_sha256: &str,
    date: i64,
    nonce: &str,
    extra: &[(&str, &str)],
) -> Vec<(&'static str, String)> {
    let date = date.to_string();
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), host.into()),
        (HEADER_CONTENT_SHA256.into(), content_sha256.into()),
        (HEADER_DATE.into(), date.clone()),
        (HEADER_NONCE.into(), nonce.into()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned())),
    );
    headers.sort();
    let parts = RequestParts {
        method,
        path,
        query,
        headers,
        content_sha256,
    };
    let auth = Authorization {
        key_id: key_id.into(),
        signed_headers: parts.headers.iter().map(|(n, _)| n.clone()).collect(),
        signature: signature(secret, &parts.string_to_sign(&date, nonce)),
    };
    vec![
        (HEADER_DATE, date),
        (HEADER_NONCE, nonce.to_string()),
        (HEADER_CONTENT_SHA256, content_sha256.to_string()),
        ("authorization", auth.to_header()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector printed in docs/API.md; a change here is a breaking API change.
    #[test]
    fn documented_test_vector() {
        let secret = decode_secret("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8").unwrap();
        assert_eq!(secret, (0u8..32).collect::<Vec<_>>());
        let body = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[0.5,1.5]}]}"#;
        let content = sha256_hex(body);
        assert_eq!(
            content,
            "2555eed136122a7772618ec40367177245be27317c2d9929407ef315fcc54e68"
        );
        let parts = RequestParts {
            method: "POST",
            path: "/v1/models/mdl_0123/predict",
            query: "b=2&a=x+y&a=%7e&c",
            headers: vec![
                ("host".into(), "api.example.com".into()),
                ("x-mh-content-sha256".into(), content.clone()),
                ("x-mh-date".into(), "1767225600".into()),
                ("x-mh-nonce".into(), "n0nce-0123456789abcdef".into()),
            ],
            content_sha256: &content,
        };
        assert_eq!(canonical_query(parts.query), "a=x%20y&a=~&b=2&c=");
        let canonical = parts.canonical_request();
        assert_eq!(
            canonical,
            "POST\n/v1/models/mdl_0123/predict\na=x%20y&a=~&b=2&c=\n\
             host:api.example.com\n\
             x-mh-content-sha256:2555eed136122a7772618ec40367177245be27317c2d9929407ef315fcc54e68\n\
             x-mh-date:1767225600\nx-mh-nonce:n0nce-0123456789abcdef\n\n\
             host;x-mh-content-sha256;x-mh-date;x-mh-nonce\n\
             2555eed136122a7772618ec40367177245be27317c2d9929407ef315fcc54e68"
        );
        let sts = parts.string_to_sign("1767225600", "n0nce-0123456789abcdef");
        let sig = signature(&secret, &sts);
        assert_eq!(sts, VECTOR_STRING_TO_SIGN);
        assert_eq!(sig, VECTOR_SIGNATURE);
        assert!(verify_signature(&secret, &sts, &sig));
        let mut wrong = sig.clone().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        assert!(!verify_signature(
            &secret,
            &sts,
            std::str::from_utf8(&wrong).unwrap()
        ));
    }

    const VECTOR_STRING_TO_SIGN: &str = "MH-HMAC-SHA256\n1767225600\nn0nce-0123456789abcdef\ne8958f9608702a4d4faf06e7d6695bb3aa9abbe42f4dca20964e614aeaf62b1f";
    const VECTOR_SIGNATURE: &str =
        "7d0fa373a19cb822ae791989db6b825682e10c579daecefe01984b963c65039c";

    #[test]
    fn query_encoding_follows_rfc3986_and_sorts_by_name_then_value() {
        assert_eq!(canonical_query(""), "");
        assert_eq!(canonical_query("z=1&a=2&a=1"), "a=1&a=2&z=1");
        assert_eq!(
            canonical_query("name=h%C3%A9+llo&x=a*b"),
            "name=h%C3%A9%20llo&x=a%2Ab"
        );
        assert_eq!(
            canonical_query("price=3&version=1.0&name=digits"),
            "name=digits&price=3&version=1.0"
        );
    }

    #[test]
    fn authorization_round_trips_and_bad_ones_say_why() {
        let headers = sign(
            "mhk_1",
            b"k",
            "GET",
            "/v1/account",
            "",
            "h:1",
            &sha256_hex(b""),
            10,
            "abcdefghijklmnop",
        );
        let auth = &headers
            .iter()
            .find(|(n, _)| *n == "authorization")
            .unwrap()
            .1;
        let parsed = Authorization::parse(auth).unwrap();
        assert_eq!(parsed.key_id, "mhk_1");
        assert_eq!(&parsed.to_header(), auth);

        let bad = |v: &str| Authorization::parse(v).unwrap_err();
        assert!(bad("Bearer x").contains("MH-HMAC-SHA256"));
        let sig = "0".repeat(64);
        assert!(bad(&format!("MH-HMAC-SHA256 Credential=k, SignedHeaders=host;x-mh-date;x-mh-nonce, Signature={sig}"))
            .contains("x-mh-content-sha256"));
        assert!(bad(&format!("MH-HMAC-SHA256 Credential=k, SignedHeaders=x-mh-nonce;host;x-mh-date;x-mh-content-sha256, Signature={sig}"))
            .contains("sorted"));
        assert!(
            bad("MH-HMAC-SHA256 Credential=k, SignedHeaders=host, Signature=zz").contains("64 hex")
        );
    }

    #[test]
    fn nonces() {
        assert!(is_valid_nonce(&new_nonce()));
        assert!(!is_valid_nonce("short"));
        assert!(!is_valid_nonce("has spaces in it ....."));
        assert!(!is_valid_nonce(&"a".repeat(65)));
    }
}

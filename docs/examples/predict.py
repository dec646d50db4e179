#!/usr/bin/env python3
"""A Model Hub client in Python's standard library: signs a predict (docs/API.md "Request
signing") and retries it safely (docs/API.md "Retries").

    python3 predict.py GATEWAY_URL KEY_FILE MODEL_ID INPUTS_JSON

KEY_FILE is the JSON `POST /v1/keys` answers (`modelhub keys create --out`); INPUTS_JSON is the
`inputs` list. Prints the answer's JSON. One idempotency key per prediction, reused by every
retry: a retry of a request that was charged but whose answer was lost gets the kept answer
(same receipt), never a second charge.
"""
import base64
import hashlib
import hmac
import json
import random
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

RETRIES = 6


def sign(key, method, url, body, extra):
    """The signed headers of a request (`extra`: further headers to sign, lower-case names)."""
    parts = urllib.parse.urlsplit(url)
    secret = base64.urlsafe_b64decode(key["secret"] + "=" * (-len(key["secret"]) % 4))
    content = hashlib.sha256(body).hexdigest()
    date, nonce = str(int(time.time())), secrets.token_urlsafe(24)
    signed = {"host": parts.netloc, "x-mh-content-sha256": content,
              "x-mh-date": date, "x-mh-nonce": nonce, **extra}
    names = sorted(signed)
    quote = lambda s: urllib.parse.quote(s, safe="-_.~")
    pairs = sorted((quote(n), quote(v)) for n, v in
                   urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query = "&".join(f"{n}={v}" for n, v in pairs)
    canonical = "\n".join([method, parts.path, query]
                          + [f"{n}:{signed[n].strip()}" for n in names]
                          + ["", ";".join(names), content])
    to_sign = "\n".join(["MH-HMAC-SHA256", date, nonce,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    signature = hmac.new(secret, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (f"MH-HMAC-SHA256 Credential={key['key_id']}, "
                               f"SignedHeaders={';'.join(names)}, Signature={signature}")
    del signed["host"]  # urllib sends it
    return signed


def predict(gateway, key, model_id, inputs):
    url = f"{gateway.rstrip('/')}/v1/models/{model_id}/predict"
    body = json.dumps({"inputs": inputs}).encode()
    idempotency_key = "py-" + secrets.token_urlsafe(16)
    for attempt in range(RETRIES + 1):
        # Signed anew for every attempt (a nonce works once), with the same idempotency key.
        headers = sign(key, "POST", url, body, {"idempotency-key": idempotency_key})
        headers["content-type"] = "application/json"
        request = urllib.request.Request(url, body, headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as e:
            retryable = e.code in (429, 503) or (e.code == 409 and e.headers.get("retry-after"))
            if not retryable or attempt == RETRIES:
                raise SystemExit(f"HTTP {e.code}: {e.read().decode()}")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            if attempt == RETRIES:  # the answer may have been lost: the key still recovers it
                raise SystemExit(f"no answer after {RETRIES + 1} attempts: {e}")
        # Capped exponential backoff with full jitter.
        time.sleep(random.uniform(0, min(3.0, 0.1 * 2 ** attempt)))


if __name__ == "__main__":
    gateway, key_file, model_id, inputs = sys.argv[1:5]
    with open(key_file) as f:
        key = json.load(f)
    print(json.dumps(predict(gateway, key, model_id, json.loads(inputs))))

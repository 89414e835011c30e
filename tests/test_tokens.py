"""JWT bearer tokens against a real token issuer (tests/issuer.py) and a real server: a table of
token attacks and mistakes, per-model scopes on every front door, key rotation, and an issuer
that is slow or down."""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.issuer import AUDIENCE, Issuer, new_key, run_issuer
from tests.serving import RunningServer, free_port, run_server, wait_for
from tests.test_faults import INFER, JSON, infer_body

pytestmark = pytest.mark.e2e

API_KEY = "token-test-key"
ADMIN_TOKEN = "token-test-admin"
REFRESH_INTERVAL_S = 2.0
FETCH_TIMEOUT_S = 1.0
V1 = "/v1/models/iris:predict"
V1_BODY = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
SCORE = "/v1/models/iris:score"
CSV_BODY = b"sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,0.2\n"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, object], payload: dict[str, object], secret: bytes) -> str:
    """A token signed with HS256 and `secret`, whatever its header says."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _claims(issuer: Issuer, **changes: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": issuer.url,
        "aud": AUDIENCE,
        "sub": "mallory",
        "iat": now,
        "exp": now + 300,
        "scope": "modelserve:infer",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(
    issuer: Issuer, claims: dict[str, object], kid: object = "rsa-1", **headers: object
) -> str:
    key = issuer.keys[0]
    return jwt.encode(claims, key.private, "RS256", headers={"kid": kid, **headers})  # type: ignore[arg-type]


def _replace_part(token: str, index: int, change: Callable[[dict[str, object]], None]) -> str:
    parts = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(parts[index] + "=" * (-len(parts[index]) % 4)))
    change(data)
    parts[index] = _b64(json.dumps(data).encode())
    return ".".join(parts)


def _key_confusion(issuer: Issuer) -> str:
    public = issuer.keys[0].private.public_key()
    pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return _forge({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, _claims(issuer), pem)


def _nested(issuer: Issuer) -> str:
    inner = issuer.token()
    key = issuer.keys[0]
    return jwt.api_jws.encode(
        inner.encode(),
        key.private,  # type: ignore[arg-type]
        "RS256",
        headers={"kid": key.kid, "cty": "JWT"},
    )


def _untrusted(issuer: Issuer, kid: str, **headers: object) -> str:
    impostor = new_key(kid)
    return jwt.encode(_claims(issuer), impostor.private, "RS256", headers={"kid": kid, **headers})  # type: ignore[arg-type]


# (case, the Authorization header the issuer's state gives, status, a phrase the error names)
Case = tuple[str, Callable[[Issuer], str], int, str]
ATTACKS: list[Case] = [
    ("no credentials", lambda i: "", 401, "needs an API key or a bearer token"),
    ("empty bearer", lambda i: "Bearer", 401, "needs an API key or a bearer token"),
    ("basic scheme", lambda i: "Basic " + i.token(), 401, "needs an API key or a bearer token"),
    (
        "alg none",
        lambda i: "Bearer " + jwt.encode(_claims(i), None, "none"),  # type: ignore[arg-type]
        401,
        "algorithm 'none' is not accepted",
    ),
    (
        "HS256 signed with the RSA public key",
        lambda i: "Bearer " + _key_confusion(i),
        401,
        "algorithm 'HS256' is not accepted",
    ),
    (
        "expired",
        lambda i: "Bearer " + _sign(i, _claims(i, exp=int(time.time()) - 120)),
        401,
        "the token has expired",
    ),
    (
        "not yet valid",
        lambda i: "Bearer " + _sign(i, _claims(i, nbf=int(time.time()) + 600)),
        401,
        "not valid yet",
    ),
    (
        "issued in the future",
        lambda i: "Bearer " + _sign(i, _claims(i, iat=int(time.time()) + 600)),
        401,
        "not valid yet",
    ),
    (
        "wrong issuer",
        lambda i: "Bearer " + _sign(i, _claims(i, iss="https://evil.example")),
        401,
        "from another issuer",
    ),
    (
        "wrong audience",
        lambda i: "Bearer " + _sign(i, _claims(i, aud="another-service")),
        401,
        "for another audience",
    ),
    ("no audience", lambda i: "Bearer " + _sign(i, _claims(i, aud=None)), 401, '"aud"'),
    ("no expiry", lambda i: "Bearer " + _sign(i, _claims(i, exp=None)), 401, '"exp"'),
    (
        "missing scope",
        lambda i: "Bearer " + i.token(scope="openid profile"),
        403,
        "lacks the scope 'infer:iris'",
    ),
    (
        "scope for another model",
        lambda i: "Bearer " + i.token(scope="infer:wine infer:iris2"),
        403,
        "lacks the scope 'infer:iris'",
    ),
    ("admin scope only", lambda i: "Bearer " + i.token(scope="modelserve:admin"), 403, "infer"),
    (
        "tampered payload",
        lambda i: "Bearer " + _replace_part(i.token(scope="infer:wine"), 1, _grant_iris),
        401,
        "signature does not verify",
    ),
    (
        "tampered header: kid of the Ed25519 key",
        lambda i: "Bearer " + _replace_part(i.token(), 0, lambda h: h.update(kid="ed-1")),
        401,
        "does not verify RS256",
    ),
    (
        "tampered header: alg ES256 on the RSA key",
        lambda i: "Bearer " + _replace_part(i.token(), 0, lambda h: h.update(alg="ES256")),
        401,
        "does not verify ES256",
    ),
    (
        "signed by an impostor with a trusted kid",
        lambda i: "Bearer " + _untrusted(i, "rsa-1"),
        401,
        "signature does not verify",
    ),
    (
        "jku header naming the attacker's keys",
        lambda i: "Bearer " + _untrusted(i, "evil", jku="http://127.0.0.1:9/jwks"),
        401,
        "no trusted key has the token's key id 'evil'",
    ),
    (
        "unknown kid",
        lambda i: "Bearer " + _sign(i, _claims(i), kid="nobody"),
        401,
        "no trusted key has the token's key id 'nobody'",
    ),
    (
        "kid path trick",
        lambda i: "Bearer " + _sign(i, _claims(i), kid="../../../etc/passwd"),
        401,
        "no trusted key",
    ),
    (
        "kid not a string",
        lambda i: "Bearer " + _replace_part(i.token(), 0, lambda h: h.update(kid=7)),
        401,
        "Key ID header parameter must be a string",
    ),
    (
        "oversized token",
        lambda i: "Bearer " + _sign(i, _claims(i, pad="x" * 9000)),
        401,
        "longer than 8192 bytes",
    ),
    ("malformed base64", lambda i: "Bearer abc.%%%%.def", 401, "not a well-formed JWT"),
    ("nested JWT", lambda i: "Bearer " + _nested(i), 401, "not valid"),
    ("two parts: not a JWT", lambda i: "Bearer abc.def", 403, "the API key is not valid"),
    ("wrong API key", lambda i: "Bearer not-the-key", 403, "the API key is not valid"),
]


def _grant_iris(claims: dict[str, object]) -> None:
    claims["scope"] = "infer:iris"


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    keys = [new_key("rsa-1"), new_key("ec-1", "ES256"), new_key("ed-1", "EdDSA")]
    with run_issuer(keys) as running:
        yield running


def _token_env(issuer_url: str, **extra: str) -> dict[str, str]:
    return {
        "MODELSERVE_OIDC_ISSUER": issuer_url,
        "MODELSERVE_OIDC_AUDIENCE": AUDIENCE,
        "MODELSERVE_API_KEYS": API_KEY,
        "MODELSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
        "MODELSERVE_OIDC_TIMEOUT_S": str(FETCH_TIMEOUT_S),
        "MODELSERVE_OIDC_REFRESH_INTERVAL_S": str(REFRESH_INTERVAL_S),
        "MODELSERVE_JWT_LEEWAY_S": "5",
        **extra,
    }


@pytest.fixture(scope="module")
def token_server(
    issuer: Issuer, iris_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    env = _token_env(issuer.url)
    with run_server(iris_repository, tmp_path_factory.mktemp("token-logs"), env=env) as running:
        yield running


@pytest.fixture
def http(token_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=token_server.url, timeout=30.0) as client:
        yield client


def _infer(http: httpx.Client, authorization: str) -> httpx.Response:
    headers = {**JSON, "Authorization": authorization} if authorization else JSON
    return http.post(INFER, content=infer_body(), headers=headers)


@pytest.mark.parametrize(
    ("case", "authorization", "status", "phrase"), ATTACKS, ids=[case[0] for case in ATTACKS]
)
def test_token_attacks_are_refused(
    http: httpx.Client,
    issuer: Issuer,
    case: str,
    authorization: Callable[[Issuer], str],
    status: int,
    phrase: str,
) -> None:
    refused = _infer(http, authorization(issuer))
    assert refused.status_code == status, f"{case}: {refused.text}"
    assert phrase in refused.json()["error"], case
    assert refused.json()["type"] in ("Unauthorized", "InvalidToken", "Forbidden")
    challenge = refused.headers.get("www-authenticate", "")
    if status == 401:
        assert challenge.startswith("Bearer")
    if refused.json()["type"] == "InvalidToken":
        assert challenge == 'Bearer error="invalid_token"'
    if "lacks the scope" in phrase:
        assert challenge == 'Bearer error="insufficient_scope", scope="infer:iris"'
    # The server keeps serving a valid token, and an API key beside it.
    assert _infer(http, "Bearer " + issuer.token()).status_code == 200
    assert _infer(http, f"Bearer {API_KEY}").status_code == 200


def test_the_attack_table_has_at_least_25_cases() -> None:
    assert len(ATTACKS) >= 25


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
def test_each_key_type_verifies(http: httpx.Client, issuer: Issuer, kid: str) -> None:
    key = next(k for k in issuer.keys if k.kid == kid)
    assert _infer(http, "Bearer " + issuer.token(key=key)).status_code == 200


ENDPOINTS = [
    ("POST", INFER, infer_body(), JSON),
    ("POST", "/v2/models/iris/versions/2/infer", infer_body(), JSON),
    ("POST", V1, V1_BODY, JSON),
    ("POST", SCORE, CSV_BODY, {"Content-Type": "text/csv"}),
    ("GET", "/v2/models/iris", b"", {}),
    ("GET", "/v2/models/iris/ready", b"", {}),
    ("GET", "/v2/models/iris/stats", b"", {}),
    ("GET", "/v1/models/iris", b"", {}),
]
SCOPES = [
    ("modelserve:infer", 200),
    ("openid infer:iris", 200),
    ("infer:ir*", 200),
    ("infer:wine", 403),
    ("modelserve:admin", 403),
]


@pytest.mark.parametrize(("method", "path", "body", "headers"), ENDPOINTS)
@pytest.mark.parametrize(("scope", "status"), SCOPES)
def test_per_model_scopes_on_every_model_endpoint(
    http: httpx.Client,
    issuer: Issuer,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    scope: str,
    status: int,
) -> None:
    auth = {**headers, "Authorization": "Bearer " + issuer.token(scope=scope)}
    response = http.request(method, path, content=body or None, headers=auth)
    assert response.status_code == status, response.text
    if status == 403:
        assert "lacks the scope 'infer:iris'" in response.json()["error"]


def test_statistics_of_all_models_need_the_scope_of_every_model(
    http: httpx.Client, issuer: Issuer
) -> None:
    narrow = {"Authorization": "Bearer " + issuer.token(scope="infer:iris")}
    refused = http.get("/v2/models/stats", headers=narrow)
    assert refused.status_code == 403
    assert "lacks the scope 'modelserve:infer'" in refused.json()["error"]
    wide = {"Authorization": "Bearer " + issuer.token(scope="modelserve:infer")}
    assert http.get("/v2/models/stats", headers=wide).status_code == 200


def test_batch_jobs_take_the_scope_of_their_model(http: httpx.Client, issuer: Issuer) -> None:
    def bearer(scope: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + issuer.token(scope=scope)}

    iris, wine, wide = bearer("infer:ir*"), bearer("infer:wine"), bearer("modelserve:infer")
    upload = {"Content-Type": "text/csv"}
    # Refused before any of the upload is read: a job is scoring with the model's scope.
    refused = http.post("/v1/jobs?model=iris", content=CSV_BODY, headers={**upload, **wine})
    assert refused.status_code == 403
    assert "lacks the scope 'infer:iris'" in refused.json()["error"]
    submitted = http.post("/v1/jobs?model=iris", content=CSV_BODY, headers={**upload, **iris})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["id"]

    def state() -> str:
        answer = http.get(f"/v1/jobs/{job}", headers=iris)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["state"])

    wait_for(lambda: state() == "succeeded", what=f"job {job} to succeed")
    result = http.get(f"/v1/jobs/{job}/result", headers=iris)
    assert result.status_code == 200
    assert result.text.splitlines()[0].startswith("sepal_length,")
    # Another model's scope neither sees the job nor handles it.
    for method, path in (("GET", ""), ("GET", "/result"), ("DELETE", "")):
        other = http.request(method, f"/v1/jobs/{job}{path}", headers=wine)
        assert other.status_code == 403, (method, path)
        assert "lacks the scope 'infer:iris'" in other.json()["error"]
    assert http.get("/v1/jobs", headers=wine).json()["jobs"] == []
    assert http.get("/v1/jobs?model=iris", headers=wine).status_code == 403
    for scope in (iris, wide):
        assert job in [j["id"] for j in http.get("/v1/jobs", headers=scope).json()["jobs"]]
    assert http.delete(f"/v1/jobs/{job}", headers=iris).status_code == 204


def test_the_jobs_cli_sends_a_token(
    token_server: RunningServer, issuer: Issuer, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_bytes(CSV_BODY)
    cli = [sys.executable, "-m", "service", "jobs", "--url", token_server.url]
    submit = ["submit", "iris", str(rows)]

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
        environment.update(env or {})
        return subprocess.run(
            [*cli, *args], capture_output=True, text=True, timeout=120, env=environment, check=False
        )

    token = issuer.token(scope="infer:iris")
    by_option = run("--token", token, *submit)
    assert by_option.returncode == 0, by_option.stderr
    by_environment = run(*submit, env={"MODELSERVE_TOKEN": token})
    assert by_environment.returncode == 0, by_environment.stderr
    assert by_option.stdout != by_environment.stdout  # two jobs
    refused = run("--token", issuer.token(scope="infer:wine"), *submit)
    assert refused.returncode == 1
    assert "lacks the scope 'infer:iris'" in refused.stderr
    both = run("--token", token, "--api-key", API_KEY, *submit)
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr


@pytest.mark.parametrize("path", ["/v2/repository/index", "/v2/repository/models/iris/load"])
def test_admin_endpoints_need_the_admin_scope(
    http: httpx.Client, issuer: Issuer, path: str
) -> None:
    infer_only = {"Authorization": "Bearer " + issuer.token(scope="modelserve:infer infer:iris")}
    refused = http.post(path, headers=infer_only)
    assert refused.status_code == 403
    assert "lacks the scope 'modelserve:admin'" in refused.json()["error"]
    assert refused.headers["www-authenticate"] == (
        'Bearer error="insufficient_scope", scope="modelserve:admin"'
    )
    expired = issuer.token(scope="modelserve:admin", lifetime_s=-60)
    assert http.post(path, headers={"Authorization": f"Bearer {expired}"}).status_code == 401
    admin = {"Authorization": "Bearer " + issuer.token(scope="modelserve:admin")}
    assert http.post(path, headers=admin).status_code == 200
    assert http.post(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200


def test_the_jwks_is_not_fetched_per_request(http: httpx.Client, issuer: Issuer) -> None:
    assert _infer(http, "Bearer " + issuer.token()).status_code == 200
    before = issuer.jwks_requests()
    for n in range(30):
        token = issuer.token(key=issuer.keys[n % 3], jti=str(n))
        assert _infer(http, "Bearer " + token).status_code == 200
    assert issuer.jwks_requests() == before


def test_a_flood_of_unknown_kids_fetches_the_jwks_at_most_once(
    http: httpx.Client, issuer: Issuer
) -> None:
    time.sleep(REFRESH_INTERVAL_S)  # past any earlier refresh
    before = issuer.jwks_requests()
    started = time.monotonic()
    for _ in range(20):
        token = _sign(issuer, _claims(issuer), kid=uuid.uuid4().hex)
        assert _infer(http, "Bearer " + token).status_code == 401
    assert time.monotonic() - started < REFRESH_INTERVAL_S, "the flood outlasted the interval"
    assert issuer.jwks_requests() - before == 1


def test_rotated_keys_work_without_a_restart(http: httpx.Client, issuer: Issuer) -> None:
    old_key = issuer.keys[0]
    old_token = issuer.token(key=old_key, lifetime_s=8)
    assert _infer(http, "Bearer " + old_token).status_code == 200
    rotated = new_key("rsa-2")
    time.sleep(REFRESH_INTERVAL_S)
    issuer.keys = [rotated, *issuer.keys]
    try:
        assert _infer(http, "Bearer " + issuer.token(key=rotated)).status_code == 200
        # The old key is retired; tokens it signed serve until they expire, then not.
        issuer.keys = [k for k in issuer.keys if k.kid != old_key.kid]
        assert _infer(http, "Bearer " + old_token).status_code == 200
        time.sleep(8 + 5 + 0.5)  # lifetime and leeway
        expired = _infer(http, "Bearer " + old_token)
        assert expired.status_code == 401
        assert "expired" in expired.json()["error"]
    finally:
        issuer.keys = [old_key, *(k for k in issuer.keys if k.kid != rotated.kid)]


def test_a_stalled_issuer_answers_unknown_kids_within_a_bound(
    http: httpx.Client, issuer: Issuer
) -> None:
    known = issuer.token(jti="stall")
    assert _infer(http, "Bearer " + known).status_code == 200
    time.sleep(REFRESH_INTERVAL_S)
    issuer.stall_s = 5.0
    try:
        started = time.monotonic()
        refused = _infer(http, "Bearer " + _sign(issuer, _claims(issuer), kid="during-stall"))
        waited = time.monotonic() - started
        assert refused.status_code == 401
        assert "no trusted key" in refused.json()["error"]
        assert waited < FETCH_TIMEOUT_S + 1.0, f"an unknown kid waited {waited:.2f} s"
        # Cached keys keep working while the issuer stalls, without waiting for it.
        started = time.monotonic()
        assert _infer(http, "Bearer " + issuer.token(jti="fresh")).status_code == 200
        assert time.monotonic() - started < 0.5
    finally:
        issuer.stall_s = 0.0


def test_an_issuer_that_is_down_answers_401_not_500(
    iris_repository: Path, tmp_path: Path, issuer: Issuer
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    env = _token_env(down, MODELSERVE_OIDC_JWKS_URL=f"{down}/jwks")
    with run_server(iris_repository, tmp_path, env=env) as server:
        token = _sign(issuer, _claims(issuer, iss=down))
        started = time.monotonic()
        response = httpx.post(
            server.url + INFER,
            content=infer_body(),
            headers={**JSON, "Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert response.status_code == 401, response.text
        assert "no trusted key has the token's key id 'rsa-1'" in response.json()["error"]
        assert time.monotonic() - started < FETCH_TIMEOUT_S + 1.0
        assert "could not fetch the keys" in server.output()
        api_key = {**JSON, "X-API-Key": API_KEY}
        assert httpx.post(server.url + INFER, content=infer_body(), headers=api_key).is_success


def test_a_static_key_file_verifies_without_an_issuer(
    iris_repository: Path, tmp_path: Path, issuer: Issuer
) -> None:
    key = issuer.keys[2]  # Ed25519
    public = key.private.public_key()
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    env = {
        "MODELSERVE_OIDC_ISSUER": issuer.url,
        "MODELSERVE_OIDC_AUDIENCE": AUDIENCE,
        "MODELSERVE_JWT_PUBLIC_KEY_FILE": str(pem),
    }
    before = issuer.jwks_requests()
    with run_server(iris_repository, tmp_path, env=env) as server:
        good = {**JSON, "Authorization": "Bearer " + issuer.token(key=key)}
        assert httpx.post(server.url + INFER, content=infer_body(), headers=good).is_success
        other = {**JSON, "Authorization": "Bearer " + issuer.token(key=issuer.keys[0])}
        refused = httpx.post(server.url + INFER, content=infer_body(), headers=other)
        assert refused.status_code == 401
        assert "does not verify RS256" in refused.json()["error"]
    assert issuer.jwks_requests() == before

"""Settings: every option, read from MODELSERVE_* environment variables."""

import os
import re
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.store.registry import LoadOptions
from service.store.repository import is_model_name
from service.store.runtimes import RuntimeOptions
from service.store.signing import TrustedKeys

# "100/s", "6000/min", "100/s burst 200": a count per unit of time, then the burst allowed.
_RATE = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*(?:burst\s+(\d+))?\s*",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}


class Rate(NamedTuple):
    """A token bucket's rule: tokens added per second, and the most it holds."""

    per_second: float
    burst: float


def parse_rate(text: str) -> Rate:
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"rate limit {text!r} is not of the form '100/s', '6000/min' or '100/s burst 200'"
        )
    count, unit, burst = float(match[1]), match[2].lower(), match[3]
    if count <= 0:
        raise ValueError(f"rate limit {text!r} must allow more than 0 requests")
    # Without a burst, a client may spend one unit's worth at once (at least one request).
    rule = Rate(count / _UNIT_SECONDS.get(unit, 3600), max(1.0, count))
    if burst is not None:
        if int(burst) < 1:
            raise ValueError(f"rate limit {text!r}: the burst must be at least 1")
        rule = rule._replace(burst=float(burst))
    return rule


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's cores,
    not the machine's), which the defaults of workers, model threads and job processes follow."""
    return len(os.sched_getaffinity(0))


class Settings(BaseSettings):
    """One place for configuration; CLI flags override the environment."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_", extra="ignore")

    model_repository: Path = Field(Path("models"), description="Model repository folder.")
    model_name: str | None = Field(
        None,
        description="Serve the repository folder as this one model: a folder of version folders, "
        "or one version's artifact and metadata.json (what KServe mounts at /mnt/models).",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(1, ge=1, description="Server processes.")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="TCP port of the gRPC service (Open Inference Protocol), on the same host "
        "as HTTP; every worker serves it; 0: off.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the repository endpoints; unset: they answer 403."
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys for inference; unset: inference is open."
    )
    oidc_issuer: str | None = Field(
        None,
        description="Issuer of the JWT bearer tokens accepted (their `iss`); its OIDC discovery "
        "document names the JWKS URL unless MODELSERVE_OIDC_JWKS_URL is set.",
    )
    oidc_audience: str | None = Field(
        None, description="Audience the tokens must name (`aud`); needed with tokens."
    )
    oidc_jwks_url: str | None = Field(
        None, description="JWKS URL of the issuer's keys (else from its discovery document)."
    )
    jwt_public_key_file: Path | None = Field(
        None,
        description="Static token keys instead of the issuer's JWKS URL (air-gapped setups): a "
        "PEM public key, or a JWKS JSON file.",
    )
    jwt_hmac_secret: SecretStr | None = Field(
        None,
        description="Shared secret for HS256/HS384/HS512 tokens; unset: HMAC tokens are refused.",
    )
    jwt_algorithms: str = Field(
        "RS256,ES256,EdDSA",
        description="Comma-separated token algorithms accepted; `none` never is, HMAC only "
        "with MODELSERVE_JWT_HMAC_SECRET.",
    )
    jwt_leeway_s: float = Field(
        30.0, ge=0, le=300, description="Clock skew allowed on `exp`, `nbf` and `iat`, seconds."
    )
    jwt_scope_claim: str = Field(
        "scope",
        description="Claim holding a token's scopes: a space-separated string or a list.",
    )
    oidc_timeout_s: float = Field(
        2.0,
        gt=0,
        le=30,
        description="Longest wait for the issuer's discovery document or JWKS, in seconds.",
    )
    oidc_refresh_interval_s: float = Field(
        30.0,
        ge=0,
        description="Fewest seconds between JWKS fetches that unknown key ids trigger.",
    )
    oidc_cache_s: float = Field(
        3600.0,
        gt=0,
        description="Age in seconds after which cached keys are refreshed in the background.",
    )
    trusted_keys: str | None = Field(
        None,
        description="Comma-separated PEM files of the Ed25519 public keys whose version "
        "signatures are trusted; a version with a bad or untrusted signature does not load.",
    )
    require_signatures: bool = Field(
        False, description="Versions must be signed by a trusted key to load."
    )
    rate_limit: str | None = Field(
        None,
        description="Requests each client may send, per worker: '100/s', '6000/min', or with a "
        "burst, '100/s burst 200' (default burst: one unit's worth); a client is its API key, "
        "its token's subject, or its address when anonymous; past it: 429 with Retry-After; "
        "unset: no limit.",
    )
    rate_limit_clients: int = Field(
        10_000,
        ge=1,
        description="Clients whose rate limit is tracked at once, per worker; past it the "
        "least recently seen is forgotten (and starts again with a full burst).",
    )
    allow_unverified_pickle: bool = Field(
        False, description="Load pickles without a verified sha256 (unpickling runs code)."
    )
    strict_versions: bool = Field(
        False, description="Refuse pickles made with another scikit-learn version."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    access_log: bool = Field(True, description="Log one line per request (at info level).")
    max_request_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Largest request body accepted, in bytes."
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request head (request line and header fields) accepted, in bytes; "
        "past it: 431 and the connection closes.",
    )
    header_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a client has to send a request head, from connecting or from the "
        "previous answer; past them: 408 and the connection closes.",
    )
    body_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a request body may go without any of its next part arriving; "
        "past them: 408. Uploads (a job's input, a file to `:score`) have no other bound; "
        "inference bodies are also within the request deadline.",
    )
    max_batch_rows: int = Field(
        1_000_000, ge=1, description="Most rows accepted in one inference request."
    )
    max_row_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Longest row of a CSV or NDJSON file to score, in bytes (400 above).",
    )
    max_decoding_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description="Memory that the inference requests in flight may hold at once, per worker, "
        "estimated as 9 bytes per byte of body; past it: 503 with Retry-After.",
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Inference deadline in seconds; a V2 request may shorten it with "
        "parameters.timeout (microseconds, as tritonclient sends it).",
    )
    max_queue_requests: int = Field(
        256,
        ge=1,
        description="Requests that may wait per model version; past it: 503 with Retry-After.",
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM, seconds of answering 503 (readiness included) before the "
        "listener closes, so load balancers stop routing here first.",
    )
    protect_metrics: bool = Field(
        False, description="/metrics needs an API key or the admin token (default: open)."
    )
    repository_poll_s: float = Field(
        0.0, ge=0, description="Repository polling interval in seconds; 0: off."
    )
    routing_sync_s: float = Field(
        1.0,
        gt=0,
        description="How often every worker applies a changed model.toml (routing, load, "
        "unload), in seconds: the bound on how long a change takes to reach all workers.",
    )
    shadow_max_pending: int = Field(
        8,
        ge=1,
        description="Shadow requests that may be in flight per version pair; past it they are "
        "dropped (and counted), so a slow shadow never slows the primary.",
    )
    drift_window_rows: int = Field(
        10_000,
        ge=0,
        description="Rows per version (per worker) over which live drift is measured against "
        "the version's reference profile; 0: no drift measured.",
    )
    drift_window_s: float = Field(
        0.0,
        ge=0,
        description="Also limit the drift window to the rows of the last this many seconds "
        "(it moves in tenths); 0: rows only.",
    )
    drift_max_features: int = Field(
        50,
        ge=0,
        description="Features per version with drift series (the first ones declared), which "
        "bounds the number of series.",
    )
    payload_log_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of inference requests whose inputs and outputs are logged (a model's "
        "model.toml may set its own under [payload_log]); 0: none, so no feature values are "
        "written anywhere.",
    )
    payload_log_file: Path | None = Field(
        None,
        description="JSON-lines file the sampled requests are appended to (shared by every "
        "worker), rotated past MODELSERVE_PAYLOAD_LOG_MAX_BYTES.",
    )
    payload_log_max_bytes: int = Field(
        100 * 1024 * 1024,
        ge=1,
        description="Size past which the payload log file is rotated (to FILE.1, FILE.2, ...).",
    )
    payload_log_backups: int = Field(
        5, ge=0, description="Rotated payload log files kept besides the current one."
    )
    payload_log_url: str | None = Field(
        None,
        description="HTTP sink the sampled requests are posted to, as CloudEvents in the shape "
        "of KServe's payload logger (one event for the request, one for the response).",
    )
    payload_log_queue: int = Field(
        1000,
        ge=1,
        description="Sampled requests waiting for the sink, per worker; past it they are "
        "dropped (and counted), so a slow sink never slows inference.",
    )
    payload_log_timeout_s: float = Field(
        1.0, gt=0, description="Timeout of each post to MODELSERVE_PAYLOAD_LOG_URL, in seconds."
    )
    batching_max_rows: int = Field(
        256, ge=0, description="Default rows per model call when batching; 0: no batching."
    )
    batching_max_delay_ms: float = Field(
        0.0, ge=0, description="Default wait for more rows before a call; 0: no wait."
    )
    onnx_intra_op_threads: int = Field(
        1, ge=0, description="ONNX Runtime intra-op threads per session; 0: one per core."
    )
    onnx_inter_op_threads: int = Field(
        1, ge=0, description="ONNX Runtime inter-op threads per session; 0: default."
    )
    graceful_shutdown_s: int = Field(
        30, ge=0, description="After SIGTERM, seconds to finish in-flight requests before exit."
    )

    jobs_dir: Path | None = Field(
        None,
        description="Batch jobs' SQLite database, inputs and results; unset: "
        "`.modelserve-jobs/<repository folder name>` beside the model repository.",
    )
    jobs_input_roots: str = Field(
        "",
        description="Comma-separated folders whose files a job may name as `input_path`; "
        "unset: jobs take their input as the request body only.",
    )
    jobs_max_bytes: int = Field(
        10 * 1024**3,
        ge=1,
        description="Disk use of the jobs folder (inputs and results) past which a submission "
        "answers 507.",
    )
    jobs_retention_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="Seconds a finished job (its record, input and result) is kept.",
    )
    jobs_processes: int = Field(
        0,
        ge=0,
        description="Scoring processes per server worker for batch jobs; 0: one per core the "
        "server may run on.",
    )
    jobs_dask_scheduler: str | None = Field(
        None,
        description="A Dask scheduler's address (tcp://host:8786): jobs' parts run on its "
        "workers, which must see the model repository and jobs folder at the same paths.",
    )
    jobs_part_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Input bytes per part of a job: a part is what a restart redoes.",
    )

    @field_validator("model_name")
    @classmethod
    def _model_name_is_valid(cls, name: str | None) -> str | None:
        if name is not None and not is_model_name(name):
            raise ValueError(f"{name!r} is not a model name: use letters, digits, '_', '.', '-'")
        return name

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_is_valid(cls, text: str | None) -> str | None:
        if text is not None and text.strip():
            parse_rate(text)
            return text
        return None

    def rate(self) -> Rate | None:
        """The per-client rate limit, or None when there is none."""
        return parse_rate(self.rate_limit) if self.rate_limit is not None else None

    @field_validator("payload_log_url")
    @classmethod
    def _payload_url_is_http(cls, url: str | None) -> str | None:
        if url is not None and not url.strip():
            return None
        if url is not None and not re.match(r"https?://[^/?#]+", url, re.IGNORECASE):
            raise ValueError(
                f"MODELSERVE_PAYLOAD_LOG_URL {url!r} must be an http:// or https:// URL"
            )
        return url

    @model_validator(mode="after")
    def _payload_log_has_one_sink(self) -> "Settings":
        if self.payload_log_file is not None and self.payload_log_url is not None:
            raise ValueError(
                "set MODELSERVE_PAYLOAD_LOG_FILE or MODELSERVE_PAYLOAD_LOG_URL, not both"
            )
        if self.payload_log_rate > 0 and not self.payload_logging():
            raise ValueError(
                "MODELSERVE_PAYLOAD_LOG_RATE needs a sink: set MODELSERVE_PAYLOAD_LOG_FILE or "
                "MODELSERVE_PAYLOAD_LOG_URL"
            )
        return self

    def payload_logging(self) -> bool:
        """Whether a payload sink is set; without one no request is sampled."""
        return self.payload_log_file is not None or self.payload_log_url is not None

    @model_validator(mode="after")
    def _signatures_have_keys(self) -> "Settings":
        if self.require_signatures and not self.trusted_key_files():
            raise ValueError("MODELSERVE_REQUIRE_SIGNATURES needs MODELSERVE_TRUSTED_KEYS")
        return self

    def trusted_key_files(self) -> list[Path]:
        text = self.trusted_keys or ""
        return [Path(part.strip()) for part in text.split(",") if part.strip()]

    @model_validator(mode="after")
    def _tokens_are_bound(self) -> "Settings":
        if not self.tokens_enabled():
            return self
        # A token for another service of the same issuer must not open this one.
        missing = [
            name
            for name, value in (
                ("MODELSERVE_OIDC_ISSUER", self.oidc_issuer),
                ("MODELSERVE_OIDC_AUDIENCE", self.oidc_audience),
            )
            if not value
        ]
        if missing:
            raise ValueError(f"JWT bearer tokens need {' and '.join(missing)} set")
        algorithms = self.jwt_algorithm_set()
        if not algorithms or any(name.lower() == "none" for name in algorithms):
            raise ValueError("MODELSERVE_JWT_ALGORITHMS must list signing algorithms, never 'none'")
        if any(name.startswith("HS") for name in algorithms) and self.jwt_hmac_secret is None:
            # Never HMAC with a public key: that key is public, so anyone could sign.
            raise ValueError("HMAC algorithms (HS256…) need MODELSERVE_JWT_HMAC_SECRET")
        if self.oidc_jwks_url is not None and self.jwt_public_key_file is not None:
            raise ValueError(
                "set MODELSERVE_OIDC_JWKS_URL or MODELSERVE_JWT_PUBLIC_KEY_FILE, not both"
            )
        return self

    def tokens_enabled(self) -> bool:
        """Whether JWT bearer tokens are accepted: some source of keys is configured."""
        return any(
            value is not None
            for value in (
                self.oidc_issuer,
                self.oidc_jwks_url,
                self.jwt_public_key_file,
                self.jwt_hmac_secret,
            )
        )

    def jwt_algorithm_set(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.jwt_algorithms.split(",") if a.strip())

    def api_key_list(self) -> list[str]:
        if self.api_keys is None:
            return []
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    def jobs_folder(self) -> Path:
        if self.jobs_dir is not None:
            return self.jobs_dir
        # One folder per repository: servers of repositories side by side keep their own jobs.
        repository = self.model_repository.resolve()
        return repository.parent / ".modelserve-jobs" / (repository.name or "root")

    def jobs_roots(self) -> list[Path]:
        return [Path(r.strip()) for r in self.jobs_input_roots.split(",") if r.strip()]

    def load_options(self) -> LoadOptions:
        """What loading a version needs of the settings, for the server and offline scoring."""
        return LoadOptions(
            allow_unverified_pickle=self.allow_unverified_pickle,
            runtime=RuntimeOptions(
                strict_versions=self.strict_versions,
                onnx_intra_op_threads=self.onnx_intra_op_threads,
                onnx_inter_op_threads=self.onnx_inter_op_threads,
            ),
            batching_max_rows=self.batching_max_rows,
            batching_max_delay_ms=self.batching_max_delay_ms,
            model_name=self.model_name,
            trusted_keys=TrustedKeys.read(self.trusted_key_files(), self.require_signatures)
            if self.trusted_key_files()
            else None,
        )

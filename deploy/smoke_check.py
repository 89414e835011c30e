"""Checks a running modelserve over HTTP: ready, V2 and V1 answers for an iris row, /metrics.

Usage: python deploy/smoke_check.py URL MODEL [--absent OTHER_MODEL]
MODEL must be an iris classifier; the image smoke test (deploy/smoke-image.sh) runs this against
each container it starts. Standard library only, so it runs with any Python 3.11.
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

SETOSA_ROW = [5.1, 3.5, 1.4, 0.2]


def request(url: str, body: object | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=data, headers=headers), timeout=10
        ) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(url: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if request(f"{url}/v2/health/ready")[0] == 200:
                return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready within {timeout:.0f} s")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"check failed: {message}")


def check(url: str, model: str, absent: str | None, timeout: float) -> None:
    waited = wait_ready(url, timeout)
    status, body = request(f"{url}/v2/models/{model}/ready")
    expect(status == 200, f"model {model} ready: {status} {body[:200]!r}")
    v2 = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": SETOSA_ROW}]}
    status, body = request(f"{url}/v2/models/{model}/infer", v2)
    expect(status == 200, f"V2 infer: {status} {body[:200]!r}")
    outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
    expect(outputs.get("label") == ["setosa"], f"V2 label {outputs.get('label')}")
    status, body = request(f"{url}/v1/models/{model}:predict", {"instances": [SETOSA_ROW]})
    expect(status == 200, f"V1 predict: {status} {body[:200]!r}")
    predictions = json.loads(body)["predictions"]
    expect(predictions == ["setosa"], f"V1 predictions {predictions}")
    status, body = request(f"{url}/metrics")
    text = body.decode()
    expect(status == 200 and f'model="{model}"' in text, "/metrics has no sample for the model")
    if absent is not None:
        status, _ = request(f"{url}/v2/models/{absent}")
        expect(status == 404, f"model {absent} should not be served, got {status}")
    print(f"{url}: {model} ready after {waited:.1f} s; V2 and V1 answer setosa; /metrics ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("--absent", help="a model name that must answer 404")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args()
    check(args.url.rstrip("/"), args.model, args.absent, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

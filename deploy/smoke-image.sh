#!/usr/bin/env bash
# Builds the Dockerfile with podman and smoke-tests the image for real: readiness, a V2 inference
# and a V1 prediction with checked answers, /metrics, a non-root process, a clean exit on SIGTERM
# within the grace period, a read-only root filesystem, a model repository mounted from the host
# and the single-model layout that KServe mounts at /mnt/models.
#
# Where podman cannot run (not root, no apt, no Debian mirror), it prints SKIPPED with the reason,
# then lints the Dockerfile and smoke-tests the same install steps on the host instead.
#
# Environment: MODELSERVE_PODMAN_DIR (default /var/tmp/modelserve-podman) holds podman's private
# storage, so the locally built base image is kept between runs on one machine.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON_FOR_SMOKE:-$repo/.venv/bin/python}
work=${MODELSERVE_PODMAN_DIR:-/var/tmp/modelserve-podman}
# The Dockerfile's default base (python:3.11-slim-bookworm) comes from a registry; where none can
# be reached this script builds a Debian base with debootstrap and passes it as BASE.
base=localhost/debian-python:bookworm
image=localhost/modelserve-runtime:smoke
grace=35 # seconds: MODELSERVE_GRACEFUL_SHUTDOWN_S (30) plus a margin, as in the Deployment
started=$SECONDS
checks=0

step() { printf '[smoke %4ds] %s\n' "$((SECONDS - started))" "$*"; }
ok() {
  checks=$((checks + 1))
  step "ok: $*"
}
fail() {
  step "FAILED: $*"
  exit 1
}

lint() {
  step "hadolint --failure-threshold warning Dockerfile"
  "$repo/.venv/bin/hadolint" --failure-threshold warning Dockerfile || fail "hadolint"
  ok "hadolint found nothing at warning level"
}

# Sets $reason when podman cannot be used here (installs it when missing).
check_podman() {
  [ "$(id -u)" = 0 ] || { reason="not root: podman's storage and debootstrap need root"; return; }
  command -v apt-get >/dev/null || { reason="no apt-get to install podman"; return; }
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]}"
    if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >"$work/apt.log" 2>&1; then
      reason="apt-get install ${missing[*]} failed: $(tail -n 1 "$work/apt.log")"
      return
    fi
  fi
  configure_podman
  podman info >"$work/podman-info.log" 2>&1 ||
    reason="podman info failed: $(tail -n 1 "$work/podman-info.log")"
}

configure_podman() {
  # runc because crun refuses hybrid cgroups; fixed ulimits because root may not raise them here.
  cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
events_logger = "file"
cgroup_manager = "cgroupfs"
EOF
  local driver=overlay
  grep -qw overlay /proc/filesystems || driver=vfs
  cat >"$work/storage.conf" <<EOF
[storage]
driver = "$driver"
runroot = "$work/runroot"
graphroot = "$work/graphroot"
EOF
  export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf
}

# The base image, built once with debootstrap from the machine's Debian mirror; sets $reason
# when that fails.
build_base() {
  podman image exists "$base" && return 0
  local mirror rootfs
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d "$work/rootfs.XXXXXX")
  step "debootstrap bookworm from $mirror (once per machine)"
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    rm -rf "$rootfs"
    reason="debootstrap failed: $(tail -n 1 "$work/debootstrap.log")"
    return
  fi
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  mount -t proc proc "$rootfs/proc"
  local rc=0
  chroot "$rootfs" sh -c 'apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates && apt-get clean && rm -rf /var/lib/apt/lists/*' \
    >"$work/base-apt.log" 2>&1 || rc=$?
  umount "$rootfs/proc"
  if [ $rc = 0 ]; then
    : >"$rootfs/etc/resolv.conf"
    tar --numeric-owner -C "$rootfs" -c . |
      podman import --change 'ENV LANG=C.UTF-8' - "$base" >"$work/import.log" 2>&1 || rc=$?
  fi
  rm -rf "$rootfs"
  [ $rc = 0 ] || reason="base image install failed: $(tail -n 1 "$work/base-apt.log")"
  [ $rc != 0 ] || ok "base image $base built"
}

# Runs a container detached with a read-only root, published on a loopback port.
# Usage: run_image NAME HOST_PORT CONTAINER_PORT [podman run options] IMAGE [arguments]
run_image() {
  local name=$1 port=$2 container_port=$3
  shift 3
  containers+=("$name")
  # Without systemd podman logs that it cannot schedule the HEALTHCHECK timer; it still runs
  # the check on demand (podman healthcheck run).
  podman run -d --name "$name" --read-only --tmpfs /tmp \
    -p "127.0.0.1:$port:$container_port" "$@" >>"$work/run.log" 2>&1 ||
    { tail -n 5 "$work/run.log"; fail "podman run $name"; }
}

free_port() { "$python" -c 'from tests.serving import free_port; print(free_port())'; }

check() { "$python" deploy/smoke_check.py "$@"; }

smoke_image() {
  local name=ms-smoke-$$ port t0 code
  step "podman build (BASE=$base)"
  # The builder stage is tagged too, so pruning what earlier runs left keeps its layers (the
  # installed dependencies) as the cache of the next build.
  local target
  for target in builder runtime; do
    podman build --quiet --network=host --format docker --target "$target" \
      -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
      --build-arg BASE="$base" -t "localhost/modelserve-$target:smoke" . >"$work/build.log" 2>&1 ||
      { tail -n 30 "$work/build.log"; fail "podman build --target $target"; }
  done
  podman image prune -f >/dev/null
  ok "image built: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
  local config
  config=$(podman image inspect --format \
    '{{.Config.User}} {{.Config.StopSignal}} {{.Config.ExposedPorts}} {{.Config.Healthcheck.Test}}' "$image")
  [[ $config == "10001:10001 SIGTERM map[8000/tcp:{} 8001/tcp:{}] [CMD "*/v2/health/ready* ]] ||
    fail "image config: $config"
  ok "image config: USER 10001, STOPSIGNAL SIGTERM, EXPOSE 8000 8001, HEALTHCHECK on /v2/health/ready"

  port=$(free_port)
  run_image "$name" "$port" 8000 "$image"
  check "http://127.0.0.1:$port" iris || { podman logs "$name" | tail -n 20; fail "bundled models"; }
  ok "bundled iris: ready, V2 and V1 answer setosa, /metrics scraped"
  podman healthcheck run "$name" >>"$work/run.log" 2>&1 || fail "HEALTHCHECK is not healthy"
  ok "HEALTHCHECK answers healthy"
  local uid
  uid=$(podman exec "$name" id -u)
  [ "$uid" != 0 ] || fail "the server runs as root"
  ok "server runs as uid $uid, root filesystem read-only"
  podman exec "$name" sleep 0 || fail "no sleep binary for the Kubernetes preStop hook"
  ok "preStop command 'sleep' exists in the image"
  t0=$SECONDS
  podman stop -t "$grace" "$name" >/dev/null 2>>"$work/run.log"
  code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
  [ "$code" = 0 ] || { podman logs "$name" | tail -n 20; fail "exit code $code after SIGTERM"; }
  [ $((SECONDS - t0)) -lt "$grace" ] || fail "stop took $((SECONDS - t0)) s (grace $grace s)"
  # The log file of a container that just exited can lag its exit by a moment.
  local tries=0
  until [[ $(podman logs "$name" 2>&1) == *"Application shutdown complete"* ]]; do
    tries=$((tries + 1))
    [ "$tries" -lt 10 ] || fail "no graceful shutdown in the log"
    sleep 0.5
  done
  ok "SIGTERM: exit code 0 after $((SECONDS - t0)) s (grace $grace s)"

  # A repository trained on the host, mounted read-only; renamed so only the mount can serve it.
  local host_repo
  host_repo=$(mktemp -d "$work/host-models.XXXXXX")
  temporary+=("$host_repo")
  "$python" -m training --model-repository "$host_repo" >"$work/train.log" 2>&1 || fail "training"
  mv "$host_repo/iris" "$host_repo/flowers"
  chmod -R a+rX "$host_repo"
  port=$(free_port)
  run_image "$name-host" "$port" 8000 -v "$host_repo:/models:ro" "$image"
  check "http://127.0.0.1:$port" flowers --absent iris ||
    { podman logs "$name-host" | tail -n 20; fail "host repository"; }
  ok "host repository mounted at /models: serves 'flowers', not the bundled 'iris'"

  # KServe: one model version at /mnt/models, the ServingRuntime's arguments, port 8080.
  port=$(free_port)
  run_image "$name-kserve" "$port" 8080 -v "$host_repo/flowers/2:/mnt/models:ro" \
    -e MODELSERVE_MODEL_NAME=iris-kserve "$image" \
    serve --model-repository /mnt/models --port 8080 --host 0.0.0.0
  check "http://127.0.0.1:$port" iris-kserve ||
    { podman logs "$name-kserve" | tail -n 20; fail "KServe layout"; }
  ok "KServe layout: a single model version at /mnt/models served as 'iris-kserve' on 8080"
}

# The same install steps as the Dockerfile, on the host, when podman cannot run.
smoke_host() {
  local venv repo_dir port pid code
  venv=$(mktemp -d /tmp/modelserve-host-smoke.XXXXXX)
  temporary+=("$venv")
  step "host: venv, pip install -c constraints.txt ., train, serve"
  python3 -m venv "$venv/venv"
  "$venv/venv/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt . \
    >"$venv/pip.log" 2>&1 || { tail -n 20 "$venv/pip.log"; fail "pip install"; }
  repo_dir=$venv/models
  cp -r models "$repo_dir"
  (cd "$venv" && venv/bin/python -m training --model-repository "$repo_dir") >"$venv/train.log" 2>&1 ||
    fail "training"
  port=$(free_port)
  MODELSERVE_MODEL_REPOSITORY=$repo_dir MODELSERVE_HOST=127.0.0.1 MODELSERVE_PORT=$port \
    "$venv/venv/bin/modelserve" serve >"$venv/serve.log" 2>&1 &
  pid=$!
  check "http://127.0.0.1:$port" iris || { tail -n 20 "$venv/serve.log"; kill "$pid"; fail "host server"; }
  ok "host install: ready, V2 and V1 answer setosa, /metrics scraped"
  kill -TERM "$pid"
  code=0
  wait "$pid" || code=$?
  # uvicorn re-raises SIGTERM once it has drained, so outside a container (where the server is
  # not PID 1) a graceful exit reports 143.
  [ "$code" = 0 ] || [ "$code" = 143 ] || fail "host server exit code $code after SIGTERM"
  grep -q "Application shutdown complete" "$venv/serve.log" || fail "no graceful shutdown"
  ok "host server: graceful shutdown after SIGTERM (exit code $code)"
}

containers=()
temporary=()
cleanup() {
  for c in "${containers[@]}"; do podman rm -f -t 0 "$c" >/dev/null 2>&1 || true; done
  for d in "${temporary[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT

mkdir -p "$work"
lint
reason=
check_podman
if [ -z "$reason" ]; then
  # One smoke test at a time per machine: they share the storage and the base image.
  exec 9>"$work/lock"
  if ! flock -n 9; then
    step "waiting for another image smoke test on this machine"
    flock -w 900 9 || reason="another image smoke test held $work/lock for 15 minutes"
  fi
  [ -n "$reason" ] || build_base
fi
if [ -n "$reason" ]; then
  echo "image smoke test SKIPPED: $reason"
  smoke_host
  echo "image smoke test SKIPPED ($reason); host smoke test: $checks checks ok in $((SECONDS - started)) s"
  exit 0
fi
smoke_image
echo "image smoke test: $checks passed, 0 failed in $((SECONDS - started)) s"

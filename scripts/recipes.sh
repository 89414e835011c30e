#!/usr/bin/env bash
# Runs the README's Spark and Ray recipes for real (tests/test_recipes.py: Spark in local mode,
# Ray in local mode): installs the `recipes` extra (pyspark, Ray) and, when `java` is missing,
# Debian's JRE, then runs the tests marked `recipes`. Not part of scripts/test.sh: the install
# alone takes minutes (pyspark is a 450 MB source distribution that pip builds).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh recipes
if ! command -v java >/dev/null && [ -z "${JAVA_HOME:-}" ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "java is missing; install Debian's 'default-jre-headless' package (Spark runs on a JRE)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    default-jre-headless >/dev/null
fi
.venv/bin/pytest --recipes -m recipes "$@"

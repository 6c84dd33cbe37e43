#!/usr/bin/env bash
# Installs everything the worker, its demo and its tests need: ffmpeg (apt) and .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
    echo "installing ffmpeg from apt..."
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq ffmpeg >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip "setuptools>=70.1" wheel
$pip install -q -r requirements.txt -r requirements-dev.txt
$pip install -q --no-deps --no-build-isolation --use-pep517 -r requirements-models.txt
$pip install -q --no-deps --no-build-isolation -e .
echo "environment ready in .venv/"

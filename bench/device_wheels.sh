#!/usr/bin/env bash
# Run here, before a device call: downloads the tested (constraints.txt) wheels that bench/device_run.sh
# installs on the lent GPU machine, whose own transformers/peft are other versions. About 19 MB, under
# the 64 MiB a call carries; bench/.device_wheels is git-ignored, so name it in the call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf bench/.device_wheels
pip download --quiet --no-deps -d bench/.device_wheels -c constraints.txt \
    --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    peft transformers huggingface-hub tokenizers safetensors typer
ls -la bench/.device_wheels

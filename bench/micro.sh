#!/bin/sh
# Run the micro-benchmarks (bench/micro, pytest-benchmark, marked `microbench`, which the
# default test run excludes). Extra arguments go to pytest, e.g.:
#   bench/micro.sh -k shard
#   bench/micro.sh --benchmark-json /tmp/micro.json
# Uses ./.venv/bin/python from the repository root if present, else python3.
set -eu
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
exec "$PY" -m pytest bench/micro -m microbench -p no:cacheprovider -q "$@"

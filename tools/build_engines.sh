#!/usr/bin/env bash
# Builds llama.cpp's real `llama-server` (and its tiny test model) for the tests and the demo.
#
# Source: the llama.cpp tree that the `llama-cpp-python` sdist on PyPI carries under
# vendor/llama.cpp (PyPI is the only network this needs). The build happens once per pinned
# version in a cache outside the checkout, so a fresh clone on the same machine reuses it:
#   ${SUPERVISORD_LLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/supervisord-llm}/llama.cpp-<version>-<flavour>/
# and is then copied into the checkout:
#   .engines/llama.cpp/bin/llama-server       (gitignored)
#   .engines/models/tiny-llama.gguf           (made by tools/make_tiny_gguf.py, deterministic)
#
# Usage: tools/build_engines.sh [--cuda] [--source-tarball PATH] [--prefix DIR]
#   --cuda            build with -DGGML_CUDA=ON for Hopper (sm_90) instead of the CPU build
#   --source-tarball  use this trimmed source tarball (see --make-tarball) instead of PyPI
#   --make-tarball F  write the trimmed llama.cpp source (no docs, no model files but the
#                     llama-spm vocab) to F, for a machine without network, and exit
#   --prefix DIR      install into DIR/llama.cpp/bin and DIR/models instead of .engines
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$here/.engines"
flavour="cpu"
tarball=""
make_tarball=""
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi

while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda) flavour="cuda"; shift ;;
        --source-tarball) tarball="$2"; shift 2 ;;
        --make-tarball) make_tarball="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        *) echo "build_engines.sh: unknown argument '$1' (valid: --cuda, --source-tarball PATH, --make-tarball PATH, --prefix DIR)" >&2; exit 2 ;;
    esac
done

cache="${SUPERVISORD_LLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/supervisord-llm}"
build_root="$cache/llama.cpp-$LLAMA_CPP_PYTHON_VERSION-$flavour"
src="$cache/llama.cpp-$LLAMA_CPP_PYTHON_VERSION-src"
# LLAMA_CMAKE_ARGS: extra CMake flags (e.g. "-DGGML_NATIVE=OFF" for a binary that runs on other CPUs);
# they are part of the stamp, so changing them rebuilds.
extra_cmake_args="${LLAMA_CMAKE_ARGS:-}"
stamp_text="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION $flavour${extra_cmake_args:+ $extra_cmake_args}"
mkdir -p "$cache"

fetch_source() {
    # The source tree is shared by both flavours; a partial extraction never counts because
    # the tree is renamed into place only when complete.
    [[ -f "$src/.complete" ]] && return 0
    local tmp="$cache/.src-tmp.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    if [[ -n "$tarball" ]]; then
        tar -xzf "$tarball" -C "$tmp"
        mv "$tmp"/llama.cpp "$tmp/tree"
    else
        local dl="$cache/downloads"
        local sdist="$dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
        if [[ ! -f "$sdist" ]]; then
            mkdir -p "$dl"
            "$python" -m pip download --quiet --no-binary :all: --no-deps \
                "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$dl"
        fi
        tar -xzf "$sdist" -C "$tmp" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
        mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$tmp/tree"
    fi
    touch "$tmp/tree/.complete"
    rm -rf "$src"
    mv "$tmp/tree" "$src"
    rm -rf "$tmp"
}

fetch_source

if [[ -n "$make_tarball" ]]; then
    # Trimmed for a machine without network: what CMake needs for llama-server, gguf-py for
    # the tiny model, and the one vocab file it borrows.
    (cd "$src" && find . -type f \
        -not -path './docs/*' -not -path './media/*' -not -path './benches/*' -not -path './models/*' \
        -not -path './tools/ui/src/*' -not -path './tools/ui/static/*' -not -path './tools/ui/tests/*' \
        -not -name '.complete' -not -name '*.png' -not -name '*.jpg' \
        && echo ./models/ggml-vocab-llama-spm.gguf) \
      | tar -czf "$make_tarball" -C "$src" --transform 's,^\.,llama.cpp,' -T -
    echo "wrote $make_tarball ($(du -h "$make_tarball" | cut -f1))"
    exit 0
fi

if [[ ! -f "$build_root/stamp" || "$(cat "$build_root/stamp")" != "$stamp_text" ]]; then
    jobs="${BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
    cmake_flags=(
        -DCMAKE_BUILD_TYPE=Release
        -DBUILD_SHARED_LIBS=OFF
        -DLLAMA_BUILD_TESTS=OFF
        -DLLAMA_BUILD_EXAMPLES=OFF
        -DLLAMA_BUILD_SERVER=ON
        # The web UI is fetched from Hugging Face when LLAMA_USE_PREBUILT_UI is on: no network
        # beyond PyPI here, and the supervisor needs only the API.
        -DLLAMA_BUILD_UI=OFF
        -DLLAMA_USE_PREBUILT_UI=OFF
        -DLLAMA_OPENSSL=OFF
    )
    if [[ "$flavour" == "cuda" ]]; then
        cmake_flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF)
    fi
    # shellcheck disable=SC2206  # word splitting of the extra flags is intended
    cmake_flags+=($extra_cmake_args)
    echo "building llama-server ($stamp_text) in $build_root with $jobs jobs"
    # No stamp: build in place (an interrupted build resumes where it stopped).
    cmake -S "$src" -B "$build_root/build" "${cmake_flags[@]}" >"$cache/cmake-$flavour.log" 2>&1 \
        || { tail -40 "$cache/cmake-$flavour.log" >&2; exit 1; }
    cmake --build "$build_root/build" --target llama-server -j "$jobs" >>"$cache/cmake-$flavour.log" 2>&1 \
        || { tail -40 "$cache/cmake-$flavour.log" >&2; exit 1; }
    mkdir -p "$build_root/bin"
    cp "$build_root/build/bin/llama-server" "$build_root/bin/llama-server"
    echo "$stamp_text" >"$build_root/stamp"
fi

mkdir -p "$prefix/llama.cpp/bin" "$prefix/models"
if [[ ! -f "$prefix/llama.cpp/stamp" || "$(cat "$prefix/llama.cpp/stamp")" != "$stamp_text" ]]; then
    cp "$build_root/bin/llama-server" "$prefix/llama.cpp/bin/llama-server.tmp"
    mv "$prefix/llama.cpp/bin/llama-server.tmp" "$prefix/llama.cpp/bin/llama-server"
    echo "$stamp_text" >"$prefix/llama.cpp/stamp"
fi

model="$prefix/models/tiny-llama.gguf"
if [[ ! -f "$model" || "$here/tools/make_tiny_gguf.py" -nt "$model" ]]; then
    PYTHONPATH="$src/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$python" "$here/tools/make_tiny_gguf.py" \
        --vocab "$src/models/ggml-vocab-llama-spm.gguf" --out "$model"
fi
echo "llama-server: $prefix/llama.cpp/bin/llama-server"
echo "model: $model"

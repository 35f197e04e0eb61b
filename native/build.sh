#!/usr/bin/env bash
# Build the llama.cpp that llama-cpp-python 0.3.36 vendors, with kvedge's patches (per-layer KV cache types,
# llama-kv-layer-types.patch; then the K transform, llama-k-transform.patch), into a per-user cache that kvedge
# loads for per-layer KV configs and for models carrying the K transform.
#
#   native/build.sh [cpu|cuda|metal] [--dry-run] [--force] [--server]
#
# --server also builds llama-server from the same patched tree into the build's bin/ (the library's flags,
# plus the server's targets; no web UI download, no OpenSSL).
#
# Network: only `pip download` of the llama-cpp-python sdist, checked against its pinned sha256 (or set
# KVEDGE_NATIVE_SDIST to a copy of that file). Environment:
#   CMAKE_ARGS            extra CMake flags, as llama-cpp-python's own pip build reads them (e.g. the
#                         CUDA architectures); they become part of the build's manifest
#   KVEDGE_NATIVE_CACHE   cache root (default ${XDG_CACHE_HOME:-~/.cache}/kvedge/native)
#   KVEDGE_BUILD_JOBS     parallel compile jobs (default: all cores)
#   KVEDGE_PYTHON         the Python whose pip downloads the sdist (default python3)
set -euo pipefail

LCP_VERSION=0.3.36
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_COMMIT=0c1e57098  # ggml-org/llama.cpp revision the sdist vendors (its CHANGELOG says so; checked below)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# applied in this order (kvedge.llama.native.PATCH_NAMES lists the same)
patch_files=("$here/llama-kv-layer-types.patch" "$here/llama-k-transform.patch")
backend=cpu
dry=0
force=0
server=0
for arg in "$@"; do
  case "$arg" in
    cpu|cuda|metal) backend=$arg ;;
    --dry-run) dry=1 ;;
    --force) force=1 ;;
    --server) server=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "native/build.sh: unknown argument '$arg' (use cpu, cuda or metal, --dry-run, --force, --server)" >&2; exit 2 ;;
  esac
done

sha256() { if command -v sha256sum >/dev/null; then sha256sum "$@" | cut -d' ' -f1; else shasum -a 256 "$@" | cut -d' ' -f1; fi; }

py=${KVEDGE_PYTHON:-python3}
# the patches, concatenated in order; the cache is keyed by them and this script (its flags are part of the
# arithmetic); kvedge.llama.native computes the same hashes
patch_sha=$(cat "${patch_files[@]}" | sha256 -)
sources_sha=$(cat "${patch_files[@]}" "$here/build.sh" | sha256 -)
cache_root=${KVEDGE_NATIVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvedge/native}
dest="$cache_root/llama-cpp-python-$LCP_VERSION-${sources_sha:0:12}/$backend"
jobs=${KVEDGE_BUILD_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}

# The pip-built wheel's defaults (Release, GGML_NATIVE on): the same flags give the same arithmetic, so a
# uniform cache computes bit-identical logits with either library. Only libllama and its ggml are built.
cmake_args=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
            -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON)
if [ "$(uname -s)" = Darwin ]; then
  cmake_args+=(-DCMAKE_INSTALL_RPATH=@loader_path)
  lib_glob='lib*.dylib'
else
  cmake_args+=('-DCMAKE_INSTALL_RPATH=$ORIGIN')
  lib_glob='lib*.so*'
fi
case "$backend" in
  cpu) ;;
  # a per-layer map can give a layer K and V types of different kinds: CUDA's flash attention compiles
  # those pairs only with FA_ALL_QUANTS
  cuda) cmake_args+=(-DGGML_CUDA=ON -DGGML_CUDA_FA_ALL_QUANTS=ON) ;;
  # as llama-cpp-python builds it on Apple
  metal) cmake_args+=(-DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON) ;;
esac
# shellcheck disable=SC2206
extra=(${CMAKE_ARGS:-})
cmake_args+=("${extra[@]}")
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# --server: a second configure of the same tree, after the libraries are copied out (their flags above are
# untouched); only targets are added, and the server finds the libraries in ../lib
server_args=(-DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF
             -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF)
if [ "$(uname -s)" = Darwin ]; then
  server_args+=('-DCMAKE_INSTALL_RPATH=@loader_path;@loader_path/../lib')
else
  server_args+=('-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/../lib')
fi

if [ "$dry" = 1 ]; then
  echo "backend: $backend"
  echo "sdist: llama-cpp-python==$LCP_VERSION sha256 $LCP_SHA256"
  for f in "${patch_files[@]}"; do echo "patch: $f sha256 $(sha256 "$f")"; done
  echo "patches: sha256 $patch_sha"
  echo "dest: $dest"
  echo "cmake: ${generator[*]} ${cmake_args[*]}"
  echo "build: cmake --build <build> --target llama -j $jobs"
  if [ "$server" = 1 ]; then
    echo "server cmake: ${generator[*]} ${cmake_args[*]} ${server_args[*]}"
    echo "server build: cmake --build <build> --target llama-server -j $jobs"
  fi
  exit 0
fi

if [ -f "$dest/manifest.json" ] && [ "$force" = 0 ] && { [ "$server" = 0 ] || [ -x "$dest/bin/llama-server" ]; }; then
  echo "kvedge native: already built: $dest (--force rebuilds)"
  exit 0
fi
case "$backend" in
  metal) [ "$(uname -s)" = Darwin ] || { echo "native/build.sh: a Metal build needs macOS" >&2; exit 2; } ;;
  cuda) command -v nvcc >/dev/null || [ -n "${CUDACXX:-}" ] || {
          echo "native/build.sh: a CUDA build needs the CUDA toolkit (nvcc on PATH, or CUDACXX)" >&2; exit 2; } ;;
esac
for tool in cmake tar patch; do
  command -v "$tool" >/dev/null || { echo "native/build.sh: $tool is required" >&2; exit 2; }
done

start=$(date +%s)
mkdir -p "$cache_root/sdist"
work=$(mktemp -d "$cache_root/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT

sdist="$cache_root/sdist/llama_cpp_python-$LCP_VERSION.tar.gz"
if [ -n "${KVEDGE_NATIVE_SDIST:-}" ]; then
  cp "$KVEDGE_NATIVE_SDIST" "$work/sdist.tar.gz" && mv "$work/sdist.tar.gz" "$sdist"
elif [ ! -f "$sdist" ] || [ "$(sha256 "$sdist")" != "$LCP_SHA256" ]; then
  echo "llama-cpp-python==$LCP_VERSION --hash=sha256:$LCP_SHA256" > "$work/req.txt"
  "$py" -m pip download --quiet --no-deps --no-binary :all: --require-hashes -r "$work/req.txt" -d "$work/dl"
  mv "$work/dl/llama_cpp_python-$LCP_VERSION.tar.gz" "$sdist"
fi
if [ "$(sha256 "$sdist")" != "$LCP_SHA256" ]; then
  echo "native/build.sh: $sdist is not the llama-cpp-python $LCP_VERSION sdist (sha256 differs)" >&2
  exit 2
fi

tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
grep -q "ggml-org/llama.cpp@$LLAMA_COMMIT" "$work/llama_cpp_python-$LCP_VERSION/CHANGELOG.md" || {
  echo "native/build.sh: the sdist does not vendor llama.cpp $LLAMA_COMMIT" >&2; exit 2; }
for f in "${patch_files[@]}"; do
  patch -p1 --forward --batch --quiet -d "$src" < "$f"
done

cmake -S "$src" -B "$work/build" "${generator[@]}" "${cmake_args[@]}" > "$work/configure.log" 2>&1 || {
  tail -n 30 "$work/configure.log" >&2; echo "native/build.sh: CMake configure failed" >&2; exit 1; }
cmake --build "$work/build" --target llama -j "$jobs"

mkdir -p "$work/out/lib"
# shellcheck disable=SC2086
cp -P "$work/build/bin/"$lib_glob "$work/out/lib/"
cp "${patch_files[@]}" "$work/out/"

if [ "$server" = 1 ]; then
  cmake -S "$src" -B "$work/build" "${generator[@]}" "${cmake_args[@]}" "${server_args[@]}" > "$work/configure-server.log" 2>&1 || {
    tail -n 30 "$work/configure-server.log" >&2; echo "native/build.sh: CMake configure (server) failed" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j "$jobs"
  mkdir -p "$work/out/bin"
  cp "$work/build/bin/llama-server" "$work/out/bin/"
  # the server's own libraries (llama-common, mtmd); the ones the library build made stay as they were
  for f in "$work/build/bin/"$lib_glob; do
    [ -e "$work/out/lib/$(basename "$f")" ] || cp -P "$f" "$work/out/lib/"
  done
fi
seconds=$(( $(date +%s) - start ))
patch_list=()
for f in "${patch_files[@]}"; do patch_list+=("$(basename "$f")=$(sha256 "$f")"); done
"$py" - "$work/out/manifest.json" "$backend" "$LCP_VERSION" "$LLAMA_COMMIT" "$patch_sha" "$sources_sha" "$LCP_SHA256" \
    "$seconds" "$jobs" "$server" "${patch_list[*]}" "${cmake_args[@]}" <<'PY'
import json, platform, sys, time
out, backend, version, commit, patch_sha, sources_sha, sdist_sha, seconds, jobs, server, patches, *cmake_args = sys.argv[1:]
json.dump({"backend": backend, "llama_cpp_python": version, "llama_cpp_commit": commit, "patch_sha256": patch_sha,
           "patches": [dict(zip(("name", "sha256"), p.split("="))) for p in patches.split()],
           "sources_sha256": sources_sha, "sdist_sha256": sdist_sha, "cmake_args": cmake_args,
           "server": "bin/llama-server" if server == "1" else None,
           "build_seconds": int(seconds), "jobs": int(jobs), "platform": platform.platform(),
           "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, open(out, "w"), indent=2)
PY
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.old"
if [ -d "$dest" ]; then mv "$dest" "$dest.old"; fi
mv "$work/out" "$dest"
rm -rf "$dest.old"
echo "kvedge native: built $backend in ${seconds} s: $dest/lib"
if [ "$server" = 1 ]; then echo "kvedge native: llama-server: $dest/bin/llama-server"; fi

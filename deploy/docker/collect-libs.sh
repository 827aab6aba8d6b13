#!/bin/sh
# Lays out the libtorch the autopipe binaries run on, from an installed PyTorch wheel, as the
# runtime image carries it:
#   OUT/torch/lib/*.so*        libtorch (torch/lib of the wheel, without the Python bindings)
#   OUT/nvidia/<pkg>/lib/*.so*  the CUDA libraries of the nvidia-* wheels (CUDA wheel only)
# The wheel's libraries find each other through RPATH $ORIGIN/../../nvidia/<pkg>/lib, so the two
# folders keep their relative place; the binaries find libtorch through LD_LIBRARY_PATH=OUT/torch/lib.
# Used by deploy/docker/Dockerfile and, with --link (hard links instead of copies), by
# scripts/check-deploy to prove the binaries load with exactly this layout.
# Usage: collect-libs.sh [--link] SITE_PACKAGES OUT
set -eu
mode=copy
if [ "${1:-}" = "--link" ]; then mode=link; shift; fi
site="${1:?usage: collect-libs.sh [--link] SITE_PACKAGES OUT}"
out="${2:?usage: collect-libs.sh [--link] SITE_PACKAGES OUT}"
[ -d "$site/torch/lib" ] || { echo "collect-libs: no torch/lib under $site" >&2; exit 1; }

put() { # put SRC DEST_DIR
  mkdir -p "$2"
  if [ "$mode" = link ]; then
    ln -f "$1" "$2/" 2>/dev/null || cp -p "$1" "$2/"
  else
    cp -p "$1" "$2/"
  fi
}

rm -rf "$out"
for f in "$site"/torch/lib/*.so*; do
  case "$(basename "$f")" in
    libtorch_python.so | libshm.so | libshm_windows*) continue ;; # Python bindings: not used by tch
  esac
  put "$f" "$out/torch/lib"
done
if [ -d "$site/nvidia" ]; then
  for dir in "$site"/nvidia/*/lib; do
    [ -d "$dir" ] || continue
    pkg="$(basename "$(dirname "$dir")")"
    for f in "$dir"/*.so*; do
      [ -f "$f" ] && put "$f" "$out/nvidia/$pkg/lib"
    done
    for lic in "$site/nvidia/$pkg"/LICENSE*; do
      [ -f "$lic" ] && put "$lic" "$out/nvidia/$pkg"
    done
  done
fi
echo "collect-libs: $(find "$out" -name '*.so*' | wc -l) libraries in $out" >&2

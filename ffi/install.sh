#!/usr/bin/env bash
# Install the C library: libkolo.so and libkolo.a into PREFIX/lib, kolo.h into
# PREFIX/include, and PREFIX/lib/pkgconfig/kolo.pc (from ffi/kolo.pc.in), so that
# `cc prog.c $(pkg-config --cflags --libs kolo)` works with
# PKG_CONFIG_PATH=PREFIX/lib/pkgconfig. Build first: cargo build --release -p kolo-ffi.
#
#   ffi/install.sh [PREFIX=/usr/local]       (KOLO_RELEASE_DIR: where the libraries are)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:-/usr/local}
REL=${KOLO_RELEASE_DIR:-target/release}
for f in libkolo.so libkolo.a; do
    [ -f "$REL/$f" ] || { echo "install.sh: $REL/$f missing; run: cargo build --release -p kolo-ffi" >&2; exit 1; }
done
v() { sed -n "s/^#define KOLO_VERSION_$1 \([0-9][0-9]*\)\$/\1/p" ffi/include/kolo.h; }
VERSION="$(v MAJOR).$(v MINOR).$(v PATCH)"
install -d "$PREFIX/lib/pkgconfig" "$PREFIX/include"
install -m 755 "$REL/libkolo.so" "$PREFIX/lib/"
install -m 644 "$REL/libkolo.a" "$PREFIX/lib/"
install -m 644 ffi/include/kolo.h "$PREFIX/include/"
sed -e "s|@PREFIX@|$PREFIX|" -e "s|@VERSION@|$VERSION|" ffi/kolo.pc.in > "$PREFIX/lib/pkgconfig/kolo.pc"
echo "installed kolo $VERSION under $PREFIX"

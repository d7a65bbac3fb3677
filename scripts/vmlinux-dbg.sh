#!/usr/bin/env bash
# Fetches the Debian debug vmlinux of the test guest's kernel and leaves, idempotently, in the
# output directory (default .cache/vmlinux-dbg):
#   vmlinux-VERSION        the debug vmlinux without its .BTF section (DWARF types only)
#   vmlinux-VERSION.btf    that .BTF section on its own, the reference the DWARF types must match
# crates/linux/tests/dwarf_vmlinux.rs reads both. Keeping the .BTF apart instead of a second
# vmlinux saves 600 MB. Needs root for apt-get and the guest kernel version from `make guest`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
guest=${KVMACCESS_GUEST_DIR:-"$here/../.cache/guest"}
out=${1:-"$here/../.cache/vmlinux-dbg"}

if [ ! -s "$guest/kernel-version" ]; then
    echo "no $guest/kernel-version: run \`make guest\` first" >&2
    exit 1
fi
ver=$(cat "$guest/kernel-version")
mkdir -p "$out"
out=$(cd "$out" && pwd)
dwarf="$out/vmlinux-$ver"
btf="$out/vmlinux-$ver.btf"

if [ -s "$dwarf" ] && [ -s "$btf" ]; then
    echo "$dwarf"
    exit 0
fi

command -v objcopy >/dev/null || {
    echo "installing binutils"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils
}

pkg="linux-image-$ver-dbg"
tmp=$(mktemp -d "$out/dl.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "downloading $pkg (about 300 MB)" >&2
(cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || {
    apt-get update -qq && (cd "$tmp" && apt-get download "$pkg")
}
# Only the one file: the package also holds debug info for every module (gigabytes unpacked).
dpkg-deb --fsys-tarfile "$tmp"/"$pkg"_*.deb | tar -x -C "$tmp" "./usr/lib/debug/boot/vmlinux-$ver"
full="$tmp/usr/lib/debug/boot/vmlinux-$ver"
if ! readelf -S --wide "$full" | grep -q ' \.BTF '; then
    echo "$full has no .BTF section; the test needs one as its reference" >&2
    exit 1
fi
# The __start/__stop_BTF symbols go with the section, as in a kernel built without BTF; objcopy
# keeps a symbol while a relocation names it, so the relocation sections (kept by the kernel's
# --emit-relocs for its own build tools, and not read by kvmaccess) are dropped in a first pass.
# That also halves the file.
objcopy --dump-section .BTF="$tmp/btf" --remove-relocations='*' "$full" "$tmp/norel"
rm -f "$full"
objcopy --remove-section=.BTF --strip-symbol=__start_BTF --strip-symbol=__stop_BTF \
    "$tmp/norel" "$tmp/dwarf"
mv "$tmp/btf" "$btf"
mv "$tmp/dwarf" "$dwarf"
# Files of an earlier guest kernel version are of no further use.
find "$out" -mindepth 1 -maxdepth 1 -name 'vmlinux-*' ! -name "vmlinux-$ver" ! -name "vmlinux-$ver.btf" -delete
echo "$dwarf"

#!/usr/bin/env bash
# Builds the built-in test guest into a cache directory: the Debian cloud kernel (resolved from
# the metapackage so security updates are followed) and a busybox initramfs. Idempotent: a second
# run with everything in place does nothing. Needs root for apt-get.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-"$here/../.cache/guest"}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
[ -x /bin/busybox ] || need_pkgs+=(busybox-static)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# The kernel version is pinned per cache: once downloaded we keep using it, so tests and
# baselines stay comparable; `make clean-guest` picks up a newer security update.
if [ ! -s "$cache/kernel-version" ]; then
    [ -n "$(apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep Candidate)" ] || apt-get update -qq
    ver=$(apt-cache depends linux-image-cloud-amd64 | grep -o 'linux-image-[0-9][^ ]*-cloud-amd64' | head -n1 | sed 's/^linux-image-//')
    [ -n "$ver" ] || { echo "cannot resolve the Debian cloud kernel version" >&2; exit 1; }
    echo "$ver" > "$cache/kernel-version"
fi
ver=$(cat "$cache/kernel-version")

if [ ! -s "$cache/vmlinuz" ]; then
    tmp=$(mktemp -d "$cache/dl.XXXXXX")
    (cd "$tmp" && apt-get download "linux-image-$ver" >/dev/null 2>&1) || {
        apt-get update -qq && (cd "$tmp" && apt-get download "linux-image-$ver")
    }
    dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/root"
    rm -rf "$cache/modules"
    mv "$tmp/root/lib/modules/$ver" "$cache/modules"
    cp "$tmp/root/boot/config-$ver" "$cache/config"
    mv "$tmp/root/boot/vmlinuz-$ver" "$cache/vmlinuz.part"
    rm -rf "$tmp"
    mv "$cache/vmlinuz.part" "$cache/vmlinuz"
fi

# Modules the test guest loads at boot, in dependency order.
guest_modules=(
    kernel/drivers/firmware/qemu_fw_cfg.ko
)

initrd="$cache/initramfs.cpio.gz"
stamp_inputs=("$here/init" "$here/build-guest.sh" "$cache/vmlinuz")
[ -d "$here/extra" ] && while IFS= read -r -d '' f; do stamp_inputs+=("$f"); done < <(find "$here/extra" -type f -print0)
rebuild=0
[ -s "$initrd" ] || rebuild=1
for f in "${stamp_inputs[@]}"; do
    [ "$f" -nt "$initrd" ] && rebuild=1
done
if [ "$rebuild" = 1 ]; then
    root=$(mktemp -d "$cache/initrd.XXXXXX")
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,root,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    install -m 0755 "$here/init" "$root/init"
    : > "$root/lib/modules/load-order"
    for m in "${guest_modules[@]}"; do
        src="$cache/modules/$m"
        [ -f "$src" ] || continue
        cp "$src" "$root/lib/modules/"
        basename "$m" >> "$root/lib/modules/load-order"
    done
    if [ -d "$here/extra" ]; then cp -a "$here/extra/." "$root/"; fi
    echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
    (cd "$root" && find . | sort | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -9) > "$initrd.part"
    mv "$initrd.part" "$initrd"
    rm -rf "$root"
fi
echo "guest ready: kernel $ver in $cache"

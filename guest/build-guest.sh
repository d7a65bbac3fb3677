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

# The test-only attack module (guest/attack, used by the detection tests) is built against the
# guest kernel's own Debian headers, unpacked into the cache (never installed into /usr/src),
# out of tree in $cache/attack-build, and rebuilt when its sources change.
attack_src="$here/attack"
attack_ko="$cache/kvma_attack.ko"
if [ -f "$attack_src/kvma_attack.c" ]; then
    hdr_root="$cache/headers"
    kdir="$hdr_root/usr/src/linux-headers-$ver"
    if [ ! -f "$hdr_root/.complete-$ver" ]; then
        deps=$(apt-cache depends "linux-headers-$ver" 2>/dev/null || true)
        if [ -z "$deps" ]; then
            apt-get update -qq
            deps=$(apt-cache depends "linux-headers-$ver")
        fi
        common=$(grep -o 'linux-headers-[0-9][^ ]*-common' <<<"$deps" | head -n1)
        kbuild=$(grep -o 'linux-kbuild-[0-9][^ ]*' <<<"$deps" | head -n1)
        [ -n "$common" ] && [ -n "$kbuild" ] || {
            echo "cannot resolve the -common and kbuild packages of linux-headers-$ver" >&2
            exit 1
        }
        echo "downloading linux-headers-$ver, $common, $kbuild"
        tmp=$(mktemp -d "$cache/hdr.XXXXXX")
        (cd "$tmp" && apt-get download "linux-headers-$ver" "$common" "$kbuild" >/dev/null 2>&1) || {
            apt-get update -qq
            (cd "$tmp" && apt-get download "linux-headers-$ver" "$common" "$kbuild") || {
                echo "cannot download the headers of kernel $ver (gone from the archive? run \`make clean-guest\`)" >&2
                rm -rf "$tmp"
                exit 1
            }
        }
        for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
        # The flavour's Makefile includes the common tree by its absolute /usr/src path.
        sed -i "s|^include /usr/src/|include $hdr_root/usr/src/|" "$tmp/root/usr/src/linux-headers-$ver/Makefile"
        grep -q "^include $hdr_root/usr/src/linux-headers-.*-common/Makefile" "$tmp/root/usr/src/linux-headers-$ver/Makefile" || {
            echo "unexpected header Makefile in linux-headers-$ver" >&2
            exit 1
        }
        rm -rf "$hdr_root"
        mv "$tmp/root" "$hdr_root"
        rm -rf "$tmp"
        touch "$hdr_root/.complete-$ver"
    fi

    # The kernel was built with gcc-12 (CONFIG_CC_VERSION_TEXT); kbuild's objtool needs libelf.
    build_pkgs=()
    for p in gcc-12 make libelf1; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || build_pkgs+=("$p")
    done
    if [ ${#build_pkgs[@]} -gt 0 ]; then
        echo "installing ${build_pkgs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${build_pkgs[@]}"
    fi
    cc_text=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(.*\)"$/\1/p' "$kdir/.config")
    case "$cc_text" in
        gcc-12\ *) ;;
        *) echo "warning: the guest kernel was built with '$cc_text', building with gcc-12" >&2 ;;
    esac

    attack_files=(kvma_attack.c Kbuild)
    attack_sum=$( (echo "$ver"; cd "$attack_src" && sha256sum "${attack_files[@]}") | sha256sum | cut -d' ' -f1)
    build="$cache/attack-build"
    if [ ! -s "$attack_ko" ] || [ "$(cat "$build/.source-sum" 2>/dev/null)" != "$attack_sum" ]; then
        echo "building kvma_attack.ko (test-only) against linux-headers-$ver"
        rm -rf "$build"
        mkdir -p "$build"
        (cd "$attack_src" && cp "${attack_files[@]}" "$build/")
        # (kbuild notes that it skips the module's BTF: there is no vmlinux in the headers.)
        make -s -C "$kdir" M="$build" CC=gcc-12 modules 2>&1 | { grep -v '^Skipping BTF generation' || true; }
        objcopy --strip-debug "$build/kvma_attack.ko" "$attack_ko.part"
        mv "$attack_ko.part" "$attack_ko"
        echo "$attack_sum" > "$build/.source-sum"
    fi
fi

# Modules the test guest loads at boot, in dependency order. pvpanic-mmio drives QEMU's ISA
# pvpanic device (ACPI QEMU0001), so a panic reaches QEMU as GUEST_PANICKED before the kernel
# reboots or hangs.
guest_modules=(
    kernel/drivers/firmware/qemu_fw_cfg.ko
    kernel/drivers/misc/pvpanic/pvpanic.ko
    kernel/drivers/misc/pvpanic/pvpanic-mmio.ko
)

initrd="$cache/initramfs.cpio.gz"
stamp_inputs=("$here/init" "$here/build-guest.sh" "$cache/vmlinuz")
[ -s "$attack_ko" ] && stamp_inputs+=("$attack_ko")
[ -f "$here/attack/selftest.sh" ] && stamp_inputs+=("$here/attack/selftest.sh")
[ -d "$here/extra" ] && while IFS= read -r -d '' f; do stamp_inputs+=("$f"); done < <(find "$here/extra" -type f -print0)
# By content, not modification time: a cache restored from elsewhere (CI) can hold an image
# newer than a script whose module list or init changed since.
initrd_sum=$(
    {
        printf '%s\n' "$ver" "${guest_modules[@]}"
        for f in "${stamp_inputs[@]}"; do
            # The path relative to the checkout or the cache, so a moved tree is not a change.
            rel=${f#"$here"/}
            echo "${rel#"$cache"/} $(sha256sum < "$f" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -d' ' -f1
)
if [ ! -s "$initrd" ] || [ "$(cat "$cache/initramfs.sum" 2>/dev/null)" != "$initrd_sum" ]; then
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
        if [ ! -f "$src" ]; then
            grep -qx "$m" "$cache/modules/modules.builtin" 2>/dev/null && continue
            echo "module $m is neither in kernel $ver's modules nor built in" >&2
            exit 1
        fi
        cp "$src" "$root/lib/modules/"
        basename "$m" >> "$root/lib/modules/load-order"
    done
    if [ -d "$here/extra" ]; then cp -a "$here/extra/." "$root/"; fi
    # Not in load-order: tests insmod it with the attack they want.
    [ -s "$attack_ko" ] && cp "$attack_ko" "$root/lib/modules/kvma_attack.ko"
    [ -f "$here/attack/selftest.sh" ] && install -m 0755 "$here/attack/selftest.sh" "$root/usr/bin/kvma-selftest"
    echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
    (cd "$root" && find . | sort | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -9) > "$initrd.part"
    mv "$initrd.part" "$initrd"
    echo "$initrd_sum" > "$cache/initramfs.sum"
    rm -rf "$root"
fi
echo "guest ready: kernel $ver in $cache"

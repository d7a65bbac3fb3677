# The two commands of the contract: `make demo` and `make test`. Every prerequisite (Debian
# packages, cargo tools, the guest kernel and initramfs) is installed here, idempotently, into
# the system or the ignored .cache directory.

SHELL := /bin/bash
CACHE := $(CURDIR)/.cache
GUEST_DIR := $(CACHE)/guest
export KVMACCESS_GUEST_DIR := $(GUEST_DIR)
# The guest kernel's Debian debug vmlinux, DWARF only, and its .BTF (scripts/vmlinux-dbg.sh).
VMLINUX_DBG_DIR := $(CACHE)/vmlinux-dbg
export KVMACCESS_VMLINUX_DBG_DIR := $(VMLINUX_DBG_DIR)
CARGO ?= cargo
CARGO_BIN := $(HOME)/.cargo/bin
export PATH := $(CARGO_BIN):$(PATH)
# This machine's /dev/kvm may be a software implementation; the product's `auto` detects that.
ACCEL ?= auto
FUZZ_SECONDS ?= 15

.PHONY: all build release test unit lint deny guest deps host-packages cargo-tools demo bench \
        fuzz-smoke clean clean-guest volatility vmlinux-dbg

all: build

host-packages:
	@missing=(); \
	command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86); \
	[ -x /bin/busybox ] || missing+=(busybox-static); \
	command -v readelf >/dev/null || missing+=(binutils); \
	command -v cc >/dev/null || missing+=(gcc); \
	command -v python3 >/dev/null || missing+=(python3); \
	command -v gdb >/dev/null || missing+=(gdb); \
	if [ $${#missing[@]} -gt 0 ]; then \
		echo "installing $${missing[*]}"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$${missing[@]}"; \
	fi

cargo-tools:
	@command -v cargo-deny >/dev/null || $(CARGO) install --locked cargo-deny
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

deps: host-packages cargo-tools

guest: host-packages
	@guest/build-guest.sh $(GUEST_DIR)

# The DWARF-to-BTF converter is checked against the real kernel: its debug vmlinux (a 300 MB
# download, once) without .BTF, and that .BTF as the reference.
vmlinux-dbg: guest
	@scripts/vmlinux-dbg.sh $(VMLINUX_DBG_DIR)

# Volatility 3 from PyPI in a private venv: the real-guest tests use it as an oracle for the
# exported ISF.
volatility:
	@scripts/volatility.sh $(CACHE)/volatility

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p kvmaccess

# The fuzz crate lives outside the workspace (cargo-fuzz's layout): linted on its own.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml --check
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings

deny: cargo-tools
	$(CARGO) deny check licenses bans sources

unit:
	$(CARGO) test --workspace --lib --bins --no-fail-fast

# Unit tests first, then the integration tests (most boot a real guest under QEMU; they fail,
# never skip, when the guest is missing, so `guest` runs first), the doc examples, and the
# fuzz targets briefly.
test: deps guest vmlinux-dbg volatility lint deny
	@$(MAKE) --no-print-directory unit
	$(CARGO) test --workspace --test '*' --no-fail-fast
	$(CARGO) test --workspace --doc
	@$(MAKE) --no-print-directory fuzz-smoke FUZZ_SECONDS=$(FUZZ_SECONDS)

demo: host-packages guest release
	@scripts/demo.sh $(ACCEL)

bench: host-packages guest release
	@scripts/bench.sh $(ACCEL)

# Every fuzz target briefly, with debug assertions on so arithmetic overflow counts as a crash,
# and any input that takes over 10 s (a loop the guest could trigger) as one too.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the one stable toolchain accept them.
fuzz-smoke: host-packages cargo-tools
	@cd fuzz && for t in $$(RUSTC_BOOTSTRAP=1 cargo fuzz list); do \
		echo "fuzzing $$t for $(FUZZ_SECONDS)s"; \
		RUSTC_BOOTSTRAP=1 cargo fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 || exit 1; \
	done

clean:
	$(CARGO) clean

clean-guest:
	rm -rf $(GUEST_DIR) $(VMLINUX_DBG_DIR)

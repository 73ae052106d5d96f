#!/usr/bin/env bash
# Prepares a Debian 12 CI container (run as root) for the Rust work of the workflows under .github/workflows/:
# the build tools the workspace compiles with, a pinned Rust toolchain installed through a checksum-verified,
# pinned rustup-init, and a Python virtual environment first on PATH, where `cargo xtask` pip-installs its pinned
# `ziglang` and `cargo-zigbuild` (Debian's own Python is "externally managed" and refuses pip installs).
#
# Extra Debian packages a workflow needs (minisign, jq) are passed as arguments.
# Also marks the checkout as a safe git directory for root. Exports CARGO_HOME, RUSTUP_HOME and PATH to the later steps through $GITHUB_ENV and $GITHUB_PATH.
set -euo pipefail

# Pinned versions. The toolchain is the one the project is developed and tested with; the rustup-init digest is
# the one static.rust-lang.org publishes for this rustup version (rustup-init.sha256 beside the binary).
RUST_TOOLCHAIN="1.95.0"
RUSTUP_VERSION="1.29.0"
RUSTUP_INIT_SHA256="4acc9acc76d5079515b46346a485974457b5a79893cfb01112423c89aeb5aa10"
RUSTUP_TRIPLE="x86_64-unknown-linux-gnu"

: "${GITHUB_ENV:?run this inside a GitHub Actions job}"
: "${GITHUB_PATH:?run this inside a GitHub Actions job}"
if [ "$(id -u)" -ne 0 ]; then
    echo "::error::setup-debian-rust.sh runs as root in the Debian container (apt-get)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends \
    build-essential ca-certificates curl git pkg-config python3 python3-venv xz-utils "$@"

export CARGO_HOME="${CARGO_HOME:-/usr/local/cargo}"
export RUSTUP_HOME="${RUSTUP_HOME:-/usr/local/rustup}"
# rustup-init picks its mode from its own file name: it must be called rustup-init.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
init="$tmp/rustup-init"
curl --proto '=https' --tlsv1.2 --fail --silent --show-error --location --retry 3 \
    --output "$init" "https://static.rust-lang.org/rustup/archive/${RUSTUP_VERSION}/${RUSTUP_TRIPLE}/rustup-init"
echo "${RUSTUP_INIT_SHA256}  ${init}" | sha256sum --check --strict -
chmod 0755 "$init"
"$init" -y --no-modify-path --profile minimal \
    --default-toolchain "$RUST_TOOLCHAIN" --component rustfmt,clippy
"$CARGO_HOME/bin/rustc" --version
"$CARGO_HOME/bin/cargo" --version

venv="${NKUDO_CI_VENV:-/opt/nkudo-ci-venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip --version

# The checkout belongs to the runner's user, the container runs as root: let git (and `releaser`, which asks git
# for the commit and its time) work in it.
git config --global --add safe.directory "${GITHUB_WORKSPACE:?}"

{
    echo "CARGO_HOME=$CARGO_HOME"
    echo "RUSTUP_HOME=$RUSTUP_HOME"
} >>"$GITHUB_ENV"
# $GITHUB_PATH entries are put before the system PATH: the venv's python3 shadows Debian's.
{
    echo "$CARGO_HOME/bin"
    echo "$venv/bin"
} >>"$GITHUB_PATH"

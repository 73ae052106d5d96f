#!/bin/sh
# install-edge.sh: the one-line installer of the n-kudo edge agent (nkudo-edge) on a Linux host.
#
#   curl -fsSL https://raw.githubusercontent.com/n-kudo/n-kudo/main/scripts/install-edge.sh \
#     | sudo sh -s -- --version 1.2.3 --control-plane https://cp.example.com:8443 --token-file /root/nkudo-token
#
# It downloads a release (manifest.json, its minisign signature, the nkudo-edge tarball for this architecture),
# verifies the manifest signature with the PINNED release public key (below) and the tarball's size and SHA-256
# against the signed manifest BEFORE unpacking anything, installs it into the host layout the agent's self-update
# and `releaser install` use (/opt/nkudo/releases/<version>/ with the verified manifest.json and a completion
# marker, `current` switched atomically), writes /etc/nkudo/edge.toml (only when there is none) and the systemd
# unit, enrolls the host with a one-time token read from a file or the environment (never from the command line),
# and enables and starts nkudo-edge.service. A re-run with the same arguments changes nothing that is in place.
# `--help` lists the options; the exit codes are listed below and in `--help`.

set -eu

# The n-kudo release public key this installer trusts: the base64 line `RW...` of the release's nkudo-release.pub
# (`minisign -P` form). No production release key has been published with this script yet, so it is empty and
# every run must name a key with --pubkey or NKUDO_RELEASE_PUBKEY (private fleets, tests). Pin the real key here.
NKUDO_PINNED_RELEASE_PUBKEY=""

# Where releases are downloaded from: `{version}` is replaced by the version (no leading v).
DEFAULT_BASE_URL="https://github.com/n-kudo/n-kudo/releases/download/v{version}"

# Exit codes.
EX_OK=0
EX_USAGE=2      # bad or missing options, no trusted key, not root
EX_TOOL=3       # a required tool is missing (curl/wget, tar, sha256sum, minisign/openssl, ...)
EX_DOWNLOAD=4   # a download failed
EX_VERIFY=5     # the release did not verify (signature, expiry, version, size, SHA-256): nothing was installed
EX_INSTALL=6    # unpacking, the layout switch or writing the config/unit failed
EX_ENROLL=7     # `nkudo-edge enroll` failed (token refused or expired, control plane unreachable)
EX_SERVICE=8    # systemd could not enable or start nkudo-edge.service

PROG="install-edge"
UNIT_NAME="nkudo-edge.service"
MANIFEST_MAX_BYTES=1048576
SIG_MAX_BYTES=4096

usage() {
	cat <<'EOF'
Usage: install-edge.sh --version VERSION [options]

Downloads, verifies and installs the n-kudo edge agent, enrolls this host and starts nkudo-edge.service.

Options (environment variable in brackets):
  --version VERSION       release to install, e.g. 1.2.3 (a leading v is accepted) [NKUDO_VERSION].
                          Required: releases publish no "latest" index.
  --control-plane URL     control plane, https://host:port [NKUDO_CONTROL_PLANE]; required unless
                          /etc/nkudo/edge.toml already names one
  --token-file FILE       file holding the one-time enrollment token; else the token is read from
                          NKUDO_ENROLL_TOKEN (or NKUDO_ENROLLMENT_TOKEN). Only needed when not enrolled yet
  --ca-file FILE          PEM bundle that signs the control plane's server certificate; installed as
                          /etc/nkudo/ca-bundle.pem and named in edge.toml (default: the system roots)
  --hostname NAME         hostname to enroll as (default: the OS hostname)
  --base-url URL          where the release files are [NKUDO_RELEASE_BASE_URL]; {version} is replaced
                          by the version. Default:
                          https://github.com/n-kudo/n-kudo/releases/download/v{version}
  --pubkey KEY            trusted release public key, the `RW...` line of nkudo-release.pub
                          [NKUDO_RELEASE_PUBKEY]; overrides the key pinned in this script
  --verify-with TOOL      auto (minisign when installed, else openssl), minisign or openssl
                          [NKUDO_VERIFY_WITH]
  --root DIR              install under DIR instead of / (tests, sandboxes): every path, including the
                          ones written into edge.toml and the unit, lies under DIR; implies --no-start
  --no-start              do not call systemctl (no daemon-reload, enable or start)
  --allow-downgrade       install even when the current version is newer
  -h, --help              this help

Files: /opt/nkudo/releases/<version>/ (the release, with manifest.json), /opt/nkudo/current (link),
/etc/nkudo/edge.toml (written only when missing), /etc/systemd/system/nkudo-edge.service,
/var/lib/nkudo-edge/ (identity and state). The annotated sample configuration with every key is
/opt/nkudo/current/config/edge.toml.

Exit codes: 0 installed (or already in place); 2 usage; 3 missing tool; 4 download failed;
5 verification failed, nothing installed; 6 installation failed; 7 enrollment failed;
8 the service could not be started.
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	code=$1
	shift
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit "$code"
}

# ---------------------------------------------------------------------------------------------------------------
# Options

VERSION=${NKUDO_VERSION:-}
CONTROL_PLANE=${NKUDO_CONTROL_PLANE:-}
BASE_URL=${NKUDO_RELEASE_BASE_URL:-$DEFAULT_BASE_URL}
PUBKEY=${NKUDO_RELEASE_PUBKEY:-$NKUDO_PINNED_RELEASE_PUBKEY}
VERIFY_WITH=${NKUDO_VERIFY_WITH:-auto}
TOKEN_FILE=""
CA_FILE=""
HOSTNAME_OPT=""
ROOT="/"
NO_START=0
ALLOW_DOWNGRADE=0

# The token stays in a shell variable: removed from the environment so that no other child process inherits it.
TOKEN=${NKUDO_ENROLL_TOKEN:-${NKUDO_ENROLLMENT_TOKEN:-}}
unset NKUDO_ENROLL_TOKEN NKUDO_ENROLLMENT_TOKEN

need_arg() {
	[ "$2" -ge 2 ] || die "$EX_USAGE" "$1 needs a value (see --help)"
}

while [ $# -gt 0 ]; do
	case $1 in
	--version) need_arg "$1" $# && VERSION=$2 && shift 2 ;;
	--version=*) VERSION=${1#*=} && shift ;;
	--control-plane) need_arg "$1" $# && CONTROL_PLANE=$2 && shift 2 ;;
	--control-plane=*) CONTROL_PLANE=${1#*=} && shift ;;
	--token-file) need_arg "$1" $# && TOKEN_FILE=$2 && shift 2 ;;
	--token-file=*) TOKEN_FILE=${1#*=} && shift ;;
	--ca-file) need_arg "$1" $# && CA_FILE=$2 && shift 2 ;;
	--ca-file=*) CA_FILE=${1#*=} && shift ;;
	--hostname) need_arg "$1" $# && HOSTNAME_OPT=$2 && shift 2 ;;
	--hostname=*) HOSTNAME_OPT=${1#*=} && shift ;;
	--base-url) need_arg "$1" $# && BASE_URL=$2 && shift 2 ;;
	--base-url=*) BASE_URL=${1#*=} && shift ;;
	--pubkey) need_arg "$1" $# && PUBKEY=$2 && shift 2 ;;
	--pubkey=*) PUBKEY=${1#*=} && shift ;;
	--verify-with) need_arg "$1" $# && VERIFY_WITH=$2 && shift 2 ;;
	--verify-with=*) VERIFY_WITH=${1#*=} && shift ;;
	--root) need_arg "$1" $# && ROOT=$2 && shift 2 ;;
	--root=*) ROOT=${1#*=} && shift ;;
	--no-start) NO_START=1 && shift ;;
	--allow-downgrade) ALLOW_DOWNGRADE=1 && shift ;;
	--token | --token=*)
		die "$EX_USAGE" "the token is never taken on the command line (it would show in ps and shell history): use --token-file FILE or NKUDO_ENROLL_TOKEN"
		;;
	-h | --help)
		usage
		exit "$EX_OK"
		;;
	*) die "$EX_USAGE" "unknown option $1 (see --help)" ;;
	esac
done

# ---------------------------------------------------------------------------------------------------------------
# Validation (before anything is downloaded or written)

VERSION=${VERSION#v}
case $VERSION in
"") die "$EX_USAGE" "--version is required (e.g. --version 1.2.3): releases publish no \"latest\" index, so pick a version from https://github.com/n-kudo/n-kudo/releases" ;;
latest) die "$EX_USAGE" "--version latest is not supported: releases publish no \"latest\" index; name a version (https://github.com/n-kudo/n-kudo/releases)" ;;
*[!0-9A-Za-z.+-]* | [!0-9]*) die "$EX_USAGE" "--version $VERSION is not a SemVer version such as 1.2.3 or 1.3.0-pre.2" ;;
*.*.*) ;;
*) die "$EX_USAGE" "--version $VERSION is not a SemVer version such as 1.2.3 or 1.3.0-pre.2" ;;
esac

case $PUBKEY in
"") die "$EX_USAGE" "no release public key: this copy of install-edge.sh pins none (NKUDO_PINNED_RELEASE_PUBKEY is empty). Pass the key you trust with --pubkey RW... or NKUDO_RELEASE_PUBKEY (the second line of the release's nkudo-release.pub, obtained from a source you trust)" ;;
RW*) ;;
*) die "$EX_USAGE" "--pubkey must be a minisign public key line starting with RW (the second line of nkudo-release.pub)" ;;
esac
case $PUBKEY in
*[!A-Za-z0-9+/=]*) die "$EX_USAGE" "--pubkey is not base64" ;;
esac
[ ${#PUBKEY} -eq 56 ] || die "$EX_USAGE" "--pubkey has ${#PUBKEY} characters; a minisign public key line has 56"

case $VERIFY_WITH in
auto | minisign | openssl) ;;
*) die "$EX_USAGE" "--verify-with must be auto, minisign or openssl (got $VERIFY_WITH)" ;;
esac

case $BASE_URL in
https://*) ;;
http://*) say "warning: $BASE_URL is plain HTTP; the signature still protects what is installed, but prefer HTTPS" ;;
file://*) ;;
*) die "$EX_USAGE" "--base-url must be an http(s):// or file:// URL (got $BASE_URL)" ;;
esac

case $CONTROL_PLANE in
"") ;;
https://*) ;;
*) die "$EX_USAGE" "--control-plane must be an https:// URL (got $CONTROL_PLANE)" ;;
esac
case $CONTROL_PLANE$HOSTNAME_OPT in
*[\"\\\'[:cntrl:][:space:]]*) die "$EX_USAGE" "--control-plane and --hostname must not contain quotes, backslashes, spaces or control characters" ;;
esac

case $ROOT in
/*) ;;
*) ROOT=$(pwd)/$ROOT ;;
esac
ROOT=${ROOT%/}
case $ROOT in
*[\"\\\'\|\&[:cntrl:][:space:]]*) die "$EX_USAGE" "--root must not contain quotes, backslashes, |, &, spaces or control characters" ;;
esac
# P prefixes every path: empty for the real root.
P=$ROOT
if [ -n "$P" ]; then
	NO_START=1
fi

if [ -n "$CA_FILE" ] && [ ! -r "$CA_FILE" ]; then
	die "$EX_USAGE" "--ca-file $CA_FILE is not a readable file"
fi
if [ -n "$TOKEN_FILE" ]; then
	[ -r "$TOKEN_FILE" ] || die "$EX_USAGE" "--token-file $TOKEN_FILE is not a readable file"
	[ -s "$TOKEN_FILE" ] || die "$EX_USAGE" "--token-file $TOKEN_FILE is empty"
fi

if [ -z "$P" ] && [ "$(id -u)" != 0 ]; then
	die "$EX_USAGE" "run as root (for example: curl -fsSL .../install-edge.sh | sudo sh -s -- ...), or install under a directory you own with --root DIR"
fi

LAYOUT=$P/opt/nkudo
CONF_DIR=$P/etc/nkudo
CONF=$CONF_DIR/edge.toml
CA_DEST=$CONF_DIR/ca-bundle.pem
UNIT_DIR=$P/etc/systemd/system
VAR=$P/var/lib/nkudo-edge

# The state directory the agent will use: the config file's `state_dir`, else the agent's default (under the root).
toml_string() { # FILE KEY: the value of a top-level `KEY = "value"` line
	[ -f "$1" ] || return 0
	sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*\"\\([^\"]*\\)\".*/\\1/p" "$1" | head -n 1
}
STATE_DIR=$(toml_string "$CONF" state_dir)
[ -n "$STATE_DIR" ] || STATE_DIR=$VAR/state
STATE_FILE=$STATE_DIR/edge-state.json

enrolled() {
	[ -f "$STATE_FILE" ] && grep -q '"agent_id"' "$STATE_FILE" 2>/dev/null
}

if [ -z "$CONTROL_PLANE" ] && [ -z "$(toml_string "$CONF" control_plane)" ]; then
	die "$EX_USAGE" "--control-plane URL is required ($CONF does not name one)"
fi
if ! enrolled && [ -z "$TOKEN_FILE" ] && [ -z "$TOKEN" ]; then
	die "$EX_USAGE" "this host is not enrolled yet: give the one-time enrollment token with --token-file FILE or NKUDO_ENROLL_TOKEN (issue one with POST /tenants/<tenant>/enrollment-tokens)"
fi

# ---------------------------------------------------------------------------------------------------------------
# Tools

have() { command -v "$1" >/dev/null 2>&1; }

for tool in tar gzip sed awk grep od dd stat mktemp mv ln find sort; do
	have "$tool" || die "$EX_TOOL" "$tool is required but not installed"
done
if have curl; then
	FETCH=curl
elif have wget; then
	FETCH=wget
else
	die "$EX_TOOL" "curl or wget is required to download the release"
fi
if have sha256sum; then
	SHA256=sha256sum
elif have openssl; then
	SHA256=openssl
else
	die "$EX_TOOL" "sha256sum (coreutils) or openssl is required to check the release"
fi
case $VERIFY_WITH in
auto)
	if have minisign; then
		VERIFY_WITH=minisign
	elif have openssl; then
		VERIFY_WITH=openssl
	else
		die "$EX_TOOL" "minisign or openssl (3.0 or later) is required to verify the release signature"
	fi
	;;
minisign) have minisign || die "$EX_TOOL" "--verify-with minisign: minisign is not installed" ;;
openssl) have openssl || die "$EX_TOOL" "--verify-with openssl: openssl is not installed" ;;
esac

case $(uname -m) in
x86_64 | amd64) ARCH=amd64 ;;
aarch64 | arm64) ARCH=arm64 ;;
*) die "$EX_USAGE" "unsupported architecture $(uname -m): n-kudo releases are built for x86_64 (amd64) and aarch64 (arm64)" ;;
esac

umask 022
export LC_ALL=C

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nkudo-install.XXXXXX") || die "$EX_INSTALL" "cannot create a temporary directory"
STAGE=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
	rc=$?
	if [ -n "$STAGE" ] && [ -e "$STAGE" ]; then
		rm -rf "$STAGE"
	fi
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------------------------------------------------------
# Helpers

release_url() { # FILE
	base=$BASE_URL
	url=""
	while :; do
		case $base in
		*"{version}"*)
			url=$url${base%%"{version}"*}$VERSION
			base=${base#*"{version}"}
			;;
		*)
			url=$url$base
			break
			;;
		esac
	done
	printf '%s/%s' "${url%/}" "$1"
}

fetch() { # URL DEST MAX_BYTES
	say "downloading $1"
	case $1 in
	file://*)
		cp "${1#file://}" "$2" 2>/dev/null || die "$EX_DOWNLOAD" "cannot read $1"
		;;
	*)
		if [ "$FETCH" = curl ]; then
			curl -fsSL --retry 3 --connect-timeout 20 --max-filesize "$3" -o "$2" "$1" ||
				die "$EX_DOWNLOAD" "downloading $1 failed (curl exit $?): check --base-url and --version"
		else
			wget -q -T 20 -O "$2" "$1" ||
				die "$EX_DOWNLOAD" "downloading $1 failed (wget exit $?): check --base-url and --version"
		fi
		;;
	esac
	[ "$(file_size "$2")" -le "$3" ] || die "$EX_VERIFY" "$1 is larger than $3 bytes; nothing installed"
}

file_size() { stat -c %s "$1"; }

sha256_of() {
	if [ "$SHA256" = sha256sum ]; then
		sha256sum "$1" | awk '{print $1}'
	else
		openssl dgst -sha256 -r "$1" | awk '{print $1}'
	fi
}

# A minisign key id as minisign prints it: the 8 bytes as a little-endian number in upper-case hex.
key_id_of() { od -An -v -tx1 "$1" | awk '{ for (i = 1; i <= NF; i++) b[n++] = $i } END { for (i = n - 1; i >= 0; i--) printf "%s", toupper(b[i]) }'; }

b64decode() { # TEXT DEST
	if have base64; then
		printf '%s' "$1" | base64 -d >"$2" 2>/dev/null
	else
		printf '%s\n' "$1" | openssl base64 -d -A >"$2" 2>/dev/null
	fi
}

# Line N of a signature file, without a trailing CR.
sig_line() { sed -n "${2}p" "$1" | tr -d '\r'; }

# The trusted comment of a signature file (line 3 after `trusted comment: `), checked for its prefix.
trusted_comment() {
	l1=$(sig_line "$1" 1)
	l3=$(sig_line "$1" 3)
	case $l1 in "untrusted comment: "*) ;; *) return 1 ;; esac
	case $l3 in "trusted comment: "*) ;; *) return 1 ;; esac
	printf '%s' "${l3#trusted comment: }"
}

# Verifies FILE against its minisign signature SIG with $PUBKEY. Only prehashed (`ED`) signatures, which the n-kudo
# releaser makes, are accepted; both the signature over the file and the global signature over the signature and
# the trusted comment are checked. Prints the trusted comment on success.
verify_minisign() { # FILE SIG
	minisign -V -H -P "$PUBKEY" -m "$1" -x "$2" >"$WORK/minisign.out" 2>&1 || {
		say "minisign: $(tr '\n' ' ' <"$WORK/minisign.out")"
		return 1
	}
	trusted_comment "$2"
}

# The same checks with openssl (3.0+): BLAKE2b-512 of the file, ed25519 over the digest (pure Ed25519, not Ed25519ph),
# then ed25519 over signature || trusted comment.
verify_openssl() { # FILE SIG
	d=$WORK/ossl
	rm -rf "$d" && mkdir "$d"
	# Public key: "Ed" || key id (8) || ed25519 key (32).
	b64decode "$PUBKEY" "$d/pk" || { say "the public key is not valid base64"; return 1; }
	[ "$(file_size "$d/pk")" -eq 42 ] || { say "the public key does not decode to 42 bytes"; return 1; }
	[ "$(dd if="$d/pk" bs=1 count=2 2>/dev/null)" = Ed ] || { say "the public key is not an Ed25519 minisign key"; return 1; }
	dd if="$d/pk" of="$d/pk.id" bs=1 skip=2 count=8 2>/dev/null
	dd if="$d/pk" of="$d/pk.raw" bs=1 skip=10 count=32 2>/dev/null
	# SubjectPublicKeyInfo (DER) of an Ed25519 key: 30 2a 30 05 06 03 2b 65 70 03 21 00 || key.
	printf '\060\052\060\005\006\003\053\145\160\003\041\000' >"$d/pk.der"
	cat "$d/pk.raw" >>"$d/pk.der"
	# Signature line 2: alg (2) || key id (8) || signature (64); line 4: global signature (64).
	tc=$(trusted_comment "$2") || { say "$2 is not a minisign signature (no untrusted/trusted comment lines)"; return 1; }
	b64decode "$(sig_line "$2" 2)" "$d/sig" || { say "$2: signature line is not base64"; return 1; }
	b64decode "$(sig_line "$2" 4)" "$d/gsig" || { say "$2: global signature line is not base64"; return 1; }
	[ "$(file_size "$d/sig")" -eq 74 ] || { say "$2: the signature does not decode to 74 bytes"; return 1; }
	[ "$(file_size "$d/gsig")" -eq 64 ] || { say "$2: the global signature does not decode to 64 bytes"; return 1; }
	alg=$(dd if="$d/sig" bs=1 count=2 2>/dev/null)
	case $alg in
	ED) ;;
	Ed) say "$2 is a legacy (non-prehashed) signature; n-kudo releases are signed prehashed (ED)"; return 1 ;;
	*) say "$2: unsupported signature algorithm"; return 1 ;;
	esac
	dd if="$d/sig" of="$d/sig.id" bs=1 skip=2 count=8 2>/dev/null
	dd if="$d/sig" of="$d/sig.raw" bs=1 skip=10 count=64 2>/dev/null
	if [ "$(key_id_of "$d/sig.id")" != "$(key_id_of "$d/pk.id")" ]; then
		say "$2 was made by key id $(key_id_of "$d/sig.id"), not by the trusted key $(key_id_of "$d/pk.id")"
		return 1
	fi
	openssl dgst -blake2b512 -binary "$1" >"$d/digest" || { say "openssl has no BLAKE2b-512 (need OpenSSL 3.0+)"; return 1; }
	openssl pkeyutl -verify -pubin -inkey "$d/pk.der" -keyform DER -rawin -in "$d/digest" -sigfile "$d/sig.raw" \
		>/dev/null 2>"$d/err" || { say "signature verification failed for $1"; return 1; }
	cat "$d/sig.raw" >"$d/global"
	printf '%s' "$tc" >>"$d/global"
	openssl pkeyutl -verify -pubin -inkey "$d/pk.der" -keyform DER -rawin -in "$d/global" -sigfile "$d/gsig" \
		>/dev/null 2>"$d/err" || { say "comment signature verification failed for $1 (the trusted comment was changed)"; return 1; }
	printf '%s' "$tc"
}

verify_sig() { # FILE SIG
	if [ "$VERIFY_WITH" = minisign ]; then
		verify_minisign "$1" "$2"
	else
		verify_openssl "$1" "$2"
	fi
}

# A top-level string or number of the canonical manifest.json (one `  "key": value,` line each).
manifest_field() {
	sed -n "s/^  \"$2\": \"\\{0,1\\}\\([^\",]*\\)\"\\{0,1\\},\\{0,1\\}\$/\\1/p" "$1" | head -n 1
}

# The artifacts of the canonical manifest.json, one per line: name component kind os arch size sha256.
manifest_artifacts() {
	awk '
		/^  "artifacts": \[$/ { inside = 1; next }
		inside && /^  \]/ { inside = 0 }
		inside && /^    \{$/ { name = comp = kind = os = arch = size = sha = "" ; next }
		inside && /^      "/ {
			line = $0
			sub(/^      "/, "", line)
			key = line; sub(/".*/, "", key)
			val = line; sub(/^[^:]*: /, "", val); sub(/,$/, "", val); gsub(/"/, "", val)
			if (key == "name") name = val
			else if (key == "component") comp = val
			else if (key == "kind") kind = val
			else if (key == "os") os = val
			else if (key == "arch") arch = val
			else if (key == "size") size = val
			else if (key == "sha256") sha = val
			next
		}
		inside && /^    \},?$/ { print name, comp, kind, os, arch, size, sha }
	' "$1"
}

# RFC 3339 UTC (YYYY-MM-DDTHH:MM:SSZ) as the number YYYYMMDDHHMMSS.
rfc3339_number() {
	case $1 in
	[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z) printf '%s' "$1" | tr -d -- '-:TZ' ;;
	*) return 1 ;;
	esac
}

# Compares the X.Y.Z cores of two versions: prints -1, 0 or 1.
core_cmp() {
	a=${1%%[-+]*}
	b=${2%%[-+]*}
	awk -v a="$a" -v b="$b" 'BEGIN {
		split(a, x, "."); split(b, y, ".")
		for (i = 1; i <= 3; i++) { if (x[i] + 0 < y[i] + 0) { print -1; exit } if (x[i] + 0 > y[i] + 0) { print 1; exit } }
		print 0
	}'
}

# The completion marker nkudo_core::layout writes last into a release directory (format 1): every directory, file
# (mode, size, SHA-256) and symbolic link, so that the agent's self-update and `releaser` treat this release as
# complete and can verify it, roll back to it and prune it.
write_marker() { # DIR VERSION
	list=$WORK/entries
	(cd "$1" && find . -mindepth 1 -print) | sed 's|^\./||' | tr '/' '\001' | sort | tr '\001' '/' >"$list"
	{
		printf '{\n  "format": 1,\n  "version": "%s",\n  "entries": [' "$2"
		sep=""
		while IFS= read -r rel; do
			case $rel in
			*[!A-Za-z0-9._+@/-]*) die "$EX_INSTALL" "the release holds a file named $rel, which this installer does not handle" ;;
			esac
			f=$1/$rel
			if [ -L "$f" ]; then
				target=$(readlink "$f")
				case $target in
				*[\"\\[:cntrl:]]*) die "$EX_INSTALL" "the release holds a link $rel with an unsupported target" ;;
				esac
				printf '%s\n    {"kind": "symlink", "path": "%s", "target": "%s"}' "$sep" "$rel" "$target"
			elif [ -d "$f" ]; then
				mode=$(printf '%d' "0$(stat -c %a "$f")")
				printf '%s\n    {"kind": "dir", "path": "%s", "mode": %s}' "$sep" "$rel" "$mode"
			elif [ -f "$f" ]; then
				mode=$(printf '%d' "0$(stat -c %a "$f")")
				printf '%s\n    {"kind": "file", "path": "%s", "mode": %s, "size": %s, "sha256": "%s"}' \
					"$sep" "$rel" "$mode" "$(file_size "$f")" "$(sha256_of "$f")"
			else
				die "$EX_INSTALL" "the release holds $rel, which is neither a file, a directory nor a link"
			fi
			sep=","
		done <"$list"
		printf '\n  ]\n}\n'
	} >"$1/.complete"
}

# The entries of a completion marker (ours, or the one nkudo_core::layout writes), one per line:
# kind|path|mode|size|sha256|target. Each entry is a flat JSON object, so splitting the text at `}` isolates it.
marker_entries() { # MARKER
	tr -d '\n' <"$1" | awk 'BEGIN { RS = "}" } {
		rec = $0
		kind = path = mode = size = sha = target = ""
		while (match(rec, /"[a-z0-9_]+": *("[^"]*"|[0-9]+)/)) {
			kv = substr(rec, RSTART, RLENGTH)
			rec = substr(rec, RSTART + RLENGTH)
			key = kv; sub(/^"/, "", key); sub(/".*/, "", key)
			val = kv; sub(/^"[^"]*": */, "", val); gsub(/"/, "", val)
			if (key == "kind") kind = val
			else if (key == "path") path = val
			else if (key == "mode") mode = val
			else if (key == "size") size = val
			else if (key == "sha256") sha = val
			else if (key == "target") target = val
		}
		if (kind != "") print kind "|" path "|" mode "|" size "|" sha "|" target
	}'
}

# Whether releases/<version> is complete and intact: its marker names the version and every entry it records is
# still there with the same mode, size and SHA-256 (or link target), as Layout::verify checks before a switch.
# On failure prints why.
verify_release() { # DIR VERSION
	m=$1/.complete
	if [ ! -f "$m" ]; then
		echo "no completion marker: an interrupted install"
		return 1
	fi
	if ! grep -qF "\"version\": \"$2\"" "$m"; then
		echo "its completion marker is for another version"
		return 1
	fi
	marker_entries "$m" >"$WORK/marker.list"
	if [ ! -s "$WORK/marker.list" ]; then
		echo "its completion marker lists nothing"
		return 1
	fi
	while IFS='|' read -r kind path mode size sha target; do
		f=$1/$path
		case $kind in
		file)
			if [ ! -f "$f" ] || [ -L "$f" ]; then
				echo "$path is missing or no longer a regular file"
				return 1
			fi
			if [ "$(file_size "$f")" != "$size" ] || [ "$(printf '%d' "0$(stat -c %a "$f")")" != "$mode" ] ||
				[ "$(sha256_of "$f")" != "$sha" ]; then
				echo "$path changed"
				return 1
			fi
			;;
		dir)
			if [ ! -d "$f" ] || [ -L "$f" ] || [ "$(printf '%d' "0$(stat -c %a "$f")")" != "$mode" ]; then
				echo "the directory $path changed"
				return 1
			fi
			;;
		symlink)
			if [ ! -L "$f" ] || [ "$(readlink "$f")" != "$target" ]; then
				echo "the link $path changed"
				return 1
			fi
			;;
		*)
			echo "its completion marker has an unknown entry ($kind)"
			return 1
			;;
		esac
	done <"$WORK/marker.list"
}

# Writes CONTENT-FILE to DEST atomically (temporary file beside it, then rename) with MODE.
install_file() { # SRC DEST MODE
	tmp=$(dirname "$2")/.$(basename "$2").tmp-$$
	if ! { cp "$1" "$tmp" && chmod "$3" "$tmp" && mv -f "$tmp" "$2"; }; then
		rm -f "$tmp"
		die "$EX_INSTALL" "cannot write $2"
	fi
}

# ---------------------------------------------------------------------------------------------------------------
# 1. Download and verify the manifest

say "installing nkudo-edge $VERSION for linux/$ARCH into ${P:-/} (verifying with $VERIFY_WITH)"
fetch "$(release_url manifest.json)" "$WORK/manifest.json" "$MANIFEST_MAX_BYTES"
fetch "$(release_url manifest.json.minisig)" "$WORK/manifest.json.minisig" "$SIG_MAX_BYTES"

TC=$(verify_sig "$WORK/manifest.json" "$WORK/manifest.json.minisig") ||
	die "$EX_VERIFY" "manifest.json of $VERSION does not verify with the trusted release key; nothing installed"
TAB=$(printf '\t')
case "$TAB$TC$TAB" in
*"${TAB}file:manifest.json$TAB"*) ;;
*"${TAB}file:"*) die "$EX_VERIFY" "the signature served as manifest.json.minisig signs another file; nothing installed" ;;
esac
say "manifest.json signature verified (trusted comment: $(printf '%s' "$TC" | tr '\t' ' '))"

M=$WORK/manifest.json
[ "$(manifest_field "$M" schema_version)" = 1 ] ||
	die "$EX_VERIFY" "manifest.json has an unsupported schema_version (this installer reads 1); nothing installed"
[ "$(manifest_field "$M" product)" = n-kudo ] || die "$EX_VERIFY" "manifest.json is not an n-kudo manifest; nothing installed"
M_VERSION=$(manifest_field "$M" version)
[ "$M_VERSION" = "$VERSION" ] ||
	die "$EX_VERIFY" "the signed manifest is for version ${M_VERSION:-?}, not $VERSION (a replayed or misplaced release); nothing installed"
EXPIRES=$(manifest_field "$M" expires)
exp_n=$(rfc3339_number "$EXPIRES") || die "$EX_VERIFY" "manifest.json has no valid expiry; nothing installed"
now_n=$(date -u +%Y%m%d%H%M%S)
[ "$exp_n" -gt "$now_n" ] ||
	die "$EX_VERIFY" "the manifest of $VERSION expired at $EXPIRES (stale metadata): install a newer release, or ask the release captain to re-sign this one; nothing installed"

ART=$(manifest_artifacts "$M" | awk -v a="$ARCH" '$2 == "nkudo-edge" && $3 == "tarball" && $4 == "linux" && $5 == a' | head -n 1)
[ -n "$ART" ] || die "$EX_VERIFY" "release $VERSION has no nkudo-edge tarball for linux/$ARCH; nothing installed"
# shellcheck disable=SC2086 # the fields are space separated, checked below
set -- $ART
TARBALL=$1
T_SIZE=$6
T_SHA=$7
case $TARBALL in
*[!A-Za-z0-9._+-]* | .*) die "$EX_VERIFY" "the manifest names an unsafe artifact file name; nothing installed" ;;
esac
case $T_SIZE in "" | *[!0-9]*) die "$EX_VERIFY" "the manifest has no valid size for $TARBALL; nothing installed" ;; esac
case $T_SHA in *[!0-9a-f]*) die "$EX_VERIFY" "the manifest has no valid SHA-256 for $TARBALL; nothing installed" ;; esac
[ ${#T_SHA} -eq 64 ] || die "$EX_VERIFY" "the manifest has no valid SHA-256 for $TARBALL; nothing installed"

# ---------------------------------------------------------------------------------------------------------------
# 2. Take the layout lock (the agent's self-update and `releaser` hold the same flock on <layout>/.lock)

mkdir -p "$LAYOUT/releases" || die "$EX_INSTALL" "cannot create $LAYOUT/releases"
LOCKED=0
if have flock; then
	exec 9>>"$LAYOUT/.lock"
	flock -w 60 9 || die "$EX_INSTALL" "another process (nkudo-edge self-update or releaser) has held $LAYOUT/.lock for 60 s; retry when it is done"
	LOCKED=1
	# Leftovers of crashed installs (ours and the layout library's); only removed under the lock.
	for left in "$LAYOUT"/releases/.tmp-* "$LAYOUT"/.current.tmp-* "$LAYOUT"/.previous.tmp-*; do
		[ -e "$left" ] || [ -L "$left" ] || continue
		rm -rf "$left"
	done
else
	say "warning: flock (util-linux) is not installed: not serialised with a concurrent self-update"
fi

CURRENT_V=""
if [ -L "$LAYOUT/current" ]; then
	CURRENT_V=$(basename "$(readlink "$LAYOUT/current")")
fi
if [ -n "$CURRENT_V" ] && [ "$CURRENT_V" != "$VERSION" ] && [ "$ALLOW_DOWNGRADE" = 0 ] &&
	[ "$(core_cmp "$CURRENT_V" "$VERSION")" = 1 ]; then
	die "$EX_USAGE" "$CURRENT_V is current, newer than $VERSION: pass --allow-downgrade to go back (the agent's own rollbacks go through the control plane: releaser rollback)"
fi

# ---------------------------------------------------------------------------------------------------------------
# 3. Install releases/<version> (unless an identical complete copy is there)

REL=$LAYOUT/releases/$VERSION
CHANGED=0
DAMAGE=""
if [ -e "$REL" ] || [ -L "$REL" ]; then
	if ! DAMAGE=$(verify_release "$REL" "$VERSION"); then
		:
	elif ! cmp -s "$REL/manifest.json" "$M"; then
		DAMAGE="its manifest.json is not the one just verified"
	fi
fi
if { [ -e "$REL" ] || [ -L "$REL" ]; } && [ -z "$DAMAGE" ]; then
	say "$VERSION is already installed in $REL (intact)"
else
	if [ -n "$DAMAGE" ]; then
		say "$REL is incomplete or damaged ($DAMAGE): installing it again"
	fi
	fetch "$(release_url "$TARBALL")" "$WORK/$TARBALL" "$T_SIZE"
	[ "$(file_size "$WORK/$TARBALL")" -eq "$T_SIZE" ] ||
		die "$EX_VERIFY" "$TARBALL has $(file_size "$WORK/$TARBALL") bytes, the signed manifest says $T_SIZE; nothing installed"
	GOT_SHA=$(sha256_of "$WORK/$TARBALL")
	[ "$GOT_SHA" = "$T_SHA" ] ||
		die "$EX_VERIFY" "SHA-256 mismatch for $TARBALL: got $GOT_SHA, the signed manifest says $T_SHA (tampered or corrupted download); nothing installed"
	say "$TARBALL: size and SHA-256 match the signed manifest"

	STAGE=$LAYOUT/releases/.tmp-install-$VERSION-$$
	mkdir "$STAGE" || die "$EX_INSTALL" "cannot create $STAGE"
	tar -xzf "$WORK/$TARBALL" -C "$STAGE" --no-same-owner 2>"$WORK/tar.err" ||
		die "$EX_INSTALL" "unpacking $TARBALL failed: $(tr '\n' ' ' <"$WORK/tar.err"); nothing installed"
	odd=$(find "$STAGE" ! -type f ! -type d ! -type l -print | head -n 1)
	[ -z "$odd" ] || die "$EX_INSTALL" "$TARBALL holds ${odd#"$STAGE"/}, which is neither a file, a directory nor a link; nothing installed"
	[ ! -e "$STAGE/.complete" ] || die "$EX_INSTALL" "$TARBALL holds the reserved name .complete; nothing installed"
	[ -x "$STAGE/bin/nkudo-edge" ] || die "$EX_INSTALL" "$TARBALL has no bin/nkudo-edge; nothing installed"
	# The verified manifest and its signature beside the binaries (what `releaser install` writes): the agent reports
	# the version it was installed as from it.
	if ! { cp "$M" "$STAGE/manifest.json" && cp "$WORK/manifest.json.minisig" "$STAGE/manifest.json.minisig" &&
		chmod 0644 "$STAGE/manifest.json" "$STAGE/manifest.json.minisig"; }; then
		die "$EX_INSTALL" "cannot write into $STAGE"
	fi
	write_marker "$STAGE" "$VERSION"
	sync
	if [ -e "$REL" ] || [ -L "$REL" ]; then
		# An incomplete or different copy: moved aside atomically, then removed.
		mv -T "$REL" "$LAYOUT/releases/.tmp-stale-$VERSION-$$" || die "$EX_INSTALL" "cannot move the old $REL aside"
		rm -rf "$LAYOUT/releases/.tmp-stale-$VERSION-$$"
	fi
	mv -T "$STAGE" "$REL" || die "$EX_INSTALL" "cannot rename $STAGE to $REL"
	STAGE=""
	sync
	CHANGED=1
	say "installed $REL"
fi

# The pre-switch trial run (as the agent's self-update does): the new binary must run on this host and report the
# version it was installed as.
first=$("$REL/bin/nkudo-edge" version 2>"$WORK/trial.err" </dev/null | head -n 1) || first=""
if [ "$first" != "nkudo-edge $VERSION" ]; then
	if [ "$CHANGED" = 1 ]; then
		mv -T "$REL" "$LAYOUT/releases/.tmp-failed-$VERSION-$$" && rm -rf "$LAYOUT/releases/.tmp-failed-$VERSION-$$"
	fi
	die "$EX_INSTALL" "$REL/bin/nkudo-edge does not run on this host (\`version\` printed \"$first\": $(tr '\n' ' ' <"$WORK/trial.err")); current is unchanged"
fi

# ---------------------------------------------------------------------------------------------------------------
# 4. Switch `current` (and `previous`) atomically: a new symlink under a temporary name renamed over the old one

switch_link() { # NAME VERSION
	tmp=$LAYOUT/.$1.tmp-install-$$
	if ! { ln -s "releases/$2" "$tmp" && mv -T "$tmp" "$LAYOUT/$1"; }; then
		rm -f "$tmp"
		die "$EX_INSTALL" "cannot switch $LAYOUT/$1 to releases/$2"
	fi
}

if [ "$CURRENT_V" = "$VERSION" ]; then
	say "$LAYOUT/current already points at $VERSION"
else
	if [ -e "$LAYOUT/current" ] && [ ! -L "$LAYOUT/current" ]; then
		die "$EX_INSTALL" "$LAYOUT/current is not a symbolic link; remove it and re-run"
	fi
	if [ -n "$CURRENT_V" ] && [ -f "$LAYOUT/releases/$CURRENT_V/.complete" ]; then
		switch_link previous "$CURRENT_V"
	fi
	switch_link current "$VERSION"
	sync
	CHANGED=1
	say "$LAYOUT/current -> releases/$VERSION${CURRENT_V:+ (previous: $CURRENT_V)}"
fi
if [ "$LOCKED" = 1 ]; then
	exec 9>&-
fi

# ---------------------------------------------------------------------------------------------------------------
# 5. Configuration, CA bundle and systemd unit

mkdir -p "$CONF_DIR" "$UNIT_DIR" || die "$EX_INSTALL" "cannot create $CONF_DIR or $UNIT_DIR"
if [ -n "$CA_FILE" ]; then
	if [ -f "$CA_DEST" ] && cmp -s "$CA_FILE" "$CA_DEST"; then
		:
	else
		install_file "$CA_FILE" "$CA_DEST" 0644
		say "wrote $CA_DEST"
	fi
fi

if [ -f "$CONF" ]; then
	say "keeping the existing $CONF"
else
	{
		printf '# %s: the n-kudo edge agent configuration, written by install-edge.sh.\n' "${CONF#"$P"}"
		printf '# Precedence: flags > environment (NKUDO_*) > this file > defaults. Every key, annotated:\n'
		printf '# %s/current/config/edge.toml; nkudo-edge --help lists the flags and variables.\n' "${LAYOUT#"$P"}"
		printf 'control_plane = "%s"\n' "$CONTROL_PLANE"
		if [ -n "$CA_FILE" ]; then
			printf '# CA bundle that signs the control plane'"'"'s server certificate.\n'
			printf 'ca_file = "%s"\n' "$CA_DEST"
		fi
		if [ -n "$HOSTNAME_OPT" ]; then
			printf 'hostname = "%s"\n' "$HOSTNAME_OPT"
		fi
		printf 'state_dir = "%s"\n' "$VAR/state"
		printf 'pki_dir = "%s"\n' "$VAR/pki"
		printf 'runtime_dir = "%s"\n' "$VAR/vms"
		printf 'images_dir = "%s"\n' "$VAR/images"
		printf '# Self-update: the release key this host was installed with (add the next key during a rotation).\n'
		printf 'release_public_keys = ["%s"]\n' "$PUBKEY"
	} >"$WORK/edge.toml"
	install_file "$WORK/edge.toml" "$CONF" 0644
	say "wrote $CONF"
fi

UNIT_SRC=$REL/systemd/$UNIT_NAME
UNIT=$UNIT_DIR/$UNIT_NAME
if [ -f "$UNIT_SRC" ]; then
	if [ -n "$P" ]; then
		# A unit for the tree under --root: its paths point into it.
		sed -e "s|/opt/nkudo|$LAYOUT|g" -e "s|/etc/nkudo/|$CONF_DIR/|g" "$UNIT_SRC" >"$WORK/unit"
	else
		cp "$UNIT_SRC" "$WORK/unit"
	fi
	if [ -f "$UNIT" ] && cmp -s "$WORK/unit" "$UNIT"; then
		say "$UNIT is up to date"
	else
		install_file "$WORK/unit" "$UNIT" 0644
		CHANGED=1
		say "wrote $UNIT"
	fi
else
	say "warning: release $VERSION packages no systemd/$UNIT_NAME; no unit written"
	[ "$NO_START" = 1 ] || die "$EX_INSTALL" "cannot start the agent without a systemd unit (re-run with --no-start to install only)"
fi

# ---------------------------------------------------------------------------------------------------------------
# 6. Enroll (once)

AGENT=$LAYOUT/current/bin/nkudo-edge
if enrolled; then
	say "already enrolled ($STATE_FILE); to enroll again: $AGENT enroll --force"
else
	say "enrolling with ${CONTROL_PLANE:-the control plane named in $CONF}"
	set -- enroll --config "$CONF"
	[ -z "$CONTROL_PLANE" ] || set -- "$@" --control-plane "$CONTROL_PLANE"
	[ -z "$HOSTNAME_OPT" ] || set -- "$@" --hostname "$HOSTNAME_OPT"
	[ -z "$CA_FILE" ] || set -- "$@" --ca-file "$CA_DEST"
	# The directories come from the config file; the caller's environment must not redirect them.
	rc=0
	if [ -n "$TOKEN_FILE" ]; then
		(
			unset NKUDO_CONFIG NKUDO_STATE_DIR NKUDO_PKI_DIR NKUDO_CA_FILE NKUDO_CONTROL_PLANE NKUDO_HOSTNAME
			exec "$AGENT" "$@" --token-file "$TOKEN_FILE"
		) </dev/null || rc=$?
	else
		(
			unset NKUDO_CONFIG NKUDO_STATE_DIR NKUDO_PKI_DIR NKUDO_CA_FILE NKUDO_CONTROL_PLANE NKUDO_HOSTNAME
			NKUDO_ENROLL_TOKEN=$TOKEN
			export NKUDO_ENROLL_TOKEN
			exec "$AGENT" "$@"
		) </dev/null || rc=$?
	fi
	case $rc in
	0) ;;
	5) die "$EX_ENROLL" "enrollment failed: the control plane could not be reached (check --control-plane, --ca-file and the network); the release is installed, re-run to enroll" ;;
	*) die "$EX_ENROLL" "enrollment failed (nkudo-edge enroll exit $rc, see above): a token is single-use and expires, issue a new one; the release is installed, re-run to enroll" ;;
	esac
fi

# ---------------------------------------------------------------------------------------------------------------
# 7. Start

if [ "$NO_START" = 1 ]; then
	say "not starting the service (--no-start${P:+, implied by --root})"
else
	if [ ! -d /run/systemd/system ] || ! have systemctl; then
		die "$EX_SERVICE" "systemd is not running on this host: start ${LAYOUT}/current/bin/nkudo-edge run under your supervisor, or re-run with --no-start"
	fi
	systemctl daemon-reload || die "$EX_SERVICE" "systemctl daemon-reload failed"
	systemctl enable "$UNIT_NAME" || die "$EX_SERVICE" "systemctl enable $UNIT_NAME failed"
	if [ "$CHANGED" = 1 ] && systemctl is-active --quiet "$UNIT_NAME"; then
		systemctl restart "$UNIT_NAME" || die "$EX_SERVICE" "systemctl restart $UNIT_NAME failed (journalctl -u $UNIT_NAME)"
		say "restarted $UNIT_NAME on $VERSION"
	else
		systemctl start "$UNIT_NAME" || die "$EX_SERVICE" "systemctl start $UNIT_NAME failed (journalctl -u $UNIT_NAME)"
		say "$UNIT_NAME is running"
	fi
fi

say "done: nkudo-edge $VERSION is current in $LAYOUT"
exit "$EX_OK"

#!/usr/bin/env bash
# Prints the release public key the workflows trust: the minisign base64 line (`RW...`, what `minisign -P` and
# `releaser --public-key-string` take).
#
# Sources, pinned out of band and never taken from a release directory:
#   * the repository variable NKUDO_RELEASE_PUBKEY (passed in the environment): the `RW...` line, or the whole
#     nkudo-release.pub file (its comment line is ignored);
#   * the committed file deployments/keys/nkudo-release.pub, when the repository carries one.
# At least one is required; when both are there they must agree. Exit 1 with a GitHub error annotation otherwise.
set -euo pipefail

COMMITTED="deployments/keys/nkudo-release.pub"

# A minisign Ed25519 public key: "Ed" + 8-byte key id + 32-byte key, base64 (56 characters, always `RW...`).
key_line() {
    # The last non-empty line that is not the untrusted comment, without surrounding blanks or a CR.
    tr -d '\r' | grep -v -e '^untrusted comment:' -e '^[[:space:]]*$' | tail -n 1 | tr -d '[:space:]'
}

valid() {
    [[ $1 =~ ^RW[A-Za-z0-9+/]{54}$ ]]
}

from_var=""
if [ -n "${NKUDO_RELEASE_PUBKEY:-}" ]; then
    from_var="$(printf '%s\n' "$NKUDO_RELEASE_PUBKEY" | key_line)"
    if ! valid "$from_var"; then
        echo "::error::the repository variable NKUDO_RELEASE_PUBKEY is not a minisign public key (expected the RW... line of nkudo-release.pub)" >&2
        exit 1
    fi
fi

from_file=""
if [ -f "$COMMITTED" ]; then
    from_file="$(key_line <"$COMMITTED")"
    if ! valid "$from_file"; then
        echo "::error file=$COMMITTED::not a minisign public key file" >&2
        exit 1
    fi
fi

if [ -z "$from_var" ] && [ -z "$from_file" ]; then
    echo "::error::no trusted release public key: set the repository variable NKUDO_RELEASE_PUBKEY to the RW... line of the release key's nkudo-release.pub (releaser keygen prints it), or commit the file as $COMMITTED" >&2
    exit 1
fi
if [ -n "$from_var" ] && [ -n "$from_file" ] && [ "$from_var" != "$from_file" ]; then
    echo "::error::the repository variable NKUDO_RELEASE_PUBKEY and $COMMITTED name different keys; fix the one that is wrong" >&2
    exit 1
fi
printf '%s\n' "${from_file:-$from_var}"

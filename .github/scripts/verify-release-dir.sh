#!/usr/bin/env bash
# Verifies a release directory with stock tools only (minisign, sha256sum, jq), independently of `releaser verify`:
#   verify-release-dir.sh DIR PUBKEY VERSION CHANNEL [COMMIT]
# PUBKEY is the trusted minisign key line (`RW...`, see trusted-pubkey.sh), never the copy inside DIR.
# Checks: every file but the public key carries a signature, every signature verifies with PUBKEY and its trusted
# comment names that file and VERSION; SHA256SUMS matches the files; manifest.json says VERSION and CHANNEL
# (`release` or `pre-release`), every artifact it lists is there, and (given COMMIT) that git commit.
set -euo pipefail

if [ "$#" -lt 4 ] || [ "$#" -gt 5 ]; then
    echo "usage: $0 DIR PUBKEY VERSION CHANNEL [COMMIT]" >&2
    exit 2
fi
dir=$1 pubkey=$2 version=$3 channel=$4 commit=${5:-}

fail() {
    echo "::error::release directory $dir: $*" >&2
    exit 1
}

[ -d "$dir" ] || fail "not a directory"
[ -f "$dir/manifest.json" ] || fail "no manifest.json"
[ -f "$dir/SHA256SUMS" ] || fail "no SHA256SUMS"

checked=0
for path in "$dir"/*; do
    name=${path##*/}
    case "$name" in
    *.minisig | nkudo-release.pub) continue ;;
    esac
    [ -f "$path.minisig" ] || fail "$name has no signature ($name.minisig)"
    # -Q prints only the trusted comment, which the signature covers.
    comment=$(minisign -V -Q -m "$path" -P "$pubkey") || fail "$name: the signature does not verify with the trusted key"
    # Fields are tab-separated: `timestamp:…<TAB>file:…<TAB>version:…<TAB>channel:…<TAB>expires:…<TAB>hashed`.
    fields=$'\t'"$comment"$'\t'
    case "$fields" in
    *$'\t'"file:$name"$'\t'*) ;;
    *) fail "$name: its signature's trusted comment names another file ($comment)" ;;
    esac
    case "$fields" in
    *$'\t'"version:$version"$'\t'*) ;;
    *) fail "$name: its signature's trusted comment names another version ($comment)" ;;
    esac
    checked=$((checked + 1))
done
for sig in "$dir"/*.minisig; do
    [ -f "${sig%.minisig}" ] || fail "${sig##*/} signs a file that is not there"
done

(cd "$dir" && sha256sum --check --strict --quiet SHA256SUMS) || fail "SHA256SUMS does not match the files"

jq -e --arg v "$version" '.version == $v' "$dir/manifest.json" >/dev/null ||
    fail "manifest.json is version $(jq -r .version "$dir/manifest.json"), expected $version"
jq -e --arg c "$channel" '.channel == $c' "$dir/manifest.json" >/dev/null ||
    fail "manifest.json is channel $(jq -r .channel "$dir/manifest.json"), expected $channel"
if [ -n "$commit" ]; then
    jq -e --arg c "$commit" '.git_commit == $c' "$dir/manifest.json" >/dev/null ||
        fail "manifest.json was built from $(jq -r .git_commit "$dir/manifest.json"), expected $commit"
fi
while IFS= read -r artifact; do
    case "$artifact" in
    "" | */* | .*) fail "manifest.json lists an artifact with an unsafe name: $artifact" ;;
    esac
    [ -f "$dir/$artifact" ] || fail "manifest.json lists $artifact, which is missing"
    grep -q "  $artifact\$" "$dir/SHA256SUMS" || fail "SHA256SUMS has no line for $artifact"
done < <(jq -r '.artifacts[].name' "$dir/manifest.json")

echo "verified $dir with minisign: $checked signed files, version $version ($channel)"

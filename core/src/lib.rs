//! nkudo-core: the contracts every n-kudo component shares.
//!
//! * [`api`]: the wire types of the control plane's HTTP API and its error codes. The routes and field names
//!   stay compatible with the earlier Go implementation so that agents already in the field keep working.
//! * [`build_info`]: version, git commit, build date and target triple of this build, and the `version` text.
//! * [`archive`]: unpacking verified release tarballs.
//! * [`duration`]: human durations (`15s`, `1m30s`) in files and flags.
//! * [`fsutil`]: crash-safe (atomic) file writes.
//! * [`installed`]: the version a binary was installed as (the manifest in its release directory).
//! * [`layout`]: the host release layout (`/opt/nkudo/releases/<version>` + `current`), crash-safe switches.
//! * [`manifest`]: the release manifest (`manifest.json`) and canonical JSON (what is signed).
//! * [`minisign`]: minisign public keys and signatures: parse, verify (prehashed `ED`), trusted comments, sign.
//! * [`rollout`]: rollout policies (stages, selectors, analysis triggers) and their validation.
//! * [`version`]: the SemVer policy: channels, the pre-release format and the N/N-1 agent compatibility rule.
//!
//! This crate has no runtime dependencies (no tokio, no HTTP, no SQL; the crypto is ed25519-dalek, BLAKE2 and SHA-256) so that every binary can use it.

pub mod api;
#[cfg(unix)]
pub mod archive;
pub mod build_info;
pub mod duration;
pub mod fsutil;
#[cfg(unix)]
pub mod installed;
#[cfg(unix)]
pub mod layout;
pub mod manifest;
pub mod minisign;
pub mod rollout;
pub mod version;

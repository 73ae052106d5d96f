//! n-kudo's release logic, behind the `releaser` CLI (and `cargo xtask dist`).
//!
//! * [`version`]: the release version from git (`vX.Y.Z` tags, else `{base}-pre.{count}+{sha}`);
//! * [`cross`]: the static musl cross build (`cargo zigbuild --profile dist`);
//! * [`package`]: deterministic `.tar.gz` archives;
//! * [`oci`]: the control plane's multi-arch OCI image archive, without a container daemon;
//! * [`checksums`]: SHA-256 and `SHA256SUMS`;
//! * [`manifest`]: `manifest.json` and canonical JSON (re-exported from `nkudo_core::manifest`);
//! * [`minisign`]: minisign secret keys (scrypt) and signing; verification re-exported from `nkudo_core::minisign`;
//! * [`compat`]: `check-compat`: which enrolled agents a control plane version would no longer support;
//! * [`dist`]: from built binaries to a signed release directory;
//! * [`install`]: verify a release, then install it into the host layout (`nkudo_core::layout`);
//! * [`lint`]: `lint-deploy`, floating image and version references in deployment files;
//! * [`promote`]: a verified pre-release directory to a signed release directory, byte-identical artifacts;
//! * [`verify`]: checks a release directory: every signature, hash, size and the expiry;
//! * [`rollout`]: `rollout plan|start|status|pause|resume|approve|abort` and fleet `rollback --to`, over the control
//!   plane's admin API.
//!
//! Files are written atomically with `nkudo_core::fsutil::write_atomic` (temp, fsync, rename).

pub mod checksums;
pub mod compat;
pub mod cross;
pub mod dist;
pub mod install;
pub mod lint;
pub mod manifest;
pub mod minisign;
pub mod oci;
pub mod package;
pub mod promote;
pub mod rollout;
pub mod verify;
pub mod version;

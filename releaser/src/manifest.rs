//! `manifest.json`: the types, canonical serialization and parsing are `nkudo_core::manifest` (so the edge agent
//! and the control plane read releases without the releaser), re-exported here.

pub use nkudo_core::manifest::*;

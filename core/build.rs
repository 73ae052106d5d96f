//! Exports the target triple as `NKUDO_TARGET` for `build_info`, and asks for a rebuild when the build-info
//! variables change (rustc tracks `option_env!` too; this makes it explicit).

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=NKUDO_TARGET={target}");
    for var in ["NKUDO_VERSION", "NKUDO_GIT_COMMIT", "NKUDO_BUILD_DATE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

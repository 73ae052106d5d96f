//! Checks of a real release directory with the real tools: `minisign -V`, `sha256sum -c`, `tar`, `skopeo`,
//! `systemd-analyze`, `qemu-aarch64-static`, and `releaser verify` against tampering.
//!
//! `cargo xtask test` builds the release (twice) before `cargo test` and sets:
//! `NKUDO_DIST_DIR` (the release directory), `NKUDO_DIST_DIR_REBUILD` (the second, warm run),
//! `NKUDO_DIST_KEY` / `NKUDO_DIST_PUBKEY` (the key pair made for the run), `NKUDO_DIST_TARGET_DIR` (the cargo
//! target directory with the binaries). Without them (a plain `cargo test`) every test here prints a loud
//! SKIPPED line and passes; with CI=true that is a failure.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

struct Dist {
    dir: PathBuf,
    rebuild: PathBuf,
    key: PathBuf,
    pubkey: PathBuf,
    target_dir: PathBuf,
    manifest: serde_json::Value,
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

fn skip(what: &str) {
    let bar = "!".repeat(90);
    eprintln!("{bar}\n!!! SKIPPED: {what}\n{bar}");
}

fn dist() -> Option<Dist> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    match (
        var("NKUDO_DIST_DIR"),
        var("NKUDO_DIST_DIR_REBUILD"),
        var("NKUDO_DIST_KEY"),
        var("NKUDO_DIST_PUBKEY"),
        var("NKUDO_DIST_TARGET_DIR"),
    ) {
        (Some(dir), Some(rebuild), Some(key), Some(pubkey), Some(target_dir)) => {
            let manifest = serde_json::from_slice(&fs::read(dir.join("manifest.json")).expect("manifest.json"))
                .expect("manifest.json parses");
            Some(Dist {
                dir,
                rebuild,
                key,
                pubkey,
                target_dir,
                manifest,
            })
        }
        _ => {
            assert!(
                !ci(),
                "CI=true but NKUDO_DIST_DIR & co. are not set: run the tests through `cargo xtask test`"
            );
            skip("release directory tests: NKUDO_DIST_DIR is not set (run `cargo xtask test`)");
            None
        }
    }
}

/// A tool on PATH, or None after a SKIPPED line (a failure with CI=true).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        assert!(!ci(), "CI=true but {name} is not installed");
        skip(&format!("{name} is not installed"));
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("spawn")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn releaser() -> Command {
    Command::new(env!("CARGO_BIN_EXE_releaser"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn assert_same_dirs(a: &Path, b: &Path) {
    let (fa, fb) = (files(a), files(b));
    assert_eq!(
        fa.keys().collect::<Vec<_>>(),
        fb.keys().collect::<Vec<_>>(),
        "same file names in {} and {}",
        a.display(),
        b.display()
    );
    for (name, bytes) in &fa {
        assert!(
            bytes == &fb[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn artifacts(d: &Dist) -> Vec<serde_json::Value> {
    d.manifest["artifacts"].as_array().unwrap().clone()
}

fn artifact_name(d: &Dist, component: &str, kind: &str, arch: &str) -> String {
    artifacts(d)
        .iter()
        .find(|a| a["component"] == component && a["kind"] == kind && a["arch"] == arch)
        .unwrap_or_else(|| panic!("no {component} {kind} {arch} in the manifest"))["name"]
        .as_str()
        .unwrap()
        .to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for (name, bytes) in files(from) {
        fs::write(to.join(name), bytes).unwrap();
    }
}

fn untar(archive: &Path, into: &Path) {
    fs::create_dir_all(into).unwrap();
    let o = run(Command::new("tar").arg("-xzf").arg(archive).arg("-C").arg(into));
    assert!(o.status.success(), "tar -xzf {}: {}", archive.display(), text(&o));
}

// ---------------------------------------------------------------------------------------------------------

#[test]
fn second_dist_run_gives_identical_bytes() {
    let Some(d) = dist() else { return };
    assert_same_dirs(&d.dir, &d.rebuild);
}

#[test]
fn repackaging_the_same_binaries_gives_identical_bytes() {
    let Some(d) = dist() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("again");
    let started = Instant::now();
    let o = run(releaser()
        .arg("package")
        .arg("--workspace")
        .arg(workspace())
        .arg("--target-dir")
        .arg(&d.target_dir)
        .arg("--key")
        .arg(&d.key)
        .arg("--out")
        .arg(&out)
        .args(["--version", d.manifest["version"].as_str().unwrap()])
        .args(["--git-commit", d.manifest["git_commit"].as_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    eprintln!(
        "packaging + checksums + signing (debug releaser): {:.2}s",
        started.elapsed().as_secs_f64()
    );
    assert_same_dirs(&d.dir, &out);
}

#[test]
fn minisign_verifies_every_signature() {
    let Some(d) = dist() else { return };
    let Some(minisign) = tool("minisign") else { return };
    let mut signed = 0;
    for name in files(&d.dir).keys() {
        let Some(file) = name.strip_suffix(".minisig") else {
            continue;
        };
        // -H: only prehashed (ED) signatures; -Q: print the trusted comment only.
        let o = run(Command::new(&minisign)
            .args(["-V", "-H", "-Q", "-p"])
            .arg(&d.pubkey)
            .arg("-m")
            .arg(d.dir.join(file)));
        assert!(o.status.success(), "minisign -V {file}: {}", text(&o));
        let tc = String::from_utf8_lossy(&o.stdout);
        assert!(tc.contains(&format!("\tfile:{file}\t")), "{tc}");
        assert!(
            tc.contains(&format!("\tversion:{}\t", d.manifest["version"].as_str().unwrap())),
            "{tc}"
        );
        assert!(tc.contains(&format!("\texpires:{}\t", d.manifest["expires"].as_str().unwrap())));
        signed += 1;
    }
    // Each artifact, manifest.json and SHA256SUMS.
    assert_eq!(signed, artifacts(&d).len() + 2);
}

#[test]
fn sha256sum_checks_every_artifact() {
    let Some(d) = dist() else { return };
    let Some(sha256sum) = tool("sha256sum") else { return };
    let o = run(Command::new(sha256sum)
        .args(["-c", "--strict", "SHA256SUMS"])
        .current_dir(&d.dir));
    assert!(o.status.success(), "{}", text(&o));
    let ok_lines = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.ends_with(": OK"))
        .count();
    assert_eq!(ok_lines, artifacts(&d).len() + 1, "every artifact and manifest.json");
}

#[test]
fn manifest_describes_the_release() {
    let Some(d) = dist() else { return };
    let m = &d.manifest;
    assert_eq!(m["schema_version"], 1);
    assert_eq!(m["product"], "n-kudo");
    let version = semver::Version::parse(m["version"].as_str().unwrap()).unwrap();
    assert_eq!(
        m["channel"],
        if version.pre.is_empty() {
            "release"
        } else {
            "pre-release"
        }
    );
    assert_eq!(m["git_commit"].as_str().unwrap().len(), 40);
    for key in ["build_date", "expires", "minimum_supported_agent_version"] {
        assert!(m[key].is_string(), "{key}");
    }
    // 3 binaries x 2 architectures, plus the OCI archive.
    assert_eq!(artifacts(&d).len(), 7);
    // Canonical: re-serializing gives the same bytes.
    let bytes = fs::read(d.dir.join("manifest.json")).unwrap();
    let parsed = releaser::manifest::Manifest::from_json(&bytes).unwrap();
    assert_eq!(parsed.to_canonical_json().as_bytes(), bytes.as_slice());
    assert!(d.dir.join("nkudo-release.pub").is_file());
    // The secret key is never in the release directory.
    let secret = fs::read_to_string(&d.key).unwrap();
    let secret_line = secret.lines().nth(1).unwrap();
    for (name, bytes) in files(&d.dir) {
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret_line),
            "{name} contains the secret key"
        );
    }
}

#[test]
fn releaser_verify_accepts_the_release() {
    let Some(d) = dist() else { return };
    let o = run(releaser()
        .arg("verify")
        .arg(&d.dir)
        .arg("--public-key")
        .arg(&d.pubkey)
        .args(["--output", "json"]));
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["verified"].as_array().unwrap().len(), artifacts(&d).len() + 2);
    assert!(report["unlisted"].as_array().unwrap().is_empty(), "{report}");
}

#[test]
fn tarballs_are_deterministic_and_complete() {
    let Some(d) = dist() else { return };
    let build_epoch = chrono::DateTime::parse_from_rfc3339(d.manifest["build_date"].as_str().unwrap())
        .unwrap()
        .timestamp() as u64;
    for a in artifacts(&d).iter().filter(|a| a["kind"] == "tarball") {
        let name = a["name"].as_str().unwrap();
        let bytes = fs::read(d.dir.join(name)).unwrap();
        // Fixed gzip header: no name flag, mtime 0, OS 255.
        assert_eq!(&bytes[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255][..], "{name}");
        let mut tar_bytes = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes.as_slice()), &mut tar_bytes).unwrap();
        let mut ar = tar::Archive::new(tar_bytes.as_slice());
        let mut paths = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{name}: {path}");
            assert_eq!(h.mtime().unwrap(), build_epoch, "{name}: {path}");
            let mode = h.mode().unwrap();
            assert!(mode == 0o755 || mode == 0o644, "{name}: {path} mode {mode:o}");
            paths.push(path);
        }
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted, "{name}: sorted entries");
        let component = a["component"].as_str().unwrap();
        for expected in [format!("bin/{component}"), "LICENSE".into(), "README.md".into()] {
            assert!(paths.contains(&expected), "{name} lacks {expected}: {paths:?}");
        }
        if component != "releaser" {
            assert!(
                paths.contains(&format!("systemd/{component}.service")),
                "{name}: {paths:?}"
            );
            assert!(
                paths.iter().any(|p| p.starts_with("config/") && !p.ends_with('/')),
                "{name}"
            );
        }
        // And the stock tar reads it with numeric owners.
        let o = run(Command::new("tar")
            .arg("--numeric-owner")
            .arg("-tvzf")
            .arg(d.dir.join(name)));
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).lines().all(|l| l.contains(" 0/0 ")),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn skopeo_inspects_the_oci_archive() {
    let Some(d) = dist() else { return };
    let Some(skopeo) = tool("skopeo") else { return };
    let name = artifact_name(&d, "nkudo-control-plane", "oci-image", "multi");
    let reference = format!("oci-archive:{}", d.dir.join(&name).display());
    let version = d.manifest["version"].as_str().unwrap();
    for arch in ["amd64", "arm64"] {
        let o =
            run(Command::new(&skopeo).args(["--override-arch", arch, "--override-os", "linux", "inspect", &reference]));
        assert!(o.status.success(), "skopeo inspect {arch}: {}", text(&o));
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["Architecture"], arch, "{info}");
        assert_eq!(info["Os"], "linux");
        assert_eq!(info["Labels"]["org.opencontainers.image.version"], version, "{info}");
        assert_eq!(
            info["Labels"]["org.opencontainers.image.revision"],
            d.manifest["git_commit"]
        );
        assert_eq!(info["Layers"].as_array().unwrap().len(), 1);
    }
    let o = run(Command::new(&skopeo).args(["inspect", "--config", &reference]));
    assert!(o.status.success(), "{}", text(&o));
    let config: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(config["config"]["User"], "65532:65532", "{config}");
    assert!(config["config"]["ExposedPorts"]["8443/tcp"].is_object(), "{config}");
    let o = run(Command::new(&skopeo).args(["inspect", "--raw", &reference]));
    assert!(o.status.success(), "{}", text(&o));
    let index: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let archs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"], "a multi-arch index: {index}");
}

#[test]
fn systemd_units_verify_and_report_exposure() {
    let Some(d) = dist() else { return };
    let Some(analyze) = tool("systemd-analyze") else { return };
    // A root with the real binaries at the units' ExecStart paths and the host's unit library.
    let root = tempfile::tempdir().unwrap();
    let current = root.path().join("opt/nkudo/current");
    for component in ["nkudo-edge", "nkudo-control-plane"] {
        untar(&d.dir.join(artifact_name(&d, component, "tarball", "amd64")), &current);
    }
    let units = root.path().join("etc/systemd/system");
    fs::create_dir_all(&units).unwrap();
    let o = run(Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(root.path().join("usr/lib/systemd")));
    if !o.status.success() {
        fs::create_dir_all(root.path().join("usr/lib/systemd")).unwrap();
        let o = run(Command::new("cp")
            .arg("-a")
            .arg("/usr/lib/systemd/system")
            .arg(root.path().join("usr/lib/systemd/")));
        assert!(o.status.success(), "{}", text(&o));
    }
    for component in ["nkudo-edge", "nkudo-control-plane"] {
        let unit = format!("{component}.service");
        fs::copy(current.join("systemd").join(&unit), units.join(&unit)).unwrap();
        let o = run(Command::new(&analyze)
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(&unit));
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "systemd-analyze verify {unit}: {}",
            text(&o)
        );
        let o = run(Command::new(&analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--root={}", root.path().display()))
            .arg(&unit));
        let out = text(&o);
        let score = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure score for {unit}: {out}"));
        eprintln!("systemd-analyze security {unit}: {}", score.trim());
        let value: f64 = score
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{score}"));
        assert!(value <= 5.0, "{unit} exposure {value} is above 5.0 (MEDIUM or worse)");
    }
}

/// Whether an ELF file is for aarch64 and statically linked (no PT_INTERP program header).
fn elf_aarch64_static(bytes: &[u8]) -> (bool, bool) {
    assert_eq!(&bytes[..4], b"\x7fELF");
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([bytes[54], bytes[55]]) as usize;
    let phnum = u16::from_le_bytes([bytes[56], bytes[57]]) as usize;
    let has_interp = (0..phnum).any(|i| {
        let off = phoff + i * phentsize;
        u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) == 3
    });
    (machine == 183, !has_interp)
}

#[test]
fn arm64_binaries_run_under_qemu() {
    let Some(d) = dist() else { return };
    let Some(qemu) = tool("qemu-aarch64-static") else {
        return;
    };
    let version = d.manifest["version"].as_str().unwrap();
    let commit = d.manifest["git_commit"].as_str().unwrap();
    let build_date = d.manifest["build_date"].as_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (component, args) in [
        ("nkudo-edge", vec!["version"]),
        ("nkudo-control-plane", vec!["--version"]),
        ("releaser", vec!["version"]),
    ] {
        let into = tmp.path().join(component);
        untar(&d.dir.join(artifact_name(&d, component, "tarball", "arm64")), &into);
        let bin = into.join("bin").join(component);
        let (aarch64, is_static) = elf_aarch64_static(&fs::read(&bin).unwrap());
        assert!(
            aarch64 && is_static,
            "{component}: aarch64 {aarch64}, static {is_static}"
        );
        let o = run(Command::new(&qemu).arg(&bin).args(&args));
        assert!(o.status.success(), "qemu-aarch64 {component} {args:?}: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        eprintln!("qemu-aarch64 {component} {}:\n{out}", args.join(" "));
        assert!(out.starts_with(&format!("{component} ")), "{out}");
        // Binaries wired to nkudo_core::build_info print every field; check them when present (the releaser
        // always is).
        if out.contains("\ncommit: ") || component == "releaser" {
            let expected = format!(
                "{component} {version}\ncommit: {commit}\ntarget: aarch64-unknown-linux-musl\nbuilt: {build_date}\n"
            );
            assert_eq!(out, expected);
        }
    }
}

#[test]
fn amd64_binaries_are_static_and_report_their_build() {
    let Some(d) = dist() else { return };
    let tmp = tempfile::tempdir().unwrap();
    untar(
        &d.dir.join(artifact_name(&d, "releaser", "tarball", "amd64")),
        tmp.path(),
    );
    let o = run(Command::new(tmp.path().join("bin/releaser")).args(["version", "--output", "json"]));
    assert!(o.status.success(), "{}", text(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["version"], d.manifest["version"]);
    assert_eq!(info["git_commit"], d.manifest["git_commit"]);
    assert_eq!(info["build_date"], d.manifest["build_date"]);
    assert_eq!(info["target"], "x86_64-unknown-linux-musl");
}

// --- releaser verify rejects what it must ------------------------------------------------------------------

fn verify(dir: &Path, pubkey: &Path, extra: &[&str]) -> (i32, String) {
    let o = run(releaser()
        .arg("verify")
        .arg(dir)
        .arg("--public-key")
        .arg(pubkey)
        .args(extra));
    (o.status.code().unwrap_or(-1), text(&o))
}

fn flip_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

#[test]
fn verify_rejects_a_flipped_byte_in_each_kind_of_file() {
    let Some(d) = dist() else { return };
    let minisign = tool("minisign");
    let tarball = artifact_name(&d, "nkudo-edge", "tarball", "arm64");
    let oci = artifact_name(&d, "nkudo-control-plane", "oci-image", "multi");
    let cases: Vec<(String, String)> = vec![
        (tarball.clone(), tarball.clone()),
        (oci.clone(), oci.clone()),
        ("manifest.json".into(), "manifest.json".into()),
        ("SHA256SUMS".into(), "SHA256SUMS".into()),
        (format!("{tarball}.minisig"), format!("{tarball}.minisig")),
        ("manifest.json.minisig".into(), "manifest.json.minisig".into()),
    ];
    for (file, named) in cases {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&d.dir, tmp.path());
        flip_byte(&tmp.path().join(&file));
        let (code, out) = verify(tmp.path(), &d.pubkey, &[]);
        assert_eq!(code, 3, "a flipped byte in {file} must fail verification:\n{out}");
        assert!(
            out.lines().any(|l| l.starts_with("FAILED") && l.contains(&named)),
            "the failure names {named}:\n{out}"
        );
        if let (Some(minisign), false) = (&minisign, file.ends_with(".minisig")) {
            let o = run(Command::new(minisign)
                .args(["-V", "-q", "-p"])
                .arg(&d.pubkey)
                .arg("-m")
                .arg(tmp.path().join(&file)));
            assert!(!o.status.success(), "minisign -V accepted a tampered {file}");
        }
    }
}

#[test]
fn verify_rejects_a_signature_by_another_key() {
    let Some(d) = dist() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let o = run(releaser()
        .args(["keygen", "--unencrypted", "--name", "other", "--out-dir"])
        .arg(tmp.path().join("keys")));
    assert!(o.status.success(), "{}", text(&o));
    let dir = tmp.path().join("dist");
    copy_dir(&d.dir, &dir);
    let o = run(releaser()
        .arg("sign")
        .arg("--key")
        .arg(tmp.path().join("keys/other.key"))
        .args([
            "--trusted-comment",
            &format!(
                "file:manifest.json\tversion:{}\thashed",
                d.manifest["version"].as_str().unwrap()
            ),
        ])
        .arg(dir.join("manifest.json")));
    assert!(o.status.success(), "{}", text(&o));
    let (code, out) = verify(&dir, &d.pubkey, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAILED") && l.contains("manifest.json.minisig") && l.contains("another key")),
        "{out}"
    );
    // The other key's own public key accepts that one signature, and nothing else.
    let (code, out) = verify(&dir, &tmp.path().join("keys/other.pub"), &[]);
    assert_eq!(code, 3, "{out}");
}

#[test]
fn verify_rejects_an_expired_manifest() {
    let Some(d) = dist() else { return };
    // The real release, checked after its expiry.
    let (code, out) = verify(&d.dir, &d.pubkey, &["--at", "2999-01-01T00:00:00Z"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("FAILED   manifest.json: expired at"), "{out}");
    // A release built long ago (SOURCE_DATE_EPOCH 2001) with the default 90-day validity.
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("old");
    let o = run(releaser()
        .arg("package")
        .arg("--workspace")
        .arg(workspace())
        .arg("--target-dir")
        .arg(&d.target_dir)
        .arg("--key")
        .arg(&d.key)
        .arg("--out")
        .arg(&out_dir)
        .args(["--version", d.manifest["version"].as_str().unwrap()])
        .args(["--source-date-epoch", "1000000000"]));
    assert!(o.status.success(), "{}", text(&o));
    let (code, out) = verify(&out_dir, &d.pubkey, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("FAILED   manifest.json: expired at 2001-12-08T01:46:40Z"),
        "{out}"
    );
}

#[test]
fn verify_names_a_missing_file() {
    let Some(d) = dist() else { return };
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&d.dir, tmp.path());
    let tarball = artifact_name(&d, "nkudo-control-plane", "tarball", "amd64");
    fs::remove_file(tmp.path().join(&tarball)).unwrap();
    let (code, out) = verify(tmp.path(), &d.pubkey, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains(&format!("FAILED   {tarball}: missing file")), "{out}");
    let (code, out) = verify(tmp.path(), &d.pubkey, &["--output", "json"]);
    assert_eq!(code, 3);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["problems"][0]["file"], tarball.as_str());
}

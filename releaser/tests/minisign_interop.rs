//! Our minisign implementation against the stock `minisign` tool (Debian's minisign 0.11): the known-answer
//! vector of shared/reference/minisign-format.md, and keys in both directions. Without `minisign` on PATH these
//! print a loud SKIPPED line and pass (with CI=true they fail: `cargo xtask test` installs it).

use releaser::minisign::{KeyId, KeyProtection, PublicKey, SecretKey, Signature};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn minisign() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path)
        .map(|d| d.join("minisign"))
        .find(|p| p.is_file());
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
        assert!(!ci, "CI=true but minisign is not installed");
        let bar = "!".repeat(90);
        eprintln!("{bar}\n!!! SKIPPED: minisign is not installed\n{bar}");
    }
    found
}

fn out_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn stock_minisign_accepts_the_known_answer_vector_we_reproduce() {
    let Some(minisign) = minisign() else { return };
    let dir = tempfile::tempdir().unwrap();
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
    let key = SecretKey::from_seed(&seed, KeyId([1, 2, 3, 4, 5, 6, 7, 8]));
    let msg = b"nkudo test vector\n";
    let sig = key
        .sign(
            msg,
            "timestamp:1700000000\tfile:kat.txt\thashed",
            "signature from minisign secret key",
        )
        .unwrap();
    std::fs::write(dir.path().join("kat.txt"), msg).unwrap();
    std::fs::write(dir.path().join("kat.txt.minisig"), sig.to_file_text()).unwrap();
    let o = Command::new(minisign)
        .args([
            "-V",
            "-H",
            "-P",
            "RWQBAgMEBQYHCAOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4",
            "-m",
        ])
        .arg(dir.path().join("kat.txt"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(out_text(&o).contains("Trusted comment: timestamp:1700000000\tfile:kat.txt\thashed"));
}

#[test]
fn stock_minisign_signs_with_our_encrypted_key() {
    let Some(minisign) = minisign() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    // Small scrypt limits keep the test fast; minisign reads them from the file like the defaults.
    let text = key
        .to_file_text(&KeyProtection::Passphrase {
            passphrase: "pass phrase",
            opslimit: 1 << 16,
            memlimit: 1 << 22,
        })
        .unwrap();
    std::fs::write(dir.path().join("k.key"), text.as_bytes()).unwrap();
    std::fs::write(dir.path().join("data"), b"some data").unwrap();
    let mut child = Command::new(&minisign)
        .args(["-S", "-s"])
        .arg(dir.path().join("k.key"))
        .arg("-m")
        .arg(dir.path().join("data"))
        .args(["-t", "signed by stock minisign"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"pass phrase\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "minisign -S: {}", out_text(&o));
    let sig = Signature::from_file_text(&std::fs::read_to_string(dir.path().join("data.minisig")).unwrap()).unwrap();
    key.public_key().verify(&sig, b"some data").unwrap();
    assert_eq!(sig.trusted_comment, "signed by stock minisign");
}

#[test]
fn we_sign_with_a_stock_minisign_key() {
    let Some(minisign) = minisign() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (pk, sk) = (dir.path().join("m.pub"), dir.path().join("m.key"));
    let o = Command::new(&minisign)
        .args(["-G", "-W", "-f", "-p"])
        .arg(&pk)
        .arg("-s")
        .arg(&sk)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "minisign -G: {}", out_text(&o));
    let key = SecretKey::from_file_text(&std::fs::read_to_string(&sk).unwrap(), None).unwrap();
    let public = PublicKey::from_file_text(&std::fs::read_to_string(&pk).unwrap()).unwrap();
    assert_eq!(key.public_key(), public);
    let data = dir.path().join("data");
    std::fs::write(&data, b"more data").unwrap();
    let sig = key.sign(b"more data", "file:data\thashed", "u").unwrap();
    std::fs::write(dir.path().join("data.minisig"), sig.to_file_text()).unwrap();
    let o = Command::new(&minisign)
        .args(["-V", "-H", "-p"])
        .arg(&pk)
        .arg("-m")
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "minisign -V: {}", out_text(&o));
}

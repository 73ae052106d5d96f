//! SHA-256 of artifacts and the `SHA256SUMS` file in the format `sha256sum -c` reads:
//! `<64 lowercase hex><two spaces><file name>\n`, one line per file, sorted by name.

use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::path::Path;

/// SHA-256 and size of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), size))
}

/// SHA-256 of bytes, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The `SHA256SUMS` text for (file name, hex digest) pairs, sorted by name.
pub fn render(entries: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.iter().map(|(name, hash)| format!("{hash}  {name}\n")).collect()
}

/// A line of `SHA256SUMS` that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Parses `SHA256SUMS` (text `  ` or binary ` *` separator) into (file name, hex digest) pairs.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let err = |reason: &str| ParseError {
            line: i + 1,
            reason: reason.to_string(),
        };
        let (hash, rest) = line.split_at_checked(64).ok_or_else(|| err("shorter than a SHA-256"))?;
        if !hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(err("not a lowercase hex SHA-256"));
        }
        let name = rest
            .strip_prefix("  ")
            .or_else(|| rest.strip_prefix(" *"))
            .ok_or_else(|| err("expected two spaces between digest and name"))?;
        if name.is_empty() || name.contains('/') {
            return Err(err("file name empty or not a plain name"));
        }
        out.push((name.to_string(), hash.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sorted_and_parses_back() {
        let a = ("b.tar.gz".to_string(), sha256_hex(b"b"));
        let b = ("a.tar.gz".to_string(), sha256_hex(b"a"));
        let text = render(&[a.clone(), b.clone()]);
        assert!(text.starts_with(&format!("{}  a.tar.gz\n", b.1)));
        assert_eq!(parse(&text).unwrap(), vec![b, a]);
        assert!(parse("xyz  a\n").is_err());
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

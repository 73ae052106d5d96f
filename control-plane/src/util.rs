//! Small shared helpers: clock, RFC 3339 formatting, secrets and their hashes, id validation.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Milliseconds since the Unix epoch (all stored times use this unit).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 in UTC with milliseconds, as every timestamp on the wire.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn rfc3339_opt(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
}

/// 32 random bytes, base64url without padding (43 characters). Never starts with `-`, so that a token passed
/// on a command line (`nkudo-edge enroll --token <token>`) is not taken for a flag.
pub fn random_secret() -> String {
    loop {
        let mut buf = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut buf);
        let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf);
        if !s.starts_with('-') {
            return s;
        }
    }
}

/// Lowercase hex SHA-256: how every secret (API key, enrollment and refresh token) is stored.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Whether `s` is a UUID in its canonical hyphenated form (ids in paths and bodies).
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::parse_str(s).is_ok()
}

/// Constant-time comparison of two secrets.
pub fn secret_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    // Compare fixed-length digests so that the length of the secret does not leak either.
    let da = Sha256::digest(a.as_bytes());
    let db = Sha256::digest(b.as_bytes());
    da.ct_eq(&db).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_ids() {
        let s = random_secret();
        assert_eq!(s.len(), 43);
        assert!(
            (0..2000).all(|_| !random_secret().starts_with('-')),
            "a secret never looks like a flag"
        );
        assert_ne!(s, random_secret());
        assert!(is_uuid(&new_id()));
        assert!(!is_uuid("not-a-uuid"));
        assert!(!is_uuid("00000000000000000000000000000000"));
        assert!(secret_eq("abc", "abc"));
        assert!(!secret_eq("abc", "abd"));
        assert!(!secret_eq("abc", "abcd"));
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}

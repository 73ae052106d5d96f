//! The minisign public key and signature formats (ARCHITECTURE §1): parse, verify (prehashed `ED`), trusted
//! comment fields, and deterministic signing on ed25519-dalek + BLAKE2b (RFC 8032 Ed25519 has no random nonce:
//! the same key, file and trusted comment always give the same `.minisig` bytes, and the stock `minisign -V`
//! accepts them). The edge agent and the control plane verify releases with this module; the secret key file
//! format (scrypt encryption, key generation) lives in the releaser.
//!
//! Format facts (shared/reference/minisign-format.md):
//! * public key: `untrusted comment: ...` then base64(`Ed` ‖ key id(8) ‖ public key(32));
//! * signature: `untrusted comment: ...`, base64(`ED` ‖ key id ‖ Ed25519(BLAKE2b-512(file))),
//!   `trusted comment: T`, base64(Ed25519(sig ‖ T));
//! * secret key: base64(`Ed` ‖ kdf(`Sc` or 0x0000) ‖ `B2` ‖ salt(32) ‖ opslimit LE ‖ memlimit LE ‖
//!   [key id ‖ seed‖pk (64) ‖ BLAKE2b-256 checksum], the bracket XORed with scrypt output when encrypted).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use blake2::{Blake2b512, Digest};
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use std::fmt;
use std::io::Read;

pub const SIG_ALG_LEGACY: [u8; 2] = *b"Ed";
pub const SIG_ALG_PREHASHED: [u8; 2] = *b"ED";
pub const KDF_SCRYPT: [u8; 2] = *b"Sc";
pub const KDF_NONE: [u8; 2] = [0, 0];
pub const CHK_BLAKE2B: [u8; 2] = *b"B2";
pub const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
pub const TRUSTED_PREFIX: &str = "trusted comment: ";
/// minisign's limits: the untrusted comment line (prefix included) and the trusted comment.
pub const MAX_UNTRUSTED_LINE: usize = 1023;
pub const MAX_TRUSTED_COMMENT: usize = 8192 - 18 - 1;

/// What can go wrong reading, decrypting, signing or verifying.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MinisignError {
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("unsupported signature algorithm {0:?} (expected ED, the prehashed minisign algorithm)")]
    UnsupportedAlgorithm(String),
    #[error("signed by key {signature_key} but the trusted key is {trusted_key} (signature by another key)")]
    KeyIdMismatch { signature_key: KeyId, trusted_key: KeyId },
    #[error("signature does not match the file (the file or the signature was altered)")]
    BadSignature,
    #[error("the trusted comment's signature does not verify (the trusted comment was altered)")]
    BadCommentSignature,
    #[error("wrong passphrase, or a corrupted secret key (checksum mismatch)")]
    WrongPassphraseOrCorrupt,
    #[error("the secret key is encrypted: a passphrase is required")]
    PassphraseRequired,
    #[error("invalid comment: {0}")]
    InvalidComment(String),
    #[error("key derivation: {0}")]
    Kdf(String),
}

/// The 8-byte key id, copied into the public key, the secret key and every signature.
/// Shown as minisign does: `%016X` of the bytes read as a little-endian u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

/// A minisign public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub key_id: KeyId,
    pub key: VerifyingKey,
}

impl PublicKey {
    /// Parses the base64 line (what `minisign -P` takes): `RWQ...`.
    pub fn from_base64(line: &str) -> Result<Self, MinisignError> {
        let raw = decode_b64("public key", line.trim())?;
        if raw.len() != 42 {
            return Err(malformed("public key", format!("{} bytes, expected 42", raw.len())));
        }
        if raw[..2] != SIG_ALG_LEGACY {
            return Err(MinisignError::UnsupportedAlgorithm(
                String::from_utf8_lossy(&raw[..2]).into(),
            ));
        }
        let key_id = KeyId(raw[2..10].try_into().expect("8 bytes"));
        let bytes: [u8; 32] = raw[10..42].try_into().expect("32 bytes");
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|e| malformed("public key", format!("not an Ed25519 point: {e}")))?;
        Ok(PublicKey { key_id, key })
    }

    /// Parses a public key file (two lines; the first is an untrusted comment).
    pub fn from_file_text(text: &str) -> Result<Self, MinisignError> {
        let mut lines = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
        let first = lines
            .next()
            .ok_or_else(|| malformed("public key file", "empty".into()))?;
        if !first.starts_with(UNTRUSTED_PREFIX) {
            // Also accept the bare base64 line.
            return Self::from_base64(first);
        }
        let second = lines
            .next()
            .ok_or_else(|| malformed("public key file", "missing the key line".into()))?;
        Self::from_base64(second)
    }

    pub fn to_base64(&self) -> String {
        let mut raw = Vec::with_capacity(42);
        raw.extend_from_slice(&SIG_ALG_LEGACY);
        raw.extend_from_slice(&self.key_id.0);
        raw.extend_from_slice(self.key.as_bytes());
        B64.encode(raw)
    }

    /// The two-line file `minisign -G` writes.
    pub fn to_file_text(&self) -> String {
        format!(
            "{UNTRUSTED_PREFIX}minisign public key {}\n{}\n",
            self.key_id,
            self.to_base64()
        )
    }

    /// Verifies `signature` over `data`: algorithm, key id, the file signature, then the trusted comment's.
    pub fn verify(&self, signature: &Signature, data: &[u8]) -> Result<(), MinisignError> {
        self.verify_prehashed(signature, &blake2b512(data))
    }

    /// Like [`PublicKey::verify`] for a file read as a stream.
    pub fn verify_reader(&self, signature: &Signature, reader: impl Read) -> Result<(), std::io::Error> {
        let digest = blake2b512_reader(reader)?;
        self.verify_prehashed(signature, &digest)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Verifies against the BLAKE2b-512 digest of the file.
    pub fn verify_prehashed(&self, signature: &Signature, digest: &[u8; 64]) -> Result<(), MinisignError> {
        if signature.algorithm != SIG_ALG_PREHASHED {
            return Err(MinisignError::UnsupportedAlgorithm(
                String::from_utf8_lossy(&signature.algorithm).into(),
            ));
        }
        if signature.key_id != self.key_id {
            return Err(MinisignError::KeyIdMismatch {
                signature_key: signature.key_id,
                trusted_key: self.key_id,
            });
        }
        let sig = ed25519_dalek::Signature::from_bytes(&signature.signature);
        self.key.verify(digest, &sig).map_err(|_| MinisignError::BadSignature)?;
        let global = ed25519_dalek::Signature::from_bytes(&signature.global_signature);
        self.key
            .verify(
                &global_message(&signature.signature, &signature.trusted_comment),
                &global,
            )
            .map_err(|_| MinisignError::BadCommentSignature)
    }
}

/// A parsed `.minisig` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub untrusted_comment: String,
    pub algorithm: [u8; 2],
    pub key_id: KeyId,
    pub signature: [u8; 64],
    pub trusted_comment: String,
    pub global_signature: [u8; 64],
}

impl Signature {
    /// Parses the four-line signature file, as `minisign -V` does (a trailing CR on a line is ignored).
    pub fn from_file_text(text: &str) -> Result<Self, MinisignError> {
        let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let what = "signature file";
        let l1 = lines.next().unwrap_or("");
        let untrusted = l1
            .strip_prefix(UNTRUSTED_PREFIX)
            .ok_or_else(|| malformed(what, "line 1 is not an untrusted comment".into()))?;
        let l2 = lines.next().ok_or_else(|| malformed(what, "missing line 2".into()))?;
        let raw = decode_b64(what, l2)?;
        if raw.len() != 74 {
            return Err(malformed(
                what,
                format!("signature is {} bytes, expected 74", raw.len()),
            ));
        }
        let l3 = lines
            .next()
            .ok_or_else(|| malformed(what, "trusted comment not present".into()))?;
        let trusted = l3
            .strip_prefix(TRUSTED_PREFIX)
            .ok_or_else(|| malformed(what, "trusted comment not present".into()))?;
        let l4 = lines
            .next()
            .ok_or_else(|| malformed(what, "missing the comment signature".into()))?;
        let global = decode_b64(what, l4)?;
        if global.len() != 64 {
            return Err(malformed(
                what,
                format!("comment signature is {} bytes, expected 64", global.len()),
            ));
        }
        if lines.any(|l| !l.is_empty()) {
            return Err(malformed(what, "text after line 4".into()));
        }
        Ok(Signature {
            untrusted_comment: untrusted.to_string(),
            algorithm: raw[..2].try_into().expect("2 bytes"),
            key_id: KeyId(raw[2..10].try_into().expect("8 bytes")),
            signature: raw[10..74].try_into().expect("64 bytes"),
            trusted_comment: trusted.to_string(),
            global_signature: global.try_into().expect("64 bytes"),
        })
    }

    pub fn to_file_text(&self) -> String {
        let mut raw = Vec::with_capacity(74);
        raw.extend_from_slice(&self.algorithm);
        raw.extend_from_slice(&self.key_id.0);
        raw.extend_from_slice(&self.signature);
        format!(
            "{UNTRUSTED_PREFIX}{}\n{}\n{TRUSTED_PREFIX}{}\n{}\n",
            self.untrusted_comment,
            B64.encode(raw),
            self.trusted_comment,
            B64.encode(self.global_signature)
        )
    }

    /// The trusted comment's `key:value` fields (tab-separated, as minisign writes them); a field without a
    /// colon (minisign's `hashed`) maps to an empty value.
    pub fn trusted_fields(&self) -> Vec<(&str, &str)> {
        self.trusted_comment
            .split('\t')
            .filter(|f| !f.is_empty())
            .map(|f| f.split_once(':').unwrap_or((f, "")))
            .collect()
    }

    /// The value of one trusted comment field.
    pub fn trusted_field(&self, key: &str) -> Option<&str> {
        self.trusted_fields()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// Signs a BLAKE2b-512 file digest (prehashed `ED`) with `signing` under `key_id`. Deterministic.
pub fn sign_prehashed(
    signing: &SigningKey,
    key_id: KeyId,
    digest: &[u8; 64],
    trusted_comment: &str,
    untrusted_comment: &str,
) -> Result<Signature, MinisignError> {
    check_trusted_comment(trusted_comment)?;
    check_untrusted_comment(untrusted_comment)?;
    let signature = signing.sign(digest).to_bytes();
    let global_signature = signing.sign(&global_message(&signature, trusted_comment)).to_bytes();
    Ok(Signature {
        untrusted_comment: untrusted_comment.to_string(),
        algorithm: SIG_ALG_PREHASHED,
        key_id,
        signature,
        trusted_comment: trusted_comment.to_string(),
        global_signature,
    })
}

/// BLAKE2b-512 of a byte string (the `ED` prehash).
pub fn blake2b512(data: &[u8]) -> [u8; 64] {
    Blake2b512::digest(data).into()
}

/// BLAKE2b-512 of a stream.
pub fn blake2b512_reader(mut reader: impl Read) -> std::io::Result<[u8; 64]> {
    let mut hasher = Blake2b512::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// What the trusted comment's signature covers: the file signature followed by the comment.
pub fn global_message(signature: &[u8; 64], trusted_comment: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + trusted_comment.len());
    m.extend_from_slice(signature);
    m.extend_from_slice(trusted_comment.as_bytes());
    m
}

/// Refuses a trusted comment minisign would not write (too long, control characters).
pub fn check_trusted_comment(c: &str) -> Result<(), MinisignError> {
    if c.len() > MAX_TRUSTED_COMMENT {
        return Err(MinisignError::InvalidComment(format!(
            "trusted comment longer than {MAX_TRUSTED_COMMENT} bytes"
        )));
    }
    // Tab, printable ASCII and non-control UTF-8 only (what minisign master accepts); no line breaks.
    if c.chars().any(|ch| ch != '\t' && ch.is_control()) {
        return Err(MinisignError::InvalidComment(
            "trusted comment has a control character".into(),
        ));
    }
    Ok(())
}

/// Refuses an untrusted comment minisign would not write.
pub fn check_untrusted_comment(c: &str) -> Result<(), MinisignError> {
    if UNTRUSTED_PREFIX.len() + c.len() > MAX_UNTRUSTED_LINE {
        return Err(MinisignError::InvalidComment("untrusted comment too long".into()));
    }
    if c.chars().any(|ch| ch != '\t' && ch.is_control()) {
        return Err(MinisignError::InvalidComment(
            "untrusted comment has a control character".into(),
        ));
    }
    Ok(())
}

/// Base64 (standard alphabet) to bytes, as a [`MinisignError::Malformed`] on failure.
pub fn decode_b64(what: &'static str, s: &str) -> Result<Vec<u8>, MinisignError> {
    B64.decode(s.trim_end())
        .map_err(|e| malformed(what, format!("bad base64: {e}")))
}

/// A [`MinisignError::Malformed`].
pub fn malformed(what: &'static str, reason: String) -> MinisignError {
    MinisignError::Malformed { what, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_without_the_releaser() {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let pk = PublicKey {
            key_id: KeyId([1, 2, 3, 4, 5, 6, 7, 8]),
            key: signing.verifying_key(),
        };
        let sig = sign_prehashed(&signing, pk.key_id, &blake2b512(b"data"), "timestamp:1\tfile:x", "c").unwrap();
        let parsed = Signature::from_file_text(&sig.to_file_text()).unwrap();
        assert_eq!(parsed, sig);
        pk.verify(&parsed, b"data").unwrap();
        assert_eq!(pk.verify(&parsed, b"other"), Err(MinisignError::BadSignature));
        assert_eq!(parsed.trusted_field("file"), Some("x"));
        assert_eq!(PublicKey::from_file_text(&pk.to_file_text()).unwrap(), pk);
        let mut forged = parsed.clone();
        forged.trusted_comment = "timestamp:2\tfile:x".into();
        assert_eq!(pk.verify(&forged, b"data"), Err(MinisignError::BadCommentSignature));
    }
}

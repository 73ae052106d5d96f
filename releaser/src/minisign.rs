//! minisign secret keys: generation, the secret key file (scrypt-encrypted or clear, as `minisign -G` writes
//! it) and signing. Public keys, signatures, verification and trusted comments are `nkudo_core::minisign`,
//! re-exported here so that `releaser::minisign::*` names the whole format.
//!
//! Secret key format: base64(`Ed` ‖ kdf(`Sc` or 0x0000) ‖ `B2` ‖ salt(32) ‖ opslimit LE ‖ memlimit LE ‖
//! [key id ‖ seed‖pk (64) ‖ BLAKE2b-256 checksum]), the bracket XORed with scrypt output when encrypted.

pub use nkudo_core::minisign::*;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use ed25519_dalek::SigningKey;
use rand::RngCore as _;
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// libsodium's "sensitive" scrypt limits, what `minisign -G` uses (N = 2^20, r = 8, p = 1: 1 GiB, a few seconds).
pub const DEFAULT_OPSLIMIT: u64 = 33_554_432;
pub const DEFAULT_MEMLIMIT: u64 = 1_073_741_824;

/// A minisign secret key (Ed25519 seed plus key id). The key bytes are zeroized on drop by ed25519-dalek.
pub struct SecretKey {
    pub key_id: KeyId,
    signing: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        write!(f, "SecretKey {{ key_id: {}, .. }}", self.key_id)
    }
}

/// How a secret key file is protected when written.
pub enum KeyProtection<'a> {
    /// scrypt-encrypted with this passphrase and these limits (libsodium opslimit/memlimit, as minisign).
    Passphrase {
        passphrase: &'a str,
        opslimit: u64,
        memlimit: u64,
    },
    /// Stored in clear (`minisign -W`): for CI, where the key comes from a secret environment variable.
    Unencrypted,
}

impl SecretKey {
    /// A new random key pair (seed and key id from the OS RNG).
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        let mut id = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(seed.as_mut());
        rand::rngs::OsRng.fill_bytes(&mut id);
        Self::from_seed(&seed, KeyId(id))
    }

    /// A key from a known seed and key id (tests, known-answer vectors).
    pub fn from_seed(seed: &[u8; 32], key_id: KeyId) -> Self {
        SecretKey {
            key_id,
            signing: SigningKey::from_bytes(seed),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key_id: self.key_id,
            key: self.signing.verifying_key(),
        }
    }

    /// Whether a secret key file needs a passphrase.
    pub fn file_is_encrypted(text: &str) -> Result<bool, MinisignError> {
        let raw = decode_secret_key_line(text)?;
        Ok(raw[2..4] == KDF_SCRYPT)
    }

    /// Parses (and, with `Sc`, decrypts) a secret key file. `passphrase` is ignored for unencrypted keys.
    pub fn from_file_text(text: &str, passphrase: Option<&str>) -> Result<Self, MinisignError> {
        let mut raw = decode_secret_key_line(text)?;
        if raw[..2] != SIG_ALG_LEGACY {
            return Err(MinisignError::UnsupportedAlgorithm(
                String::from_utf8_lossy(&raw[..2]).into(),
            ));
        }
        if raw[4..6] != CHK_BLAKE2B {
            return Err(malformed("secret key", "unknown checksum algorithm".into()));
        }
        let kdf: [u8; 2] = raw[2..4].try_into().expect("2 bytes");
        if kdf == KDF_SCRYPT {
            let passphrase = passphrase.ok_or(MinisignError::PassphraseRequired)?;
            let salt: [u8; 32] = raw[6..38].try_into().expect("32 bytes");
            let opslimit = u64::from_le_bytes(raw[38..46].try_into().expect("8 bytes"));
            let memlimit = u64::from_le_bytes(raw[46..54].try_into().expect("8 bytes"));
            let stream = kdf_stream(passphrase, &salt, opslimit, memlimit)?;
            for (b, k) in raw[54..158].iter_mut().zip(stream.iter()) {
                *b ^= k;
            }
        } else if kdf != KDF_NONE {
            return Err(malformed("secret key", "unknown key derivation algorithm".into()));
        }
        let key_id = KeyId(raw[54..62].try_into().expect("8 bytes"));
        let mut sk64 = Zeroizing::new([0u8; 64]);
        sk64.copy_from_slice(&raw[62..126]);
        let checksum = &raw[126..158];
        // `minisign -G -W` (0.11) leaves the checksum of an unencrypted key all zero; the public half of the
        // key is still checked against the seed below.
        let unchecked = kdf == KDF_NONE && checksum.iter().all(|&b| b == 0);
        if !unchecked && checksum != secret_key_checksum(&key_id, &sk64).as_slice() {
            raw.zeroize();
            return Err(MinisignError::WrongPassphraseOrCorrupt);
        }
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(sk64[..32].try_into().expect("32 bytes"));
        let key = SecretKey::from_seed(&seed, key_id);
        raw.zeroize();
        if key.signing.verifying_key().as_bytes() != &sk64[32..] {
            return Err(MinisignError::WrongPassphraseOrCorrupt);
        }
        Ok(key)
    }

    /// The secret key file (`minisign -G` format), encrypted or not.
    pub fn to_file_text(&self, protection: &KeyProtection<'_>) -> Result<Zeroizing<String>, MinisignError> {
        let mut salt = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let (kdf, opslimit, memlimit, comment) = match protection {
            KeyProtection::Passphrase { opslimit, memlimit, .. } => {
                (KDF_SCRYPT, *opslimit, *memlimit, "minisign encrypted secret key")
            }
            KeyProtection::Unencrypted => (KDF_NONE, DEFAULT_OPSLIMIT, DEFAULT_MEMLIMIT, "minisign secret key"),
        };
        let mut raw = Zeroizing::new(Vec::with_capacity(158));
        raw.extend_from_slice(&SIG_ALG_LEGACY);
        raw.extend_from_slice(&kdf);
        raw.extend_from_slice(&CHK_BLAKE2B);
        raw.extend_from_slice(&salt);
        raw.extend_from_slice(&opslimit.to_le_bytes());
        raw.extend_from_slice(&memlimit.to_le_bytes());
        let mut sk64 = Zeroizing::new([0u8; 64]);
        sk64[..32].copy_from_slice(self.signing.as_bytes());
        sk64[32..].copy_from_slice(self.signing.verifying_key().as_bytes());
        raw.extend_from_slice(&self.key_id.0);
        raw.extend_from_slice(sk64.as_ref());
        raw.extend_from_slice(&secret_key_checksum(&self.key_id, &sk64));
        if let KeyProtection::Passphrase { passphrase, .. } = protection {
            let stream = kdf_stream(passphrase, &salt, opslimit, memlimit)?;
            for (b, k) in raw[54..158].iter_mut().zip(stream.iter()) {
                *b ^= k;
            }
        }
        Ok(Zeroizing::new(format!(
            "{UNTRUSTED_PREFIX}{comment}\n{}\n",
            B64.encode(raw.as_slice())
        )))
    }

    /// Signs `data` (prehashed `ED`) with this trusted comment and untrusted comment. Deterministic.
    pub fn sign(
        &self,
        data: &[u8],
        trusted_comment: &str,
        untrusted_comment: &str,
    ) -> Result<Signature, MinisignError> {
        self.sign_prehashed(&blake2b512(data), trusted_comment, untrusted_comment)
    }

    /// Signs the BLAKE2b-512 digest of a file (see [`blake2b512_reader`]).
    pub fn sign_prehashed(
        &self,
        digest: &[u8; 64],
        trusted_comment: &str,
        untrusted_comment: &str,
    ) -> Result<Signature, MinisignError> {
        sign_prehashed(&self.signing, self.key_id, digest, trusted_comment, untrusted_comment)
    }
}

fn secret_key_checksum(key_id: &KeyId, sk64: &[u8; 64]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    h.update(SIG_ALG_LEGACY);
    h.update(key_id.0);
    h.update(sk64);
    h.finalize().into()
}

/// The 104-byte scrypt stream that encrypts the secret part, with libsodium's opslimit/memlimit mapping
/// (`crypto_pwhash_scryptsalsa208sha256`'s pickparams), as minisign does.
fn kdf_stream(
    passphrase: &str,
    salt: &[u8; 32],
    opslimit: u64,
    memlimit: u64,
) -> Result<Zeroizing<[u8; 104]>, MinisignError> {
    let (log_n, r, p) = pick_scrypt_params(opslimit, memlimit);
    // `len` only matters for PHC strings; the output length is the buffer's.
    let params = scrypt::Params::new(log_n, r, p, scrypt::Params::RECOMMENDED_LEN)
        .map_err(|e| MinisignError::Kdf(e.to_string()))?;
    let mut out = Zeroizing::new([0u8; 104]);
    scrypt::scrypt(passphrase.as_bytes(), salt, &params, out.as_mut())
        .map_err(|e| MinisignError::Kdf(e.to_string()))?;
    Ok(out)
}

/// libsodium's `pickparams` (crypto_pwhash/scryptsalsa208sha256/pwhash_scryptsalsa208sha256.c).
pub fn pick_scrypt_params(opslimit: u64, memlimit: u64) -> (u8, u32, u32) {
    let opslimit = opslimit.max(32_768);
    let r: u32 = 8;
    let mut log_n: u8 = 1;
    if opslimit < memlimit / 32 {
        let max_n = opslimit / (u64::from(r) * 4);
        while log_n < 63 && (1u64 << log_n) <= max_n / 2 {
            log_n += 1;
        }
        (log_n, r, 1)
    } else {
        let max_n = memlimit / (u64::from(r) * 128);
        while log_n < 63 && (1u64 << log_n) <= max_n / 2 {
            log_n += 1;
        }
        let max_rp = ((opslimit / 4) / (1u64 << log_n)).min(0x3fff_ffff);
        let p = (max_rp as u32 / r).max(1);
        (log_n, r, p)
    }
}

fn decode_secret_key_line(text: &str) -> Result<Zeroizing<Vec<u8>>, MinisignError> {
    let mut lines = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    let mut line = lines.next().unwrap_or("");
    if line.starts_with(UNTRUSTED_PREFIX) {
        line = lines.next().unwrap_or("");
    }
    let raw = Zeroizing::new(decode_b64("secret key", line.trim())?);
    if raw.len() != 158 {
        return Err(malformed("secret key", format!("{} bytes, expected 158", raw.len())));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kat_key() -> SecretKey {
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        SecretKey::from_seed(&seed, KeyId([1, 2, 3, 4, 5, 6, 7, 8]))
    }

    const KAT_SIG: &str = "untrusted comment: signature from minisign secret key
RUQBAgMEBQYHCNt01HEnUt5Ui6MWb+7LIfXuMDHWcPvpMTQFSrQbVR1LKat9FWE3awD+eXEL+3prWIA8X0SVysKdYieA+IS6iAk=
trusted comment: timestamp:1700000000\tfile:kat.txt\thashed
qoA8jQpED1vsx3y9nm6g53WqTIMtkuWF3+NOLATf/+RCN0fkcXs9BhekNGFxv9TreueyzTgsJEPO/ItEd65PBQ==
";

    #[test]
    fn known_answer_vector() {
        let key = kat_key();
        let pk = key.public_key();
        assert_eq!(
            hex::encode(pk.key.as_bytes()),
            "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
        );
        assert_eq!(
            pk.to_base64(),
            "RWQBAgMEBQYHCAOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4"
        );
        assert_eq!(pk.key_id.to_string(), "0807060504030201");
        let msg = b"nkudo test vector\n";
        assert_eq!(
            hex::encode(blake2b512(msg)),
            "aec8c0ba9ceb316168f1c686c19e641b845d4ffc362b87fc841745d97bf69ec8ce301908a8d30e5cc84bbb5731b0e28e5f050b09b56b8ff22ac067ef65745f03"
        );
        let sig = key
            .sign(
                msg,
                "timestamp:1700000000\tfile:kat.txt\thashed",
                "signature from minisign secret key",
            )
            .unwrap();
        assert_eq!(sig.to_file_text(), KAT_SIG);
        let parsed = Signature::from_file_text(KAT_SIG).unwrap();
        assert_eq!(parsed, sig);
        pk.verify(&parsed, msg).unwrap();
        assert_eq!(parsed.trusted_field("file"), Some("kat.txt"));
        assert_eq!(parsed.trusted_field("hashed"), Some(""));
    }

    #[test]
    fn rejects_tampering_and_other_keys() {
        let key = kat_key();
        let pk = key.public_key();
        let sig = Signature::from_file_text(KAT_SIG).unwrap();
        assert_eq!(pk.verify(&sig, b"nkudo test vector!"), Err(MinisignError::BadSignature));
        let mut edited = sig.clone();
        edited.trusted_comment.push('x');
        assert_eq!(
            pk.verify(&edited, b"nkudo test vector\n"),
            Err(MinisignError::BadCommentSignature)
        );
        let other = SecretKey::generate().public_key();
        assert!(matches!(
            other.verify(&sig, b"nkudo test vector\n"),
            Err(MinisignError::KeyIdMismatch { .. })
        ));
        // CRLF signature files verify too.
        let crlf = KAT_SIG.replace('\n', "\r\n");
        pk.verify(&Signature::from_file_text(&crlf).unwrap(), b"nkudo test vector\n")
            .unwrap();
        // No final newline after line 4.
        pk.verify(
            &Signature::from_file_text(KAT_SIG.trim_end()).unwrap(),
            b"nkudo test vector\n",
        )
        .unwrap();
        assert!(Signature::from_file_text("untrusted comment: x\nRUQ=\n").is_err());
    }

    #[test]
    fn public_key_file_round_trip() {
        let pk = kat_key().public_key();
        let text = pk.to_file_text();
        assert_eq!(
            text,
            "untrusted comment: minisign public key 0807060504030201\nRWQBAgMEBQYHCAOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4\n"
        );
        assert_eq!(PublicKey::from_file_text(&text).unwrap(), pk);
        assert_eq!(PublicKey::from_base64(&pk.to_base64()).unwrap(), pk);
    }

    #[test]
    fn secret_key_round_trips_encrypted_and_clear() {
        let key = SecretKey::generate();
        let clear = key.to_file_text(&KeyProtection::Unencrypted).unwrap();
        assert!(!SecretKey::file_is_encrypted(&clear).unwrap());
        let back = SecretKey::from_file_text(&clear, None).unwrap();
        assert_eq!(back.public_key(), key.public_key());

        // Small limits keep the test fast; they are stored in the file like the defaults.
        let enc = key
            .to_file_text(&KeyProtection::Passphrase {
                passphrase: "correct horse",
                opslimit: 32_768,
                memlimit: 1 << 20,
            })
            .unwrap();
        assert!(SecretKey::file_is_encrypted(&enc).unwrap());
        assert_eq!(
            SecretKey::from_file_text(&enc, None).unwrap_err(),
            MinisignError::PassphraseRequired
        );
        assert_eq!(
            SecretKey::from_file_text(&enc, Some("wrong")).unwrap_err(),
            MinisignError::WrongPassphraseOrCorrupt
        );
        let back = SecretKey::from_file_text(&enc, Some("correct horse")).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        assert!(!format!("{back:?}").contains(&hex::encode(key.signing.as_bytes())));
    }

    #[test]
    fn reads_minisign_w_keys_with_a_zero_checksum() {
        let key = SecretKey::generate();
        let text = key.to_file_text(&KeyProtection::Unencrypted).unwrap();
        let mut raw = B64.decode(text.lines().nth(1).unwrap()).unwrap();
        raw[126..158].fill(0);
        let zeroed = format!("untrusted comment: x\n{}\n", B64.encode(&raw));
        assert_eq!(
            SecretKey::from_file_text(&zeroed, None).unwrap().public_key(),
            key.public_key()
        );
        // A wrong seed is still caught through the public half.
        raw[62] ^= 1;
        let broken = format!("untrusted comment: x\n{}\n", B64.encode(&raw));
        assert!(SecretKey::from_file_text(&broken, None).is_err());
    }

    #[test]
    fn libsodium_param_mapping() {
        // minisign's defaults: N = 2^20, r = 8, p = 1.
        assert_eq!(pick_scrypt_params(DEFAULT_OPSLIMIT, DEFAULT_MEMLIMIT), (20, 8, 1));
        assert_eq!(pick_scrypt_params(32_768, 1 << 20), (10, 8, 1));
    }

    #[test]
    fn refuses_control_characters_in_comments() {
        let key = kat_key();
        assert!(key.sign(b"x", "a\nb", "u").is_err());
        assert!(key.sign(b"x", "a\tb", "u").is_ok());
    }
}

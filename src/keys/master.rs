//! The master key: 32 random bytes, base64, from `LATCHKEY_MASTER_KEY` or a key file.
//! It seals (AES-256-GCM) everything secret the broker stores.

use crate::secret::{Secret, SecretBytes};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;
use std::path::Path;

/// Environment variable holding the base64 master key.
pub const MASTER_KEY_ENV: &str = "LATCHKEY_MASTER_KEY";

/// Why the master key could not be had. Never contains key bytes.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// Neither the environment variable nor a key file provides one.
    #[error("no master key: set {MASTER_KEY_ENV} or store.master_key_file (generate one with `latchkey keygen`)")]
    Missing,
    /// Not base64 of exactly 32 bytes.
    #[error("master key from {0} is malformed: expected base64 of exactly 32 bytes")]
    Malformed(String),
    /// The key file could not be read.
    #[error("cannot read master key file {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The AES-256-GCM master key. `Debug` shows nothing.
pub struct MasterKey {
    key: LessSafeKey,
    raw: SecretBytes,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

/// Sealed data could not be opened (wrong key, wrong associated data, or tampered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenError;

impl MasterKey {
    fn from_bytes(bytes: Vec<u8>, origin: &str) -> Result<MasterKey, MasterKeyError> {
        let raw = Secret::new(bytes);
        if raw.expose().len() != 32 {
            return Err(MasterKeyError::Malformed(origin.into()));
        }
        let key = UnboundKey::new(&AES_256_GCM, raw.expose())
            .map_err(|_| MasterKeyError::Malformed(origin.into()))?;
        Ok(MasterKey {
            key: LessSafeKey::new(key),
            raw,
        })
    }

    /// Parses base64 (standard alphabet, padding optional; surrounding whitespace
    /// ignored). Fails unless it decodes to exactly 32 bytes.
    pub fn from_base64(text: &str, origin: &str) -> Result<MasterKey, MasterKeyError> {
        let t = text.trim();
        let bytes = STANDARD
            .decode(t)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(t))
            .map_err(|_| MasterKeyError::Malformed(origin.into()))?;
        MasterKey::from_bytes(bytes, origin)
    }

    /// A second handle on the same key (for components that outlive the caller's borrow).
    pub fn duplicate(&self) -> MasterKey {
        // The bytes were accepted once, so they are accepted again.
        match MasterKey::from_bytes(self.raw.expose().clone(), "copy") {
            Ok(k) => k,
            Err(_) => unreachable!("a valid master key is valid again"),
        }
    }

    /// `LATCHKEY_MASTER_KEY` if set, else the file, else `Missing`.
    pub fn load(file: Option<&Path>) -> Result<MasterKey, MasterKeyError> {
        if let Ok(v) = std::env::var(MASTER_KEY_ENV) {
            let v = Secret::new(v);
            return MasterKey::from_base64(v.expose(), MASTER_KEY_ENV);
        }
        match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| MasterKeyError::Unreadable {
                    path: p.display().to_string(),
                    reason: e.kind().to_string(),
                })?;
                let text = Secret::new(text);
                MasterKey::from_base64(text.expose(), &p.display().to_string())
            }
            None => Err(MasterKeyError::Missing),
        }
    }

    /// A fresh random key.
    pub fn generate() -> MasterKey {
        let mut b = vec![0u8; 32];
        // The system RNG failing is a startup invariant violation we cannot continue past.
        SystemRandom::new()
            .fill(&mut b)
            .expect("system random number generator");
        MasterKey::from_bytes(b, "generated").expect("32 bytes")
    }

    /// The key as base64 (for `keygen` and `dev` to write a key file).
    pub fn to_base64(&self) -> Secret<String> {
        Secret::new(STANDARD.encode(self.raw.expose()))
    }

    /// Encrypts `plain`, binding it to `aad`. Output: nonce || ciphertext || tag.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("system random number generator");
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .expect("AES-GCM sealing cannot fail for in-memory buffers of this size");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        buf.iter_mut().for_each(|b| *b = 0);
        out
    }

    /// Decrypts what [`MasterKey::seal`] produced with the same `aad`. Fails for a wrong
    /// key, wrong associated data or any tampering.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretBytes, OpenError> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(OpenError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| OpenError)?;
        let out = plain.to_vec();
        buf.iter_mut().for_each(|b| *b = 0);
        Ok(Secret::new(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let k = MasterKey::generate();
        let sealed = k.seal(b"private key", b"row-1");
        assert_eq!(k.open(&sealed, b"row-1").unwrap().expose(), b"private key");
        assert!(k.open(&sealed, b"row-2").is_err());
        let mut t = sealed.clone();
        t[20] ^= 1;
        assert!(k.open(&t, b"row-1").is_err());
        assert!(k.open(&sealed[..10], b"row-1").is_err());
        assert!(MasterKey::generate().open(&sealed, b"row-1").is_err());
    }

    #[test]
    fn parsing_and_redaction() {
        let k = MasterKey::generate();
        let b64 = k.to_base64();
        let again = MasterKey::from_base64(&format!("  {}\n", b64.expose()), "test").unwrap();
        assert_eq!(again.open(&k.seal(b"x", b""), b"").unwrap().expose(), b"x");
        assert!(matches!(
            MasterKey::from_base64("c2hvcnQ=", "env"),
            Err(MasterKeyError::Malformed(_))
        ));
        assert!(matches!(
            MasterKey::from_base64("!!!", "env"),
            Err(MasterKeyError::Malformed(_))
        ));
        let shown = format!("{k:?} {b64:?}");
        assert!(!shown.contains(b64.expose().as_str()));
        let err = MasterKey::from_base64("c2hvcnQ=", "LATCHKEY_MASTER_KEY")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("c2hvcnQ"), "{err}");
    }

    #[test]
    fn unreadable_file_is_a_clear_error() {
        std::env::remove_var(MASTER_KEY_ENV);
        let e = MasterKey::load(Some(Path::new("/nonexistent/latchkey.key"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/latchkey.key"), "{e}");
    }
}

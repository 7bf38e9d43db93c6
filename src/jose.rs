//! The small part of JOSE that Latchkey needs: algorithms, base64url, compact JWS
//! signing with ring, and public keys as JWKs.
//!
//! Verification of caller tokens lives in [`crate::identity`]; this module is shared
//! by the broker's own key ring and by the development issuer.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};
use std::fmt;

/// A JWS signature algorithm Latchkey understands. `none` and HMAC are deliberately absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

/// The key family an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    /// RSA keys (`kty` = `RSA`).
    Rsa,
    /// NIST P-256 (`kty` = `EC`, `crv` = `P-256`).
    P256,
    /// NIST P-384.
    P384,
    /// Ed25519 (`kty` = `OKP`, `crv` = `Ed25519`).
    Ed25519,
}

impl Alg {
    /// Parses a JOSE algorithm name. Fails for unknown names, `none` and HMAC.
    pub fn parse(s: &str) -> Option<Alg> {
        Some(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            _ => return None,
        })
    }

    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::EdDSA => "EdDSA",
        }
    }

    /// The key family this algorithm signs with.
    pub fn family(self) -> KeyFamily {
        match self {
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
                KeyFamily::Rsa
            }
            Alg::ES256 => KeyFamily::P256,
            Alg::ES384 => KeyFamily::P384,
            Alg::EdDSA => KeyFamily::Ed25519,
        }
    }

    /// ring's RSA parameters, for RSA algorithms.
    pub fn rsa_params(self) -> Option<&'static signature::RsaParameters> {
        Some(match self {
            Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Alg::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Alg::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Alg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
            Alg::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
            Alg::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
            _ => return None,
        })
    }

    /// ring's verification algorithm for this JOSE algorithm.
    pub fn verification(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Alg::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Alg::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Alg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
            Alg::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
            Alg::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
            Alg::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
            Alg::ES384 => &signature::ECDSA_P384_SHA384_FIXED,
            Alg::EdDSA => &signature::ED25519,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encodes bytes as unpadded base64url.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes unpadded base64url; `None` on any non-alphabet character or padding.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

/// SHA-256 of `bytes`, hex-encoded: the fingerprint form used in audit records.
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes.as_ref());
    hex(d.as_ref())
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize]);
        s.push(HEX[(b & 15) as usize]);
    }
    // Bytes, not chars: no per-character UTF-8 encoding (this runs on the store's one
    // writer thread for every record's hash).
    String::from_utf8(s).unwrap_or_default()
}

/// Errors from key generation, loading and signing.
#[derive(Debug, thiserror::Error)]
pub enum JoseError {
    /// Key material could not be generated or parsed.
    #[error("invalid key material for {0}")]
    Key(Alg),
    /// The signature could not be produced.
    #[error("signing failed")]
    Sign,
    /// The algorithm cannot be used to sign here.
    #[error("algorithm {0} is not supported for signing")]
    Unsupported(Alg),
}

enum Inner {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// A private signing key with its `kid` and algorithm. `Debug` shows neither key bytes
/// nor anything derived from them beyond the public `kid`.
pub struct SigningKey {
    alg: Alg,
    kid: String,
    inner: Inner,
    rng: SystemRandom,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a new key and returns it with its PKCS#8 DER encoding (to be stored
    /// encrypted). Fails only if the system RNG fails.
    pub fn generate(alg: Alg) -> Result<(SigningKey, Vec<u8>), JoseError> {
        let rng = SystemRandom::new();
        let pkcs8 = match alg {
            Alg::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| JoseError::Key(alg))?
                    .as_ref()
                    .to_vec()
            }
            Alg::ES384 => {
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
                    .map_err(|_| JoseError::Key(alg))?
                    .as_ref()
                    .to_vec()
            }
            Alg::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| JoseError::Key(alg))?
                .as_ref()
                .to_vec(),
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
                // ring cannot generate RSA keys; the rsa crate (already present through
                // openidconnect) does, and ring signs with the result.
                use rsa::pkcs8::EncodePrivateKey;
                let mut rng = rsa::rand_core::OsRng;
                let key =
                    rsa::RsaPrivateKey::new(&mut rng, 2048).map_err(|_| JoseError::Key(alg))?;
                key.to_pkcs8_der()
                    .map_err(|_| JoseError::Key(alg))?
                    .as_bytes()
                    .to_vec()
            }
        };
        let key = SigningKey::from_pkcs8(alg, &pkcs8)?;
        Ok((key, pkcs8))
    }

    /// Loads a key from PKCS#8 DER. The `kid` is the RFC 7638 thumbprint of the public key.
    /// Fails when the bytes are not a key of `alg`'s family.
    pub fn from_pkcs8(alg: Alg, pkcs8: &[u8]) -> Result<SigningKey, JoseError> {
        let rng = SystemRandom::new();
        let inner = match alg.family() {
            KeyFamily::P256 => Inner::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
                    .map_err(|_| JoseError::Key(alg))?,
            ),
            KeyFamily::P384 => Inner::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8, &rng)
                    .map_err(|_| JoseError::Key(alg))?,
            ),
            KeyFamily::Ed25519 => Inner::Ed25519(
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
                    .map_err(|_| JoseError::Key(alg))?,
            ),
            KeyFamily::Rsa => {
                Inner::Rsa(RsaKeyPair::from_pkcs8(pkcs8).map_err(|_| JoseError::Key(alg))?)
            }
        };
        let mut key = SigningKey {
            alg,
            kid: String::new(),
            inner,
            rng,
        };
        key.kid = key.thumbprint();
        Ok(key)
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The key id published in the JWKS and put in token headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `message` (the JWS signing input).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, JoseError> {
        match &self.inner {
            Inner::Ecdsa(k) => k
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| JoseError::Sign),
            Inner::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            Inner::Rsa(k) => {
                let padding: &'static dyn signature::RsaEncoding = match self.alg {
                    Alg::RS256 => &signature::RSA_PKCS1_SHA256,
                    Alg::RS384 => &signature::RSA_PKCS1_SHA384,
                    Alg::RS512 => &signature::RSA_PKCS1_SHA512,
                    Alg::PS256 => &signature::RSA_PSS_SHA256,
                    Alg::PS384 => &signature::RSA_PSS_SHA384,
                    Alg::PS512 => &signature::RSA_PSS_SHA512,
                    other => return Err(JoseError::Unsupported(other)),
                };
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(padding, &self.rng, message, &mut sig)
                    .map_err(|_| JoseError::Sign)?;
                Ok(sig)
            }
        }
    }

    /// Signs a JWT: header `{alg, typ: "JWT", kid}` plus `extra_header`, and `claims`.
    pub fn sign_jwt(
        &self,
        claims: &Value,
        extra_header: Option<&Value>,
    ) -> Result<String, JoseError> {
        let mut header = json!({"alg": self.alg.as_str(), "typ": "JWT", "kid": self.kid});
        if let (Some(Value::Object(extra)), Value::Object(h)) = (extra_header, &mut header) {
            for (k, v) in extra {
                h.insert(k.clone(), v.clone());
            }
        }
        let signing_input = format!(
            "{}.{}",
            b64(serde_json::to_vec(&header).map_err(|_| JoseError::Sign)?),
            b64(serde_json::to_vec(claims).map_err(|_| JoseError::Sign)?)
        );
        let sig = self.sign(signing_input.as_bytes())?;
        Ok(format!("{signing_input}.{}", b64(sig)))
    }

    /// The public key as a JWK with `kid`, `alg` and `use: "sig"`.
    pub fn public_jwk(&self) -> Value {
        let mut jwk = self.public_members();
        if let Value::Object(m) = &mut jwk {
            m.insert("kid".into(), Value::String(self.kid.clone()));
            m.insert("alg".into(), Value::String(self.alg.as_str().into()));
            m.insert("use".into(), Value::String("sig".into()));
        }
        jwk
    }

    /// The raw public key as ring verifies it: an uncompressed EC point, the 32 Ed25519
    /// bytes, or a DER `RSAPublicKey`.
    pub fn public_key_raw(&self) -> Vec<u8> {
        match &self.inner {
            Inner::Ecdsa(k) => k.public_key().as_ref().to_vec(),
            Inner::Ed25519(k) => k.public_key().as_ref().to_vec(),
            Inner::Rsa(k) => k.public().as_ref().to_vec(),
        }
    }

    /// The required JWK members only, in lexicographic order (RFC 7638).
    fn public_members(&self) -> Value {
        match &self.inner {
            Inner::Ecdsa(k) => {
                let point = k.public_key().as_ref();
                let n = (point.len() - 1) / 2;
                let crv = if self.alg.family() == KeyFamily::P384 {
                    "P-384"
                } else {
                    "P-256"
                };
                json!({"crv": crv, "kty": "EC", "x": b64(&point[1..1 + n]), "y": b64(&point[1 + n..])})
            }
            Inner::Ed25519(k) => {
                json!({"crv": "Ed25519", "kty": "OKP", "x": b64(k.public_key().as_ref())})
            }
            Inner::Rsa(k) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({"e": b64(trim_zeros(&c.e)), "kty": "RSA", "n": b64(trim_zeros(&c.n))})
            }
        }
    }

    /// RFC 7638 JWK thumbprint, base64url.
    fn thumbprint(&self) -> String {
        // serde_json's Map is ordered by key, which is exactly RFC 7638's canonical form.
        let canonical = serde_json::to_vec(&self.public_members()).unwrap_or_default();
        b64(ring::digest::digest(&ring::digest::SHA256, &canonical).as_ref())
    }
}

fn trim_zeros(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    &b[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signing_alg_round_trips_through_ring_verification() {
        for alg in [Alg::ES256, Alg::EdDSA, Alg::RS256] {
            let (key, pkcs8) = SigningKey::generate(alg).unwrap();
            let again = SigningKey::from_pkcs8(alg, &pkcs8).unwrap();
            assert_eq!(key.kid(), again.kid(), "kid is a stable thumbprint");
            let sig = key.sign(b"hello").unwrap();
            let public = key.public_key_raw();
            signature::UnparsedPublicKey::new(alg.verification(), &public)
                .verify(b"hello", &sig)
                .expect("verifies");
            assert!(
                signature::UnparsedPublicKey::new(alg.verification(), &public)
                    .verify(b"hellO", &sig)
                    .is_err()
            );
            let dbg = format!("{key:?}");
            assert!(dbg.contains(key.kid()) && !dbg.contains("pkcs8"));
        }
    }

    #[test]
    fn rejects_wrong_family_and_garbage() {
        let (_, pkcs8) = SigningKey::generate(Alg::ES256).unwrap();
        assert!(SigningKey::from_pkcs8(Alg::EdDSA, &pkcs8).is_err());
        assert!(SigningKey::from_pkcs8(Alg::ES256, b"garbage").is_err());
    }

    #[test]
    fn parse_refuses_none_and_hmac() {
        assert_eq!(Alg::parse("none"), None);
        assert_eq!(Alg::parse("HS256"), None);
        assert_eq!(Alg::parse("es256"), None);
        assert_eq!(Alg::parse("ES256"), Some(Alg::ES256));
    }

    #[test]
    fn base64url_is_strict() {
        assert_eq!(b64_decode("aGk"), Some(b"hi".to_vec()));
        assert_eq!(b64_decode("aGk="), None);
        assert_eq!(b64_decode("a+k"), None);
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}

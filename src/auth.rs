//! Room passwords and room tokens.
//!
//! Passwords are stored only as argon2id PHC strings; hashing runs on a few
//! dedicated threads behind a bounded queue ([`hashing`]), because argon2 is
//! deliberately slow and memory-hungry and must not become a way to starve the
//! server. Room tokens are HS256 JWTs with claims `key` and `exp` (24 h), signed
//! with the secret every instance shares; an `nbf` claim, when present, is
//! honoured.
//!
//! `jsonwebtoken` gets an HMAC-only crypto provider: its bundled RustCrypto one
//! links RSA, ECDSA and EdDSA as well, several hundred kilobytes of code the
//! server can never reach but that still counts in every instance's memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::RoomKey;

mod hashing;

pub use hashing::{HashError, Hasher};

/// Longest accepted password, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 256;

/// How long a room token is valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    key: String,
    exp: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a room token is required for this room")]
    Missing,
    #[error("the room token is invalid or expired")]
    Invalid,
    #[error("the room token is for another room")]
    OtherRoom,
}

pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    hasher: Hasher,
}

impl Auth {
    pub fn new(secret: &[u8], hasher: Hasher) -> Arc<Self> {
        hs256::install();
        Arc::new(Auth {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            hasher,
        })
    }

    /// Issues a token for one room.
    pub fn issue(&self, key: &RoomKey) -> anyhow::Result<String> {
        let exp = jsonwebtoken::get_current_timestamp() + TOKEN_LIFETIME.as_secs();
        let claims = Claims {
            key: key.to_string(),
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .context("signing a room token")
    }

    /// Checks that `token` is a valid, unexpired, already valid (`nbf`) token for
    /// exactly this room.
    pub fn verify(&self, token: Option<&str>, key: &RoomKey) -> Result<(), TokenError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| TokenError::Invalid)?;
        if data.claims.key != key.as_str() {
            return Err(TokenError::OtherRoom);
        }
        Ok(())
    }

    /// Hashes a password with argon2id and a random salt.
    pub async fn hash_password(&self, password: String) -> Result<String, HashError> {
        self.hasher.hash(password).await
    }

    /// Verifies a password against a stored hash (constant-time comparison).
    pub async fn verify_password(&self, password: String, hash: String) -> Result<bool, HashError> {
        self.hasher.verify(password, hash).await
    }
}

/// Reads the embedded-mode token secret from `DATA_DIR/jwt_secret`, creating it
/// (random, owner-only) on first start so tokens survive restarts.
pub fn load_or_create_secret(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.trim().len() >= 32 => return Ok(secret.trim().to_owned()),
        Ok(_) => anyhow::bail!(
            "{} is too short; delete it to generate a new secret",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    crate::files::create_private_dir(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, secret.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

/// The HS256 signer and verifier `jsonwebtoken` uses, on RustCrypto's `hmac`.
mod hs256 {
    use hmac::{Hmac, Mac};
    use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
    use jsonwebtoken::errors::{Error, ErrorKind};
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
    use sha2::Sha256;

    type HmacSha256 = Hmac<Sha256>;

    static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory: signer,
        verifier_factory: verifier,
        jwk_utils: JwkUtils::new_unimplemented(),
    };

    /// Makes this the process's provider; later calls (more instances in one
    /// process) find it installed already. Every use of `jsonwebtoken` goes
    /// through an `Auth`, whose constructor calls this first: a call before it
    /// would find no provider and panic.
    pub fn install() {
        let _ = PROVIDER.install_default();
    }

    /// The MAC for `secret`, if `algorithm` is the one room tokens use.
    fn hs256(algorithm: &Algorithm, secret: &[u8]) -> Result<Hs256, Error> {
        if *algorithm != Algorithm::HS256 {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        HmacSha256::new_from_slice(secret)
            .map(Hs256)
            .map_err(|_| ErrorKind::InvalidKeyFormat.into())
    }

    fn signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
        Ok(Box::new(hs256(algorithm, key.try_get_hmac_secret()?)?))
    }

    fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
        Ok(Box::new(hs256(algorithm, key.try_get_hmac_secret()?)?))
    }

    struct Hs256(HmacSha256);

    impl signature::Signer<Vec<u8>> for Hs256 {
        fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
            let mut mac = self.0.clone();
            mac.update(message);
            Ok(mac.finalize().into_bytes().to_vec())
        }
    }

    impl signature::Verifier<Vec<u8>> for Hs256 {
        fn verify(&self, message: &[u8], tag: &Vec<u8>) -> Result<(), signature::Error> {
            let mut mac = self.0.clone();
            mac.update(message);
            // Constant-time comparison.
            mac.verify_slice(tag).map_err(signature::Error::from_source)
        }
    }

    impl JwtSigner for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }

    impl JwtVerifier for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_auth(secret: &[u8]) -> Arc<Auth> {
        Auth::new(secret, Hasher::start(1, 4).unwrap())
    }

    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap()
    }

    #[test]
    fn tokens_not_yet_valid_are_refused() {
        let auth = new_auth(b"0123456789abcdef0123456789abcdef");
        let a = RoomKey::parse("a").unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let exp = now + 3600;
        let later = sign(serde_json::json!({"key": "a", "exp": exp, "nbf": now + 600}));
        assert_eq!(auth.verify(Some(&later), &a), Err(TokenError::Invalid));
        let started = sign(serde_json::json!({"key": "a", "exp": exp, "nbf": now - 5}));
        assert_eq!(auth.verify(Some(&started), &a), Ok(()));
    }

    #[test]
    fn tokens_are_bound_to_one_room() {
        let auth = new_auth(b"0123456789abcdef0123456789abcdef");
        let a = RoomKey::parse("a").unwrap();
        let b = RoomKey::parse("b").unwrap();
        let token = auth.issue(&a).unwrap();
        assert_eq!(auth.verify(Some(&token), &a), Ok(()));
        assert_eq!(auth.verify(Some(&token), &b), Err(TokenError::OtherRoom));
        assert_eq!(auth.verify(None, &a), Err(TokenError::Missing));
        assert_eq!(auth.verify(Some("garbage"), &a), Err(TokenError::Invalid));
        let other = new_auth(b"another-secret-another-secret!!!");
        assert_eq!(other.verify(Some(&token), &a), Err(TokenError::Invalid));
    }

    /// Tokens signed elsewhere (here: Python's `hmac`, key "a", expiring in
    /// 2100 or in 2000) check out exactly as RFC 7519 says.
    #[test]
    fn tokens_from_other_implementations() {
        let auth = new_auth(b"0123456789abcdef0123456789abcdef");
        let a = RoomKey::parse("a").unwrap();
        let header = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
        let claims = "eyJrZXkiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ";
        let valid = format!("{header}.{claims}.H2y_vQek8KWU9W5XsJyulVp2i3COP2I-bOwgQ_q0Yyk");
        assert_eq!(auth.verify(Some(&valid), &a), Ok(()));
        let tampered = format!("{header}.{claims}.H2y_vQek8KWU9W5XsJyulVp2i3COP2I-bOwgQ_q0Yyl");
        assert_eq!(auth.verify(Some(&tampered), &a), Err(TokenError::Invalid));
        let expired = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJhIiwiZXhwIjo5NDY2ODQ4MDB9.\
                       _npA2Z6GuS8TY7Le_3VDdOySwqAG6q6wicFZOTyctEQ";
        assert_eq!(auth.verify(Some(expired), &a), Err(TokenError::Invalid));
        // Same secret, another algorithm: refused, not verified with HS512.
        let hs512 = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ.\
                     -eh5HxR6tGscNdGYKrb2Psg0_eyHZ-ewUvmBzYnwLtOYKvi4vbPKYhvzuFMnH0aNlTYfiM82GwoEInkn20FdQw";
        assert_eq!(auth.verify(Some(hs512), &a), Err(TokenError::Invalid));
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let auth = new_auth(b"0123456789abcdef0123456789abcdef");
        let hash = auth.hash_password("hunter2".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(
            auth.verify_password("hunter2".into(), hash.clone())
                .await
                .unwrap()
        );
        assert!(!auth.verify_password("hunter3".into(), hash).await.unwrap());
    }
}

//! Throwaway JWT signing keys and tokens for the auth tests: ES256 and
//! EdDSA keys from rcgen, an RS256 key from the openssl command.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use serde_json::{json, Value};

/// A private key that signs tokens, and its public half as PEM.
pub struct Signer {
    key: EncodingKey,
    algorithm: Algorithm,
    pub public_pem: String,
}

impl Signer {
    pub fn es256() -> Self {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        Self {
            key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            algorithm: Algorithm::ES256,
            public_pem: pair.public_key_pem(),
        }
    }

    pub fn ed25519() -> Self {
        let pair = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        Self {
            key: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            algorithm: Algorithm::EdDSA,
            public_pem: pair.public_key_pem(),
        }
    }

    pub fn rs256() -> Self {
        let openssl = |args: &[&str], input: Option<&[u8]>| {
            use std::io::Write;
            let mut child = std::process::Command::new("openssl")
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("openssl (Debian package openssl) makes the RSA test key");
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.unwrap_or_default()).unwrap();
            drop(stdin);
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "openssl {args:?}");
            output.stdout
        };
        let private = openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            None,
        );
        let public = openssl(&["pkey", "-pubout"], Some(&private));
        Self {
            key: EncodingKey::from_rsa_pem(&private).unwrap(),
            algorithm: Algorithm::RS256,
            public_pem: String::from_utf8(public).unwrap(),
        }
    }

    /// A token with `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        encode(&Header::new(self.algorithm), claims, &self.key).unwrap()
    }

    /// A token for `subject` with `scope`, valid for another hour.
    pub fn token(&self, subject: &str, scope: &str) -> String {
        self.sign(&claims(subject, scope, 3600))
    }
}

/// Claims with `exp` `expires_in` seconds from now (negative: expired).
pub fn claims(subject: &str, scope: &str, expires_in: i64) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    json!({"sub": subject, "scope": scope, "exp": now + expires_in, "iat": now})
}

/// `message` with `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

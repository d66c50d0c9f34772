//! Signed URLs: an upload or a download the edge allowed once, for one file of one resource,
//! of one size, until a time. The URL carries its grant and an HMAC-SHA256 of it, so a PUT or a
//! GET without an Authorization header is accepted for exactly that and nothing else.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a signed URL allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// `put` or `get`.
    pub op: String,
    /// `accounts/a/datasets/d` or `accounts/a/models/m`.
    pub resource: String,
    /// The file within a model ("" for a dataset).
    pub file: String,
    /// The exact size a PUT must send (0 for a GET).
    pub size: u64,
    /// Unix seconds after which the URL is refused.
    pub expires: u64,
}

/// Signs and checks grants with one secret.
#[derive(Clone)]
pub struct Signer {
    secret: Vec<u8>,
}

impl Signer {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            secret: secret.to_vec(),
        }
    }

    /// The URL path segment for `grant`: its JSON and its signature, both base64url.
    pub fn sign(&self, grant: &Grant) -> String {
        let payload = serde_json::to_vec(grant).expect("a grant serializes");
        let signature = self.mac(&payload).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// The grant `token` carries, if this signer signed it and it has not expired at `now`.
    pub fn check(&self, token: &str, now: u64) -> Result<Grant, &'static str> {
        let (payload, signature) = token.split_once('.').ok_or("malformed signed URL")?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| "malformed signed URL")?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| "malformed signed URL")?;
        // verify_slice compares in constant time.
        self.mac(&payload)
            .verify_slice(&signature)
            .map_err(|_| "the URL's signature does not match")?;
        let grant: Grant = serde_json::from_slice(&payload).map_err(|_| "malformed signed URL")?;
        if grant.expires < now {
            return Err("the signed URL has expired");
        }
        Ok(grant)
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(payload);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            op: "put".into(),
            resource: "accounts/a/datasets/d".into(),
            file: String::new(),
            size: 42,
            expires: 1000,
        }
    }

    #[test]
    fn a_signed_grant_checks_until_it_expires() {
        let signer = Signer::new(b"secret");
        let token = signer.sign(&grant());
        assert_eq!(signer.check(&token, 999).unwrap(), grant());
        assert_eq!(
            signer.check(&token, 1001).unwrap_err(),
            "the signed URL has expired"
        );
    }

    #[test]
    fn a_changed_grant_or_another_secret_is_refused() {
        let signer = Signer::new(b"secret");
        let token = signer.sign(&grant());
        let (_, signature) = token.split_once('.').unwrap();
        let mut bigger = grant();
        bigger.size = 1 << 40;
        let forged = format!(
            "{}.{signature}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&bigger).unwrap())
        );
        assert!(signer.check(&forged, 0).is_err());
        assert!(Signer::new(b"other").check(&token, 0).is_err());
        assert!(signer.check("garbage", 0).is_err());
    }
}

//! User tokens: JWTs signed by the operator's login service, verified with `jsonwebtoken`
//! (HS256 with a shared secret; RS*/PS*/ES*/EdDSA with a public key or a JWKS), and minted
//! for trying cim out (`cim-host token`).

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cim_proto::ErrorCode;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use super::Secret;

/// Clock skew tolerated on `exp`, `nbf` and `iat` unless configured otherwise.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);

/// Longest token accepted, in bytes (a JWT with a few custom claims is well under 2 KiB).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What a token must say besides a good signature.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// `iss` must be this, when set.
    pub issuer: Option<String>,
    /// `aud` must contain this, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// Why a token was refused. The message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a token is required: log in with a user token from your login service")]
    Missing,
    #[error("the token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("the token is not a valid JWT: {0}")]
    Malformed(String),
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token's algorithm is not accepted here (accepted: {0})")]
    Algorithm(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf or iat in the future)")]
    NotYetValid,
    #[error("the token's issuer is not the one this server trusts")]
    WrongIssuer,
    #[error("the token's audience does not include this server")]
    WrongAudience,
    #[error("the token has no `{0}` claim")]
    MissingClaim(String),
    #[error("the token's `sub` must be a positive decimal user id, got {0}")]
    BadSubject(String),
    #[error("the token is for user {token}, not user {asked}")]
    OtherUser { token: u64, asked: u64 },
    #[error("no key in the key set matches the token's key id {0:?}")]
    UnknownKey(Option<String>),
}

impl TokenError {
    /// The protocol error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Expired => ErrorCode::TokenExpired,
            _ => ErrorCode::Unauthenticated,
        }
    }
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `sub`, parsed.
    pub user_id: u64,
    /// The `name` claim, when present.
    pub name: Option<String>,
    /// `exp`, in Unix milliseconds.
    pub expires_at_ms: u64,
    /// `iss`, when present.
    pub issuer: Option<String>,
    /// Every claim, as the JSON object the token carried.
    pub claims_json: String,
}

impl Verified {
    /// Refuses a token that is for another user than `asked` (0: any user).
    pub fn check_user(&self, asked: u64) -> Result<(), TokenError> {
        if asked != 0 && asked != self.user_id {
            return Err(TokenError::OtherUser { token: self.user_id, asked });
        }
        Ok(())
    }
}

/// A key the verifier trusts, with the algorithms it may be used with.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Verifies user tokens against the configured key(s).
pub struct Verifier {
    keys: Vec<Key>,
    expect: Expectations,
    /// What the key(s) are, for logs ("HS256 secret", "RSA public key", "JWKS with 2 keys").
    describe: String,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.describe).field("expect", &self.expect).finish()
    }
}

/// Why the verifier could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is neither a PEM public key (RSA, EC or Ed25519) nor a JWKS (JSON): {detail}")]
    Unrecognised { path: String, detail: String },
    #[error("{path}: {detail}")]
    Jwks { path: String, detail: String },
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hmac(secret: &Secret, expect: Expectations) -> Result<Self, KeyError> {
        let key = DecodingKey::from_secret(secret.expose())
            .map_err(|e| KeyError::Unrecognised { path: "the HMAC secret".into(), detail: e.to_string() })?;
        let keys = vec![Key { kid: None, key, algorithms: vec![Algorithm::HS256] }];
        Ok(Verifier { keys, expect, describe: "HS256 secret".into() })
    }

    /// A public key (PEM: RSA, EC or Ed25519) or a JWKS (JSON) from `path`. Only asymmetric
    /// algorithms of the key's own family are accepted, so a token signed with HS256 using
    /// the public key as its secret (algorithm confusion) is refused.
    pub fn public_key_file(path: &Path, expect: Expectations) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read { path: shown.clone(), source })?;
        let text = String::from_utf8_lossy(&bytes);
        if text.trim_start().starts_with('{') {
            return Self::jwks(&bytes, &shown, expect);
        }
        let parsed = [
            ("RSA public key", DecodingKey::from_rsa_pem(&bytes)),
            ("EC public key", DecodingKey::from_ec_pem(&bytes)),
            ("Ed25519 public key", DecodingKey::from_ed_pem(&bytes)),
        ];
        let mut errors = Vec::new();
        for (what, key) in parsed {
            match key {
                Ok(key) => {
                    let algorithms = asymmetric(&key);
                    let keys = vec![Key { kid: None, key, algorithms }];
                    return Ok(Verifier { keys, expect, describe: format!("{what} from {shown}") });
                }
                Err(e) => errors.push(format!("{what}: {e}")),
            }
        }
        Err(KeyError::Unrecognised { path: shown, detail: errors.join("; ") })
    }

    fn jwks(bytes: &[u8], path: &str, expect: Expectations) -> Result<Self, KeyError> {
        let set: JwkSet = serde_json::from_slice(bytes)
            .map_err(|e| KeyError::Jwks { path: path.into(), detail: format!("not a JWKS: {e}") })?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| KeyError::Jwks { path: path.into(), detail: format!("key {kid:?}: {e}") })?;
            let mut algorithms = asymmetric(&key);
            if let Some(alg) = jwk.common.key_algorithm.and_then(|a| Algorithm::try_from(a).ok()) {
                algorithms.retain(|a| *a == alg);
            }
            if algorithms.is_empty() {
                return Err(KeyError::Jwks {
                    path: path.into(),
                    detail: format!(
                        "key {kid:?} is not a public key (symmetric keys are not accepted in a JWKS)"
                    ),
                });
            }
            keys.push(Key { kid, key, algorithms });
        }
        if keys.is_empty() {
            return Err(KeyError::Jwks { path: path.into(), detail: "the key set is empty".into() });
        }
        let describe = format!("JWKS with {} key(s) from {path}", keys.len());
        Ok(Verifier { keys, expect, describe })
    }

    /// What the verifier trusts, for the startup log.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The configured clock leeway.
    pub fn leeway(&self) -> Duration {
        self.expect.leeway
    }

    /// Checks the signature and the claims of `token`.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| map_error(&e, self))?;
        let key = self.key_for(header.kid.as_deref())?;
        if !key.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm(names(&key.algorithms)));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = key.algorithms.clone();
        validation.leeway = self.expect.leeway.as_secs();
        validation.validate_nbf = true;
        // `sub` is checked below, so that a non-string one is named as such.
        validation.set_required_spec_claims(&["exp"]);
        match &self.expect.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &self.expect.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            // A token with an `aud` is not refused for it when no audience is configured.
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| map_error(&e, self))?;
        let claims = data.claims;
        self.check_iat(&claims)?;
        let user_id = match claims.get("sub") {
            Some(Value::String(s)) => match s.parse::<u64>() {
                Ok(id) if id != 0 && !s.starts_with('+') => id,
                _ => return Err(TokenError::BadSubject(format!("{s:?}"))),
            },
            Some(other) => return Err(TokenError::BadSubject(other.to_string())),
            None => return Err(TokenError::MissingClaim("sub".into())),
        };
        let exp = claims.get("exp").and_then(Value::as_u64).ok_or(TokenError::MissingClaim("exp".into()))?;
        Ok(Verified {
            user_id,
            name: claims.get("name").and_then(Value::as_str).map(str::to_owned),
            expires_at_ms: exp.saturating_mul(1000),
            issuer: claims.get("iss").and_then(Value::as_str).map(str::to_owned),
            claims_json: Value::Object(claims).to_string(),
        })
    }

    fn key_for(&self, kid: Option<&str>) -> Result<&Key, TokenError> {
        match (kid, self.keys.as_slice()) {
            (_, [only]) if only.kid.is_none() || kid.is_none() || only.kid.as_deref() == kid => Ok(only),
            (Some(kid), keys) => keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or(TokenError::UnknownKey(Some(kid.to_owned()))),
            (None, _) => Err(TokenError::UnknownKey(None)),
        }
    }

    /// `iat` in the future (beyond the leeway) means a token from a skewed or forged clock.
    fn check_iat(&self, claims: &Map<String, Value>) -> Result<(), TokenError> {
        if let Some(iat) = claims.get("iat") {
            let iat = iat.as_u64().ok_or_else(|| TokenError::Malformed("`iat` must be a number".into()))?;
            if iat > unix_secs().saturating_add(self.expect.leeway.as_secs()) {
                return Err(TokenError::NotYetValid);
            }
        }
        Ok(())
    }
}

fn asymmetric(key: &DecodingKey) -> Vec<Algorithm> {
    use jsonwebtoken::AlgorithmFamily;
    match key.family() {
        AlgorithmFamily::Hmac => Vec::new(),
        family => family.algorithms().to_vec(),
    }
}

fn names(algorithms: &[Algorithm]) -> String {
    algorithms.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
}

fn map_error(e: &jsonwebtoken::errors::Error, verifier: &Verifier) -> TokenError {
    match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
        ErrorKind::InvalidClaimFormat(c) if c == "sub" => TokenError::BadSubject("a non-string".into()),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
            let accepted: Vec<Algorithm> = verifier.keys.iter().flat_map(|k| k.algorithms.clone()).collect();
            TokenError::Algorithm(names(&accepted))
        }
        // `alg: none` fails to parse as an algorithm: it is a malformed header to the library.
        ErrorKind::Json(j) if j.to_string().contains("unknown variant") => {
            let accepted: Vec<Algorithm> = verifier.keys.iter().flat_map(|k| k.algorithms.clone()).collect();
            TokenError::Algorithm(names(&accepted))
        }
        ErrorKind::InvalidToken => {
            TokenError::Malformed("expected three base64url parts separated by dots".into())
        }
        ErrorKind::Base64(_) => TokenError::Malformed("a part is not base64url".into()),
        ErrorKind::Json(j) => TokenError::Malformed(format!("a part is not the JSON a JWT needs: {j}")),
        ErrorKind::Utf8(_) => TokenError::Malformed("a part is not UTF-8".into()),
        _ => TokenError::Malformed(e.to_string()),
    }
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What `cim-host token` puts in a token.
#[derive(Debug, Clone, Default)]
pub struct MintRequest {
    pub user_id: u64,
    pub name: Option<String>,
    pub ttl: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Extra claims (a JSON object) merged into the token, e.g. `{"role":"admin"}`.
    pub extra: Map<String, Value>,
}

/// Signs an HS256 token with `secret`, the way an operator's login service would.
pub fn mint(secret: &Secret, req: &MintRequest) -> Result<String, jsonwebtoken::errors::Error> {
    let now = unix_secs();
    let mut claims = req.extra.clone();
    claims.insert("sub".into(), Value::String(req.user_id.to_string()));
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(req.ttl.as_secs()).into());
    if let Some(name) = &req.name {
        claims.insert("name".into(), Value::String(name.clone()));
    }
    if let Some(iss) = &req.issuer {
        claims.insert("iss".into(), Value::String(iss.clone()));
    }
    if let Some(aud) = &req.audience {
        claims.insert("aud".into(), Value::String(aud.clone()));
    }
    let key = EncodingKey::from_secret(secret.expose())?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
}

#[cfg(test)]
mod tests;

//! Hosts with authentication on, and tokens for them: good ones minted the way an operator's
//! login service would, and bad ones (expired, forged, `alg: none`...) for the refusal tests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::Host;

/// The HS256 secret the tests' authenticated hosts verify tokens with.
pub const SECRET: &str = "cim-test-secret-0123456789abcdef0123456789";
/// The service API key of the tests' authenticated hosts.
pub const API_KEY: &str = "cim-test-api-key-fedcba9876543210";
/// The issuer the tests' authenticated hosts require.
pub const ISSUER: &str = "https://login.test";

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Signs `claims` with HS256 and the tests' secret.
pub fn sign(claims: &Value) -> String {
    sign_with(claims, Algorithm::HS256, SECRET.as_bytes())
}

pub fn sign_with(claims: &Value, alg: Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret).unwrap()).unwrap()
}

/// A good token for `user_id`, valid for `ttl`.
pub fn token(user_id: u64, name: &str, ttl: Duration) -> String {
    sign(
        &json!({"sub": user_id.to_string(), "name": name, "iss": ISSUER, "iat": now(), "exp": now() + ttl.as_secs()}),
    )
}

/// A good token valid for an hour.
pub fn token_for(user_id: u64, name: &str) -> String {
    token(user_id, name, Duration::from_secs(3600))
}

impl Host {
    /// Starts a host that verifies HS256 tokens (issuer [`ISSUER`], no clock leeway) and
    /// requires [`API_KEY`] on the service endpoints.
    pub async fn start_with_auth(extra: &[&str]) -> anyhow::Result<Host> {
        let dir = std::sync::Arc::new(tempfile::tempdir()?);
        let secret = dir.path().join("auth-secret");
        std::fs::write(&secret, format!("{SECRET}\n"))?;
        let key = dir.path().join("api-key");
        std::fs::write(&key, format!("{API_KEY}\n"))?;
        let mut args: Vec<String> = vec![
            "--auth-hmac-secret-file".into(),
            secret.display().to_string(),
            "--api-key-file".into(),
            key.display().to_string(),
            "--auth-issuer".into(),
            ISSUER.into(),
            "--auth-leeway-secs".into(),
            "0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Host::start_in(dir, &args).await
    }
}

//! Token verification: every refusal the issue lists, and the algorithm-confusion case.

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

/// Test-only key pairs (generated for these tests; never used anywhere else).
const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIMwIuVh+R1F6PgukEvTmOFHkYjlZY54ho7jxR2gu0Oun
-----END PRIVATE KEY-----
";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAMtvD3nuxdQhTBalr+CK19rPXKZDXIIeBFjfg9AmTM/w=
-----END PUBLIC KEY-----
";
const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg/mwp46r6+Qf4+fkI
TPGGKQF8OJaQXeuj8imkckDy5L6hRANCAAS2pakfobdOAHIXLIGMxfN916qClSbc
w3K96b9N92SrvAh5nUGzpKTful9snrQYP9USmGRFfg6EauejwRm1bCIu
-----END PRIVATE KEY-----
";
const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEtqWpH6G3TgByFyyBjMXzfdeqgpUm
3MNyvem/Tfdkq7wIeZ1Bs6Sk37pfbJ60GD/VEphkRX4OhGrno8EZtWwiLg==
-----END PUBLIC KEY-----
";

fn secret() -> Secret {
    Secret::new("test-secret-of-a-reasonable-length", "test").unwrap()
}

fn hmac() -> Verifier {
    Verifier::hmac(&secret(), Expectations { leeway: Duration::ZERO, ..Default::default() }).unwrap()
}

fn now() -> u64 {
    unix_secs()
}

fn sign(claims: &Value, alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs(claims: Value) -> String {
    sign(&claims, Algorithm::HS256, &EncodingKey::from_secret(secret().expose()).unwrap())
}

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_minted_token_verifies_with_its_claims() {
    let req = MintRequest {
        user_id: 42,
        name: Some("alice".into()),
        ttl: Duration::from_secs(3600),
        extra: json!({"role": "admin"}).as_object().unwrap().clone(),
        ..Default::default()
    };
    let token = mint(&secret(), &req).unwrap();
    let v = hmac().verify(&token).unwrap();
    assert_eq!(v.user_id, 42);
    assert_eq!(v.name.as_deref(), Some("alice"));
    assert!(v.expires_at_ms > now() * 1000);
    let claims: Value = serde_json::from_str(&v.claims_json).unwrap();
    assert_eq!(claims["role"], "admin");
    assert!(v.check_user(42).is_ok() && v.check_user(0).is_ok());
    assert_eq!(v.check_user(7), Err(TokenError::OtherUser { token: 42, asked: 7 }));
}

#[test]
fn refusals_say_why() {
    let v = hmac();
    let t = now();
    assert_eq!(v.verify(""), Err(TokenError::Missing));
    assert!(matches!(v.verify("not.a.jwt"), Err(TokenError::Malformed(_))));
    assert_eq!(v.verify(&hs(json!({"sub": "1", "exp": t - 10}))), Err(TokenError::Expired));
    assert_eq!(
        v.verify(&hs(json!({"sub": "1", "exp": t + 60, "nbf": t + 30}))),
        Err(TokenError::NotYetValid)
    );
    assert_eq!(
        v.verify(&hs(json!({"sub": "1", "exp": t + 60, "iat": t + 30}))),
        Err(TokenError::NotYetValid)
    );
    assert!(matches!(v.verify(&hs(json!({"sub": "1"}))), Err(TokenError::MissingClaim(c)) if c == "exp"));
    assert!(matches!(v.verify(&hs(json!({"exp": t + 60}))), Err(TokenError::MissingClaim(c)) if c == "sub"));
    for sub in [json!("0"), json!("alice"), json!(7), json!("-1"), json!("+1")] {
        let r = v.verify(&hs(json!({"sub": sub, "exp": t + 60})));
        assert!(matches!(r, Err(TokenError::BadSubject(_))), "{sub}: {r:?}");
    }
    let other = EncodingKey::from_secret(b"another secret").unwrap();
    let forged = sign(&json!({"sub": "1", "exp": t + 60}), Algorithm::HS256, &other);
    assert_eq!(v.verify(&forged), Err(TokenError::BadSignature));
    // HS512 with the right secret is still refused: only HS256 is configured.
    let hs512 = sign(
        &json!({"sub": "1", "exp": t + 60}),
        Algorithm::HS512,
        &EncodingKey::from_secret(secret().expose()).unwrap(),
    );
    assert!(matches!(v.verify(&hs512), Err(TokenError::Algorithm(_))));
    assert_eq!(v.verify(&"a".repeat(MAX_TOKEN_LEN + 1)), Err(TokenError::TooLong));
}

#[test]
fn alg_none_is_refused() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64.encode(format!(r#"{{"sub":"1","exp":{}}}"#, now() + 60));
    for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
        let err = hmac().verify(&token).unwrap_err();
        assert!(matches!(err, TokenError::Algorithm(_) | TokenError::Malformed(_)), "{token}: {err:?}");
    }
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let expect = Expectations {
        issuer: Some("https://login.example".into()),
        audience: Some("cim".into()),
        leeway: Duration::ZERO,
    };
    let v = Verifier::hmac(&secret(), expect).unwrap();
    let t = now() + 60;
    let ok = hs(json!({"sub": "1", "exp": t, "iss": "https://login.example", "aud": ["cim", "x"]}));
    assert_eq!(v.verify(&ok).unwrap().issuer.as_deref(), Some("https://login.example"));
    let wrong_iss = hs(json!({"sub": "1", "exp": t, "iss": "https://evil.example", "aud": "cim"}));
    assert_eq!(v.verify(&wrong_iss), Err(TokenError::WrongIssuer));
    let wrong_aud = hs(json!({"sub": "1", "exp": t, "iss": "https://login.example", "aud": "other"}));
    assert_eq!(v.verify(&wrong_aud), Err(TokenError::WrongAudience));
    let no_iss = hs(json!({"sub": "1", "exp": t, "aud": "cim"}));
    assert!(matches!(v.verify(&no_iss), Err(TokenError::MissingClaim(c)) if c == "iss"));
}

#[test]
fn leeway_accepts_slightly_expired_tokens() {
    let v = Verifier::hmac(&secret(), Expectations { leeway: Duration::from_secs(30), ..Default::default() })
        .unwrap();
    assert!(v.verify(&hs(json!({"sub": "1", "exp": now() - 10}))).is_ok());
    assert_eq!(v.verify(&hs(json!({"sub": "1", "exp": now() - 60}))), Err(TokenError::Expired));
}

#[test]
fn public_keys_verify_and_refuse_algorithm_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let expect = Expectations::default();
    let claims = json!({"sub": "9", "exp": now() + 60});
    for (public, token) in [
        (
            ED_PUBLIC,
            sign(&claims, Algorithm::EdDSA, &EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap()),
        ),
        (
            EC_PUBLIC,
            sign(&claims, Algorithm::ES256, &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap()),
        ),
    ] {
        let v = Verifier::public_key_file(&file(&dir, "key.pem", public), expect.clone()).unwrap();
        assert_eq!(v.verify(&token).unwrap().user_id, 9);
        // An HS256 token whose "secret" is the public key: the classic confusion attack.
        let confused = sign(&claims, Algorithm::HS256, &EncodingKey::from_secret(public.as_bytes()).unwrap());
        assert!(matches!(v.verify(&confused), Err(TokenError::Algorithm(_))), "{}", v.describe());
    }
    let junk = file(&dir, "junk.pem", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n");
    assert!(matches!(Verifier::public_key_file(&junk, expect.clone()), Err(KeyError::Unrecognised { .. })));
}

#[test]
fn a_jwks_picks_the_key_by_kid() {
    let dir = tempfile::tempdir().unwrap();
    // The Ed25519 test key's public half as a JWK (x = the raw 32-byte key, base64url).
    let jwks = json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "alg": "EdDSA",
         "x": "MtvD3nuxdQhTBalr-CK19rPXKZDXIIeBFjfg9AmTM_w"},
        {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"}
    ]});
    let path = file(&dir, "jwks.json", &jwks.to_string());
    assert!(matches!(Verifier::public_key_file(&path, Expectations::default()), Err(KeyError::Jwks { .. })));
    let jwks = json!({"keys": [jwks["keys"][0].clone()]});
    let path = file(&dir, "jwks.json", &jwks.to_string());
    let v = Verifier::public_key_file(&path, Expectations::default()).unwrap();
    let key = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
    let claims = json!({"sub": "3", "exp": now() + 60});
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".into());
    assert_eq!(v.verify(&jsonwebtoken::encode(&header, &claims, &key).unwrap()).unwrap().user_id, 3);
    header.kid = Some("ed-2".into());
    let unknown = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_eq!(v.verify(&unknown), Err(TokenError::UnknownKey(Some("ed-2".into()))));
}

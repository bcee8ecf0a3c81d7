//! `cim-host push` / `cim-host rollback`: the admin API from the command line, over http or
//! https (rustls with the webpki roots).

use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::auth::Secret;

/// Sends one admin request and returns the JSON answer, or an error with the server's message.
async fn admin_request(
    base: &str,
    method: &str,
    path: &str,
    token: &Secret,
    body: Vec<u8>,
) -> anyhow::Result<serde_json::Value> {
    let uri: hyper::Uri = format!("{}{path}", base.trim_end_matches('/')).parse().context("parsing --to")?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        bail!("--to must be an http:// or https:// URL, got {base}");
    }
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .context("setting up TLS")?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let bearer = format!("Bearer {}", String::from_utf8_lossy(token.expose()));
    let mut auth =
        hyper::header::HeaderValue::from_str(&bearer).context("the admin token is not a valid header")?;
    auth.set_sensitive(true);
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", auth)
        .header("content-type", "application/wasm")
        .body(Full::new(Bytes::from(body)))?;
    let resp = client.request(req).await.with_context(|| format!("sending the request to {base}"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::json!({ "message": String::from_utf8_lossy(&bytes) }));
    if !status.is_success() {
        bail!("{} ({status})", value["message"].as_str().unwrap_or("request failed"));
    }
    Ok(value)
}

fn describe(v: &serde_json::Value) -> String {
    format!(
        "{} version {} (event {}, sha256 {}, {} bytes)",
        v["name"].as_str().unwrap_or("?"),
        v["version"],
        v["event"].as_str().unwrap_or("?"),
        v["sha256"].as_str().unwrap_or("?"),
        v["size"],
    )
}

/// Uploads `file` as the new version of component `name`; returns a line describing it.
pub async fn push(base: &str, token: &Secret, name: &str, file: &Path) -> anyhow::Result<String> {
    let wasm = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let v = admin_request(base, "PUT", &format!("/admin/components/{name}"), token, wasm).await?;
    let mut out = format!("pushed {}", describe(&v));
    if let Some(headroom) = v["headroom"].as_str() {
        let limits = &v["limits"];
        out.push_str(&format!(
            "\n{headroom}; deadline {} ms, at most {} instances",
            limits["deadline_ms"], limits["max_instances"]
        ));
    }
    Ok(out)
}

/// Rolls component `name` back to its previous version; returns a line describing it.
pub async fn rollback(base: &str, token: &Secret, name: &str) -> anyhow::Result<String> {
    let v =
        admin_request(base, "POST", &format!("/admin/components/{name}/rollback"), token, Vec::new()).await?;
    Ok(format!("rolled back to {}", describe(&v)))
}

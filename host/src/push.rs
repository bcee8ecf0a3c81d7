//! `cim-host push` / `cim-host rollback`: the admin API from the command line.

use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Sends one admin request and returns the JSON answer, or an error with the server's message.
async fn admin_request(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Vec<u8>,
) -> anyhow::Result<serde_json::Value> {
    let uri: hyper::Uri = format!("{}{path}", base.trim_end_matches('/')).parse().context("parsing --to")?;
    if uri.scheme_str() != Some("http") {
        bail!("--to must be an http:// URL, got {base}");
    }
    let host = uri.host().context("--to has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(uri.path())
        .header("host", format!("{host}:{port}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/wasm")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await.context("sending the request")?;
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
pub async fn push(base: &str, token: &str, name: &str, file: &Path) -> anyhow::Result<String> {
    let wasm = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let v = admin_request(base, "PUT", &format!("/admin/components/{name}"), token, wasm).await?;
    Ok(format!("pushed {}", describe(&v)))
}

/// Rolls component `name` back to its previous version; returns a line describing it.
pub async fn rollback(base: &str, token: &str, name: &str) -> anyhow::Result<String> {
    let v =
        admin_request(base, "POST", &format!("/admin/components/{name}/rollback"), token, Vec::new()).await?;
    Ok(format!("rolled back to {}", describe(&v)))
}

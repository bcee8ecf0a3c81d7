//! cim-bench's smoke mode against a real cim-host on port 0: p2p (max and half load),
//! group, idle connections and the handler scenario with tiny numbers, so the tool cannot
//! rot. It checks that nothing is lost and no request fails; it makes no timing assertions.

mod common;

use std::time::Duration;

use common::{Host, binary, root};

#[tokio::test]
async fn bench_smoke_against_a_real_host() -> anyhow::Result<()> {
    // Benchmarks drive machines, not people: rate limits off, as in bench/compare.sh.
    let host = Host::start(&["--no-rate-limits"]).await?;
    let pid = host.child.id().expect("the host's pid");
    let run = tokio::process::Command::new(binary("cim-bench"))
        .arg("--target")
        .arg(format!("cim://{}", host.http))
        .arg("--server-pid")
        .arg(pid.to_string())
        .args(["--json", "-", "smoke", "--manifest"])
        .arg(root().join("spin.toml"))
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cim-bench smoke failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["scenario"], "smoke", "{report:#}");
    let checks = report["checks"].as_array().expect("a list of checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["p2p", "group", "conns", "handler"], "{report:#}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{report:#}\n{stderr}");
    assert!(report["server_counters"]["cim_messages_total"].as_f64().unwrap_or(0.0) > 0.0);
    Ok(())
}

/// The same with authentication on: every simulated user logs in with a token of its own
/// (`--token-secret-file`), and the report is filed as `cim-auth`, beside plain cim.
#[tokio::test]
async fn bench_smoke_with_a_token_per_user() -> anyhow::Result<()> {
    let host = Host::start_with_auth(&["--no-rate-limits"]).await?;
    let run = tokio::process::Command::new(binary("cim-bench"))
        .arg("--target")
        .arg(format!("cim://{}", host.http))
        .arg("--token-secret-file")
        .arg(host.data_dir.path().join("auth-secret"))
        .args(["--token-issuer", common::auth::ISSUER, "--json", "-", "smoke"])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cim-bench smoke with tokens failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["kind"], "cim-auth", "{report:#}");
    let checks = report["checks"].as_array().expect("a list of checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["p2p", "group", "conns"], "{report:#}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{report:#}\n{stderr}");
    Ok(())
}

/// The host `bench/compare.sh` starts for the WASM tax (`--builtin-handlers`): the smoke
/// scenarios pass against it filed as `cim-native`, and `cim-bench idle` watches it with no
/// client (its CPU and memory from /proc, under the same kind).
#[tokio::test]
async fn bench_smoke_and_idle_against_native_handlers() -> anyhow::Result<()> {
    let host = Host::start(&["--no-rate-limits", "--store", "memory", "--builtin-handlers"]).await?;
    let pid = host.child.id().expect("the host's pid").to_string();
    let bench = |args: &[&str]| {
        tokio::process::Command::new(binary("cim-bench"))
            .arg("--target")
            .arg(format!("cim://{}", host.http))
            .args(["--server-pid", &pid, "--kind", "cim-native", "--json", "-"])
            .args(args)
            .output()
    };
    let out = tokio::time::timeout(Duration::from_secs(120), bench(&["smoke"])).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cim-bench smoke against native handlers failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["kind"], "cim-native", "{report:#}");
    let checks = report["checks"].as_array().expect("a list of checks");
    assert!(checks.len() == 3 && checks.iter().all(|c| c["ok"] == true), "{report:#}\n{stderr}");

    let out = tokio::time::timeout(Duration::from_secs(30), bench(&["idle", "--secs", "1"])).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cim-bench idle failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["scenario"], "idle", "{report:#}");
    assert_eq!(report["kind"], "cim-native", "{report:#}");
    assert_eq!(report["server_pid"].as_u64(), pid.parse().ok(), "{report:#}");
    assert!(report["elapsed_s"].as_f64().is_some_and(|s| s >= 1.0), "{report:#}");
    assert!(report["server_cores"].as_f64().is_some_and(|c| c >= 0.0), "{report:#}");
    assert!(report["rss_kib"].as_u64().is_some_and(|k| k > 0), "{report:#}");
    assert!(report.get("server_counters").is_none(), "idle must not talk to the server: {report:#}");
    Ok(())
}

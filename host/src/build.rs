//! `cim-host build`: runs each component's `[component.NAME.build] command` from the
//! manifest, like `spin build`. It installs nothing: a missing `wasm32-wasip2` target is
//! reported with the command that adds it.

use std::process::Command;

use anyhow::{Context as _, bail};
use tracing::info;

use crate::manifest::Manifest;

/// Runs every distinct build command of the manifest, in manifest order.
pub fn build_all(manifest: &Manifest) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for spec in manifest.components.values() {
        let Some(build) = &spec.build else { continue };
        let key = (build.command.clone(), build.workdir.clone());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        if build.command.contains("wasm32-wasip2") {
            check_wasm_target()?;
        }
        info!(component = %spec.id, command = %build.command, workdir = %build.workdir.display(), "building");
        let status = Command::new("sh")
            .arg("-c")
            .arg(&build.command)
            .current_dir(&build.workdir)
            .status()
            .with_context(|| format!("running the build command of component `{}`", spec.id))?;
        if !status.success() {
            bail!("the build command of component `{}` failed ({status}): {}", spec.id, build.command);
        }
        if !spec.source.exists() {
            bail!(
                "component `{}` was built but its source {} does not exist: check `source` in the manifest",
                spec.id,
                spec.source.display()
            );
        }
    }
    Ok(())
}

fn check_wasm_target() -> anyhow::Result<()> {
    let Ok(out) = Command::new("rustup").args(["target", "list", "--installed"]).output() else {
        // No rustup: let cargo report what is missing.
        return Ok(());
    };
    let installed = String::from_utf8_lossy(&out.stdout);
    if !installed.lines().any(|l| l.trim() == "wasm32-wasip2") {
        bail!(
            "the Rust target wasm32-wasip2 is not installed, so components cannot be built.\n\
             Add it with:  rustup target add wasm32-wasip2"
        );
    }
    Ok(())
}

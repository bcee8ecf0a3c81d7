//! `cim-host check FILE --event EVENT`: the verdict a push would get, offline — the same
//! checks (header, shape against the pools, imports and features, world, instantiation under
//! the component's limits) on a runtime configured like `cim-host up` with the same flags
//! and manifest, and the memory headroom line.

use std::path::Path;

use anyhow::Context as _;

use crate::handlers::Event;
use crate::manifest::Manifest;
use crate::runtime::{Capabilities, Runtime, RuntimeConfig, world_of};

/// Checks the component in `file` for `event`, with the limits and capabilities the
/// manifest gives the component that handles `event` (if a manifest is given). Returns the
/// report; a refusal is an error with the reason and its fix.
pub async fn check(
    file: &Path,
    event: Event,
    manifest: Option<&Manifest>,
    config: RuntimeConfig,
) -> anyhow::Result<String> {
    let wasm = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let spec = manifest.and_then(|m| m.component_for(event));
    let name = spec.map_or_else(|| format!("{event}-handler"), |s| s.id.clone());
    let caps = spec.map(Capabilities::from_spec).unwrap_or_default();
    let runtime = Runtime::new(config)?;
    let loaded = runtime
        .load(event, &name, wasm, caps, file.display().to_string())
        .await
        .with_context(|| format!("{} would be refused as `{name}`", file.display()))?;
    let (world, _) = world_of(event);
    let limits = loaded.limits;
    let headroom = loaded.headroom().map_or_else(|| "starting memory unknown".to_owned(), |h| h.to_string());
    Ok(format!(
        "ok: {} implements {world} and would be accepted as `{name}` ({} bytes, sha256 {})\n\
         {headroom}; deadline {} ms, at most {} instances\n\
         {} core instances, {} memories, {} tables per instance",
        file.display(),
        loaded.size,
        loaded.sha256,
        limits.deadline.as_millis(),
        limits.max_instances,
        loaded.shape.core_instances,
        loaded.shape.memories,
        loaded.shape.tables,
    ))
}

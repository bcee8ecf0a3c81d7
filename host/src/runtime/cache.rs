//! Compiled components on disk, keyed by the wasm's sha256 and the engine's precompile
//! compatibility hash, so a restart (or re-uploading the same bytes) skips Cranelift:
//! deserializing takes tens of microseconds where compiling takes tens of milliseconds.
//!
//! A missing, unreadable or incompatible entry is never an error: the component is compiled
//! and the entry rewritten.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Where compiled artifacts live, for one engine configuration.
#[derive(Debug, Clone)]
pub(crate) struct CompileCache {
    dir: PathBuf,
    /// Distinguishes engine configurations (wasmtime version, target, settings).
    engine_tag: String,
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompiledFrom {
    /// Deserialized from the disk cache.
    Cache,
    /// Compiled now.
    Compiler,
}

impl CompileCache {
    pub(crate) fn new(dir: PathBuf, engine: &Engine) -> CompileCache {
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        CompileCache { dir, engine_tag: format!("{:016x}", hasher.finish()) }
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_tag))
    }

    /// The component for `wasm` (whose digest is `sha256`), from the cache if possible.
    pub(crate) fn get_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        sha256: &str,
    ) -> wasmtime::Result<(Component, CompiledFrom)> {
        let path = self.path(sha256);
        if path.exists() {
            match deserialize_cached(engine, &path) {
                Ok(component) => return Ok((component, CompiledFrom::Cache)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compile cache entry")
                }
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = self.store(&path, &component) {
            tracing::warn!(path = %path.display(), error = %e, "could not write compile cache entry");
        }
        Ok((component, CompiledFrom::Compiler))
    }

    fn store(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(super::engine::to_anyhow)?;
        std::fs::create_dir_all(&self.dir)?;
        // Write then rename, so a concurrent reader never maps a half-written file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// Loads a compiled artifact from the cache directory.
///
/// The file is read into memory rather than mapped (`Component::deserialize_file`): a mapped
/// file that someone truncates in place (a cleanup job, an operator) would crash the whole
/// host with SIGBUS the next time the guest's code is touched.
#[allow(unsafe_code)]
fn deserialize_cached(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    let bytes = std::fs::read(path)?;
    // SAFETY: `deserialize` trusts the bytes to be machine code produced by
    // `Component::serialize`. Files in the cache directory are written only by
    // `CompileCache::store` above (from a component this host compiled, renamed into place
    // atomically), and wasmtime checks the header, version and engine compatibility before
    // use. The cache directory must therefore be writable by this host only.
    unsafe { Component::deserialize(engine, &bytes) }
}

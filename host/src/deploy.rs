//! Uploaded component versions, persisted in the data directory so they survive a
//! restart: `<data>/components/<name>/<sha256>.wasm` plus `state.json`, the stack of pushed
//! versions (the last one is active; a rollback pops it; an empty stack means the
//! manifest's own version).
//!
//! In a cluster the stack and the `.wasm` bytes also live in Redis (key-value store
//! [`SHARED_STORE`]) and every push or rollback is announced on the cluster channel, so
//! every node follows it ([`Deployments::sync`]); Redis is then the source of truth.
//!
//! Bytes read back (from disk at a restart, from the shared store when following the
//! cluster) are named by their sha256 and checked against it before they are compiled: a
//! mismatch ([`Corrupt`]) is logged and refused, and the version running stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::cluster::{Bus, ClusterMessage};
use crate::handlers::Event;
use crate::manifest::Manifest;
use crate::runtime::{Capabilities, LoadError, Loaded, Runtime};
use crate::store::{Quota, Store};

/// The key-value store holding cluster-wide component versions. Its name is in the host's
/// reserved `cim-` namespace ([`crate::store::RESERVED_STORE_PREFIX`]): no manifest may grant it
/// and no guest may touch it, so a component cannot read or replace pushed versions.
pub const SHARED_STORE: &str = "cim-components";

/// Where a cluster keeps its component versions.
#[derive(Debug, Clone)]
pub struct Shared {
    pub store: Store,
    pub bus: Bus,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// sha256 of each pushed version, oldest first.
    stack: Vec<String>,
}

/// Why an upload or rollback did not happen. Nothing changed in that case.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("no component named `{0}` in the manifest")]
    UnknownComponent(String),
    #[error("component `{name}` was not replaced: {source}")]
    Invalid {
        name: String,
        #[source]
        source: LoadError,
    },
    #[error("component `{0}` has no pushed version to roll back")]
    NothingToRollBack(String),
    #[error("could not persist component `{name}`: {source:#}")]
    Persist { name: String, source: anyhow::Error },
}

/// Stored component bytes whose sha256 is not the one they were stored under (a corrupt
/// disk, a tampered store): never compiled.
#[derive(Debug, thiserror::Error)]
#[error(
    "version {expected} of `{component}` read from {from} has sha256 {actual}: corrupt or tampered, not loaded"
)]
pub struct Corrupt {
    pub component: String,
    pub expected: String,
    pub actual: String,
    pub from: String,
}

/// `wasm` if its sha256 is `expected`, else [`Corrupt`] (logged here, with what stays).
fn verified(component: &str, expected: &str, from: &str, wasm: Vec<u8>) -> Result<Vec<u8>, Corrupt> {
    let actual = hex::encode(Sha256::digest(&wasm));
    if actual.eq_ignore_ascii_case(expected) {
        return Ok(wasm);
    }
    let e = Corrupt {
        component: component.to_owned(),
        expected: expected.to_owned(),
        actual,
        from: from.to_owned(),
    };
    warn!(component, error = %e, "stored component bytes refused; the running version stays");
    Err(e)
}

/// Pushes and rollbacks of components, applied to the runtime and persisted.
#[derive(Debug)]
pub struct Deployments {
    dir: PathBuf,
    manifest: Arc<Manifest>,
    runtime: Arc<Runtime>,
    shared: Option<Shared>,
    /// One push, rollback or sync at a time, so the runtime and the files agree.
    lock: Mutex<()>,
}

impl Deployments {
    pub fn new(
        data_dir: &Path,
        manifest: Arc<Manifest>,
        runtime: Arc<Runtime>,
        shared: Option<Shared>,
    ) -> Self {
        Deployments { dir: data_dir.join("components"), manifest, runtime, shared, lock: Mutex::new(()) }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    fn event_of(&self, name: &str) -> Result<(Event, Capabilities), DeployError> {
        let spec = self
            .manifest
            .components
            .get(name)
            .ok_or_else(|| DeployError::UnknownComponent(name.to_owned()))?;
        let event = self
            .manifest
            .triggers
            .iter()
            .find_map(|(event, component)| (component == name).then_some(*event))
            .ok_or_else(|| DeployError::UnknownComponent(name.to_owned()))?;
        Ok((event, Capabilities::from_spec(spec)))
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("state.json")
    }

    fn read_state(&self, name: &str) -> anyhow::Result<State> {
        match std::fs::read(self.state_path(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes).context("state.json is not valid"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e.into()),
        }
    }

    fn write_state(&self, name: &str, state: &State) -> anyhow::Result<()> {
        let path = self.state_path(name);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Compiles and checks `wasm` against the component's world, then swaps it in and
    /// records it. A bad upload changes nothing.
    pub async fn push(&self, name: &str, wasm: Vec<u8>) -> Result<Arc<Loaded>, DeployError> {
        let (event, caps) = self.event_of(name)?;
        let _guard = self.lock.lock().await;
        let bytes = wasm.clone();
        let loaded = self
            .runtime
            .load(event, name, wasm, caps, "upload")
            .await
            .map_err(|source| DeployError::Invalid { name: name.to_owned(), source })?;
        let persist = || -> anyhow::Result<()> {
            let dir = self.dir.join(name);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(format!("{}.wasm", loaded.sha256)), &bytes)?;
            let mut state = self.read_state(name)?;
            state.stack.push(loaded.sha256.clone());
            // Keep no more than the runtime can roll back to.
            let keep = self.runtime.config().history.max(1);
            if state.stack.len() > keep {
                let drop = state.stack.len() - keep;
                state.stack.drain(..drop);
            }
            self.write_state(name, &state)
        };
        persist().map_err(|source| DeployError::Persist { name: name.to_owned(), source })?;
        if let Some(shared) = &self.shared {
            let publish = async {
                shared
                    .store
                    .kv_set(SHARED_STORE, &format!("wasm:{}", loaded.sha256), bytes.clone(), Quota::NONE)
                    .await?;
                let mut stack = self.shared_stack(shared, name).await?;
                stack.push(loaded.sha256.clone());
                self.set_shared_stack(shared, name, &stack).await
            };
            publish.await.map_err(|source| DeployError::Persist { name: name.to_owned(), source })?;
        }
        self.runtime.install(loaded.clone());
        self.announce(name, &loaded.sha256).await;
        info!(component = name, %event, version = loaded.version, sha256 = %loaded.sha256, "component pushed");
        Ok(loaded)
    }

    /// Goes back to the version before the last push.
    pub async fn rollback(&self, name: &str) -> Result<Arc<Loaded>, DeployError> {
        let (event, _) = self.event_of(name)?;
        let _guard = self.lock.lock().await;
        if let Some(shared) = &self.shared {
            let mut stack = self
                .shared_stack(shared, name)
                .await
                .map_err(|source| DeployError::Persist { name: name.to_owned(), source })?;
            if stack.pop().is_none() {
                return Err(DeployError::NothingToRollBack(name.to_owned()));
            }
            self.set_shared_stack(shared, name, &stack)
                .await
                .map_err(|source| DeployError::Persist { name: name.to_owned(), source })?;
            let loaded = self
                .apply(name, stack.last().map(String::as_str))
                .await
                .map_err(|source| DeployError::Persist { name: name.to_owned(), source })?;
            self.announce(name, &loaded.sha256).await;
            return Ok(loaded);
        }
        let mut state =
            self.read_state(name).map_err(|source| DeployError::Persist { name: name.to_owned(), source })?;
        if state.stack.pop().is_none() {
            return Err(DeployError::NothingToRollBack(name.to_owned()));
        }
        self.runtime.rollback(event).ok_or_else(|| DeployError::NothingToRollBack(name.to_owned()))?;
        self.write_state(name, &state)
            .map_err(|source| DeployError::Persist { name: name.to_owned(), source })?;
        let current =
            self.runtime.current(event).ok_or_else(|| DeployError::NothingToRollBack(name.to_owned()))?;
        info!(component = name, %event, version = current.version, "component rolled back");
        Ok(current)
    }

    async fn shared_stack(&self, shared: &Shared, name: &str) -> anyhow::Result<Vec<String>> {
        match shared.store.kv_get(SHARED_STORE, &format!("stack:{name}")).await? {
            Some(bytes) => Ok(serde_json::from_slice(&bytes)?),
            None => Ok(Vec::new()),
        }
    }

    async fn set_shared_stack(&self, shared: &Shared, name: &str, stack: &[String]) -> anyhow::Result<()> {
        let keep = self.runtime.config().history.max(1);
        let stack = &stack[stack.len().saturating_sub(keep)..];
        shared
            .store
            .kv_set(SHARED_STORE, &format!("stack:{name}"), serde_json::to_vec(stack)?, Quota::NONE)
            .await?;
        Ok(())
    }

    async fn announce(&self, name: &str, sha256: &str) {
        if let Some(shared) = &self.shared {
            let msg = ClusterMessage::ComponentChanged { name: name.to_owned(), sha256: sha256.to_owned() };
            if let Err(e) = shared.bus.broadcast(&msg).await {
                warn!(component = name, error = %e, "could not announce a component change to the cluster");
            }
        }
    }

    /// Makes `sha256` (a pushed version in the shared store) or, for `None`, the manifest's
    /// own version the active one, unless it already is.
    async fn apply(&self, name: &str, sha256: Option<&str>) -> anyhow::Result<Arc<Loaded>> {
        let (event, caps) = self.event_of(name)?;
        if let Some(current) = self.runtime.current(event)
            && sha256.is_some_and(|s| s == current.sha256)
        {
            return Ok(current);
        }
        let (wasm, source) = match (sha256, &self.shared) {
            (Some(sha), Some(shared)) => {
                let wasm =
                    shared.store.kv_get(SHARED_STORE, &format!("wasm:{sha}")).await?.with_context(|| {
                        format!("version {sha} of `{name}` is missing from the shared store")
                    })?;
                (verified(name, sha, "the shared store", wasm)?, "upload".to_owned())
            }
            _ => {
                let spec =
                    self.manifest.components.get(name).context("component vanished from the manifest")?;
                let source = spec.source.display().to_string();
                if let Some(current) = self.runtime.current(event)
                    && current.source == source
                {
                    return Ok(current);
                }
                let wasm = std::fs::read(&spec.source)
                    .with_context(|| format!("reading {}", spec.source.display()))?;
                (wasm, source)
            }
        };
        let loaded = self.runtime.load(event, name, wasm, caps, source).await?;
        self.runtime.install(loaded.clone());
        info!(component = name, %event, version = loaded.version, sha256 = %loaded.sha256, "component synced with the cluster");
        Ok(loaded)
    }

    /// Follows the cluster: makes the version on top of the shared stack active.
    pub async fn sync(&self, name: &str) -> anyhow::Result<()> {
        let Some(shared) = &self.shared else { return Ok(()) };
        let _guard = self.lock.lock().await;
        let stack = self.shared_stack(shared, name).await?;
        self.apply(name, stack.last().map(String::as_str)).await?;
        Ok(())
    }

    /// Follows the cluster for every component (a periodic check, in case an announcement
    /// was missed while this node's pub/sub connection was down).
    pub async fn sync_all(&self) {
        if self.shared.is_none() {
            return;
        }
        for name in self.manifest.triggers.values() {
            if let Err(e) = self.sync(name).await {
                warn!(component = %name, error = %e, "could not check the component against the cluster");
            }
        }
    }

    /// Re-installs the persisted pushes after the manifest's versions, oldest first, so a
    /// restart keeps the active version and what it can roll back to.
    pub async fn restore(&self) -> anyhow::Result<()> {
        if self.shared.is_some() {
            for name in self.manifest.triggers.values() {
                match self.sync(name).await {
                    Ok(()) => {}
                    // Logged by `verified`; the manifest's version serves meanwhile.
                    Err(e) if e.downcast_ref::<Corrupt>().is_some() => {}
                    Err(e) => return Err(e.context(format!("syncing `{name}` with the cluster"))),
                }
            }
            return Ok(());
        }
        for name in self.manifest.components.keys() {
            let Ok((event, caps)) = self.event_of(name) else { continue };
            let state = self.read_state(name).with_context(|| format!("reading pushes of `{name}`"))?;
            for sha in &state.stack {
                let path = self.dir.join(name).join(format!("{sha}.wasm"));
                let wasm = match std::fs::read(&path) {
                    Ok(w) => w,
                    Err(e) => {
                        warn!(component = %name, path = %path.display(), error = %e, "pushed version missing; skipped");
                        continue;
                    }
                };
                // Logged by `verified`; the version before it stays active.
                let Ok(wasm) = verified(name, sha, &path.display().to_string(), wasm) else { continue };
                let loaded = self
                    .runtime
                    .load(event, name, wasm, caps.clone(), "upload")
                    .await
                    .with_context(|| format!("reloading pushed version {sha} of `{name}`"))?;
                self.runtime.install(loaded);
            }
            if !state.stack.is_empty() {
                info!(component = %name, versions = state.stack.len(), "restored pushed versions");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_must_match_the_sha256_they_are_stored_under() {
        let sha = hex::encode(Sha256::digest(b"wasm"));
        assert_eq!(verified("c", &sha, "disk", b"wasm".to_vec()).unwrap(), b"wasm");
        assert!(verified("c", &sha.to_uppercase(), "disk", b"wasm".to_vec()).is_ok());
        let e = verified("c", &sha, "the shared store", b"wasm!".to_vec()).unwrap_err();
        assert_eq!(e.expected, sha);
        let shown = e.to_string();
        assert!(
            shown.contains("`c`") && shown.contains("the shared store") && shown.contains("not loaded"),
            "{shown}"
        );
        let wrapped = anyhow::Error::from(e).context("syncing");
        assert!(wrapped.downcast_ref::<Corrupt>().is_some(), "restore tells it from other failures");
    }

    /// A node following the cluster reads a pushed version whose bytes in the shared store no
    /// longer match their sha256: it refuses it and keeps serving what it had, and a restart
    /// on such a store still comes up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tampered_version_in_the_shared_store_is_not_followed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // Builds the components if they are not yet (a fresh clone): the manifest names them.
        let wasm = crate::runtime::tests::wasm("word_filter");
        let other = crate::runtime::tests::wasm("group_members");
        let manifest = Arc::new(Manifest::load(root.join("spin.toml")).expect("spin.toml"));
        let redis = crate::store::redis::test_support::TestRedis::new();
        let node = |data: &std::path::Path| {
            let (manifest, data) = (manifest.clone(), data.to_owned());
            let redis = &redis;
            async move {
                let redis_store = redis.store().await;
                let shared = Shared {
                    bus: Bus::new(&redis_store),
                    store: Store::from_redis(Arc::new(redis_store), Default::default()),
                };
                let config = crate::runtime::RuntimeConfig { max_instances: 16, ..Default::default() };
                let runtime = Arc::new(Runtime::new(config).expect("runtime"));
                runtime.install_manifest(&manifest).await.expect("install the manifest");
                Deployments::new(&data, manifest, runtime, Some(shared))
            }
        };
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (node(dir_a.path()).await, node(dir_b.path()).await);
        let manifest_version = b.runtime().current(Event::Group).expect("group").sha256.clone();

        let pushed = a.push("group-send", wasm).await.expect("push").sha256.clone();
        // Another valid component (`other`) under the pushed version's key.
        let store = &a.shared.as_ref().unwrap().store;
        store.kv_set(SHARED_STORE, &format!("wasm:{pushed}"), other, Quota::NONE).await.unwrap();

        let err = b.sync("group-send").await.expect_err("tampered bytes");
        assert!(err.downcast_ref::<Corrupt>().is_some(), "{err:#}");
        assert_eq!(b.runtime().current(Event::Group).unwrap().sha256, manifest_version, "b kept its version");
        b.restore().await.expect("a restart still comes up");
        assert_eq!(b.runtime().current(Event::Group).unwrap().sha256, manifest_version);
        redis.cleanup().await;
    }
}

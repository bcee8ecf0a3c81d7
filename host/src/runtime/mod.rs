//! The component runtime: loads handler components, checks them against their event's WIT
//! world, hot-swaps them, and runs each request in a fresh sandboxed instance.
//!
//! - `engine`: the wasmtime engine, pools, epoch ticker, linker and the `cim-wasm` executor.
//! - `bindings`: the generated bindings (private).
//! - `host_api`: the imports guests call (presence, key-value, variables, log, clock) and
//!   the capability checks.
//! - `log_limit`: the per-component rate limit on guest log lines.
//! - `limits`: per-component limits (memory cap, deadline, instances), a `.wasm`'s shape
//!   and the pool shape it must fit, memory headroom.
//! - `component`: a loaded component and the per-event hot-swap slot.
//! - `cache`: compiled artifacts on disk, keyed by sha256.
//! - `call`: one request, from a fresh store to a decision or a readable failure.
//! - `convert`: host types ⇄ WIT types.
//!
//! Guests run on their own tokio runtime (`cim-wasm` threads): a guest that computes until its
//! deadline yields every epoch tick there, never on the runtime that drives sockets.

mod bindings;
mod cache;
mod call;
mod component;
mod convert;
mod engine;
mod host_api;
mod limits;
mod log_limit;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use cim_proto::User;
use serde::Serialize;
use tracing::{info, warn};

pub use cache::CompiledFrom;
pub use component::{LoadError, Loaded, WIT_PACKAGE, world_of};
pub use engine::{EPOCH_TICK, RuntimeConfig};
pub use host_api::{Capabilities, MAX_KEY_BYTES, MAX_LIST_LEN, MAX_LOG_BYTES, MAX_VALUE_BYTES};
pub use limits::{Headroom, LimitOverrides, Limits, LimitsJson, PoolShape, Shape, mib};

use self::call::{Input, Output};
use self::component::{LoadRequest, Slot};
use self::engine::WasmEngine;
use crate::handlers::{
    Context, Delivered, Event, GroupDecision, HandlerError, LoginDecision, LoginRequest, Message,
    PrivateRequest, SendDecision,
};
use crate::manifest::Manifest;

/// The handler components of this node, one slot per event.
pub struct Runtime {
    engine: Arc<WasmEngine>,
    cache: Option<cache::CompileCache>,
    /// Indexed by [`slot_index`].
    slots: [Slot; 5],
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("engine", &self.engine).field("components", &self.list()).finish()
    }
}

/// One component version, as `GET /admin/components` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentInfo {
    #[serde(serialize_with = "event_name")]
    pub event: Event,
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size: usize,
    /// Milliseconds since the Unix epoch.
    pub loaded_at_ms: u64,
    pub source: String,
    /// Serving requests now (otherwise kept for rollback).
    pub active: bool,
    /// Its memory cap, deadline and most concurrent instances.
    pub limits: LimitsJson,
    /// Bytes of its largest linear memory right after instantiation.
    pub starting_memory: Option<usize>,
    /// `starting memory 12.3 MiB of 16 MiB`: what a call may still allocate.
    pub headroom: Option<String>,
}

fn event_name<S: serde::Serializer>(event: &Event, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(event.as_str())
}

impl ComponentInfo {
    fn of(loaded: &Loaded, active: bool) -> Self {
        ComponentInfo {
            event: loaded.event,
            name: loaded.name.to_string(),
            version: loaded.version,
            sha256: loaded.sha256.clone(),
            size: loaded.size,
            loaded_at_ms: loaded.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            source: loaded.source.clone(),
            active,
            limits: loaded.limits.into(),
            starting_memory: loaded.starting_memory.get().copied(),
            headroom: loaded.headroom().map(|h| h.to_string()),
        }
    }
}

/// Why the components of a manifest could not be installed. Nothing is installed then.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("component `{component}`: cannot read {path}: {source}")]
    Read {
        component: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("component `{component}` for the {event} event: {source}")]
    Load {
        component: String,
        event: Event,
        #[source]
        source: LoadError,
    },
}

fn slot_index(event: Event) -> usize {
    match event {
        Event::Login => 0,
        Event::Private => 1,
        Event::Group => 2,
        Event::Online => 3,
        Event::Callback => 4,
    }
}

impl Runtime {
    /// Configures the engine and starts the epoch ticker and the `cim-wasm` threads. No
    /// component is installed yet.
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Runtime> {
        let history = config.history;
        let engine = WasmEngine::new(config)?;
        let cache = engine.config.cache_dir.clone().map(|dir| cache::CompileCache::new(dir, &engine.engine));
        Ok(Runtime { engine: Arc::new(engine), cache, slots: std::array::from_fn(|_| Slot::new(history)) })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.engine.config
    }

    fn slot(&self, event: Event) -> &Slot {
        &self.slots[slot_index(event)]
    }

    /// Compiles `wasm` (or takes it from the cache), checks it against `event`'s world and
    /// pre-instantiates it. Does not install it: see [`Runtime::install`].
    pub async fn load(
        &self,
        event: Event,
        name: &str,
        wasm: Vec<u8>,
        caps: Capabilities,
        source: impl Into<String>,
    ) -> Result<Arc<Loaded>, LoadError> {
        let req = LoadRequest {
            event,
            name: name.to_owned(),
            caps,
            source: source.into(),
            version: self.slot(event).next_version(),
        };
        let engine = self.engine.clone();
        let cache = self.cache.clone();
        let compile = move || Loaded::compile(&engine, cache.as_ref(), &wasm, req);
        // Compiling blocks for tens of milliseconds: keep it off every async worker.
        let loaded = self
            .engine
            .spawn_blocking(compile)
            .await
            .map_err(|e| LoadError::Compile(format!("the compile task failed: {e}")))??;
        let loaded = Arc::new(loaded);
        let engine = self.engine.clone();
        let check = loaded.clone();
        self.engine
            .spawn(async move { check.check_instantiates(&engine).await })
            .await
            .map_err(|e| LoadError::Instantiate(format!("the check task failed: {e}")))??;
        Ok(loaded)
    }

    /// Makes `loaded` serve its event from the next request on; requests already running
    /// finish on the version they started with. Returns the replaced version (kept for
    /// [`Runtime::rollback`]).
    pub fn install(&self, loaded: Arc<Loaded>) -> Option<Arc<Loaded>> {
        let (event, name, version, sha) =
            (loaded.event, loaded.name.clone(), loaded.version, loaded.sha256.clone());
        let old = self.slot(event).swap(loaded);
        info!(
            event = %event,
            component = %name,
            version,
            sha256 = %sha,
            replaced = old.as_ref().map(|o| o.version),
            "component installed"
        );
        old
    }

    /// Reinstates the version `event`'s current component replaced; `None` if there is none.
    /// The version rolled back from is dropped (it is not a "redo" entry).
    pub fn rollback(&self, event: Event) -> Option<Arc<Loaded>> {
        let (restored, replaced) = self.slot(event).rollback()?;
        info!(
            event = %event,
            component = %restored.name,
            version = restored.version,
            replaced = replaced.as_ref().map(|r| r.version),
            "component rolled back"
        );
        Some(restored)
    }

    /// The component serving `event` now.
    pub fn current(&self, event: Event) -> Option<Arc<Loaded>> {
        self.slot(event).current()
    }

    /// Every installed component and the versions kept for rollback, by event.
    pub fn list(&self) -> Vec<ComponentInfo> {
        let mut out = Vec::new();
        for event in Event::ALL {
            let slot = self.slot(event);
            if let Some(current) = slot.current() {
                out.push(ComponentInfo::of(&current, true));
            }
            out.extend(slot.history().iter().map(|old| ComponentInfo::of(old, false)));
        }
        out
    }

    /// Loads every event's component from a validated manifest and installs them all, or
    /// none if any fails.
    pub async fn install_manifest(&self, manifest: &Manifest) -> Result<Vec<Arc<Loaded>>, InstallError> {
        let mut loaded = Vec::with_capacity(Event::ALL.len());
        for event in Event::ALL {
            let Some(spec) = manifest.component_for(event) else {
                // A validated manifest maps every event; an unmapped one keeps what it has.
                continue;
            };
            let wasm = tokio::fs::read(&spec.source).await.map_err(|source| InstallError::Read {
                component: spec.id.clone(),
                path: spec.source.clone(),
                source,
            })?;
            let source = spec.source.display().to_string();
            let one = self
                .load(event, &spec.id, wasm, Capabilities::from_spec(spec), source)
                .await
                .map_err(|source| InstallError::Load { component: spec.id.clone(), event, source })?;
            loaded.push(one);
        }
        for one in &loaded {
            self.install(one.clone());
        }
        Ok(loaded)
    }

    async fn invoke(
        &self,
        event: Event,
        ctx: &Context,
        input: Input,
    ) -> Result<(Output, Arc<str>), HandlerError> {
        let Some(loaded) = self.slot(event).current() else {
            return Err(HandlerError {
                event,
                component: "(none)".into(),
                reason: format!("no component is installed for the {event} event"),
            });
        };
        let name = loaded.name.clone();
        let started = std::time::Instant::now();
        let job = call::run(self.engine.clone(), loaded, ctx.clone(), input);
        let result = match self.engine.run(job).await {
            Ok(result) => result,
            Err(e) => Err(format!("host error: the call was aborted ({e})")),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(reason) if reason.starts_with("timed out") => "timeout",
            Err(_) => "failed",
        };
        self.engine.handler_metrics.record(event.as_str(), &name, started.elapsed(), outcome);
        match result {
            Ok(output) => Ok((output, name)),
            Err(reason) => Err(self.failure(event, &name, reason)),
        }
    }

    /// The handler call series (durations and outcomes per event and component).
    pub fn handler_metrics(&self) -> &crate::metrics::HandlerMetrics {
        &self.engine.handler_metrics
    }

    fn failure(&self, event: Event, component: &str, reason: String) -> HandlerError {
        warn!(event = %event, component, reason = %reason, "handler failed");
        HandlerError { event, component: component.to_owned(), reason }
    }

    fn wrong_output(&self, event: Event, component: &str) -> HandlerError {
        self.failure(event, component, "host bug: the component returned another world's result".into())
    }

    /// Whether `user` may log in.
    pub async fn login(&self, ctx: &Context, req: LoginRequest) -> Result<LoginDecision, HandlerError> {
        let event = Event::Login;
        match self.invoke(event, ctx, Input::Login(convert::login_request(req))).await? {
            (Output::Login(d), _) => Ok(convert::login_decision(d)),
            (_, name) => Err(self.wrong_output(event, &name)),
        }
    }

    /// One decision per request, in order. An empty batch runs nothing.
    pub async fn private(
        &self,
        ctx: &Context,
        batch: Vec<PrivateRequest>,
    ) -> Result<Vec<SendDecision>, HandlerError> {
        let event = Event::Private;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let len = batch.len();
        let input = Input::Private(batch.into_iter().map(convert::private_request).collect());
        match self.invoke(event, ctx, input).await? {
            (Output::Private(d), name) => {
                self.check_len(event, &name, len, d.len())?;
                Ok(d.into_iter().map(convert::send_decision).collect())
            }
            (_, name) => Err(self.wrong_output(event, &name)),
        }
    }

    /// One decision per message, in order. An empty batch runs nothing.
    pub async fn group(
        &self,
        ctx: &Context,
        batch: Vec<Message>,
    ) -> Result<Vec<GroupDecision>, HandlerError> {
        let event = Event::Group;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let len = batch.len();
        let input = Input::Group(batch.into_iter().map(convert::message).collect());
        match self.invoke(event, ctx, input).await? {
            (Output::Group(d), name) => {
                self.check_len(event, &name, len, d.len())?;
                Ok(d.into_iter().map(convert::group_decision).collect())
            }
            (_, name) => Err(self.wrong_output(event, &name)),
        }
    }

    /// The part of `online` that `caller` may see, in the component's order. Users the
    /// component made up (not in `online`) are dropped, and each user appears once, as the
    /// host knows them.
    pub async fn online(
        &self,
        ctx: &Context,
        caller: User,
        online: Vec<User>,
    ) -> Result<Vec<User>, HandlerError> {
        let event = Event::Online;
        let input = Input::Online(convert::user(caller), online.iter().cloned().map(convert::user).collect());
        match self.invoke(event, ctx, input).await? {
            (Output::Online(visible), _) => {
                let mut known: HashMap<u64, User> = online.into_iter().map(|u| (u.id, u)).collect();
                // `remove` keeps each user once and drops ids that were never online.
                Ok(visible.into_iter().filter_map(|u| known.remove(&u.id)).collect())
            }
            (_, name) => Err(self.wrong_output(event, &name)),
        }
    }

    /// Shows delivered messages to the message callback. An empty batch runs nothing.
    pub async fn callback(&self, ctx: &Context, batch: Vec<Delivered>) -> Result<(), HandlerError> {
        let event = Event::Callback;
        if batch.is_empty() {
            return Ok(());
        }
        let input = Input::Callback(batch.into_iter().map(convert::delivered).collect());
        match self.invoke(event, ctx, input).await? {
            (Output::Callback, _) => Ok(()),
            (_, name) => Err(self.wrong_output(event, &name)),
        }
    }

    fn check_len(&self, event: Event, component: &str, asked: usize, got: usize) -> Result<(), HandlerError> {
        if asked == got {
            Ok(())
        } else {
            Err(self.failure(
                event,
                component,
                format!("returned {got} decision(s) for a batch of {asked}; the whole batch fails"),
            ))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

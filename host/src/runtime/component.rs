//! A loaded component ([`Loaded`]: compiled, checked against its event's world and
//! pre-instantiated) and the per-event [`Slot`] that hot-swaps it: requests `load_full()` the
//! current version and finish on it, whatever is installed meanwhile.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Instance, InstancePre};

use super::bindings::{group_send, login, message_callback, online_list, private_send};
use super::cache::{CompileCache, CompiledFrom};
use super::engine::WasmEngine;
use super::host_api::{Capabilities, HostState};
use super::limits::{Headroom, Limits, Shape, async_fix, mib};
use crate::handlers::{Context, Event};

/// The WIT package every handler world belongs to.
pub const WIT_PACKAGE: &str = "cim:im@0.2.0";

/// Why a `.wasm` was refused. Nothing is installed when loading fails.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// Random bytes, a core module, or a truncated file.
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    /// A component, but not of the world this event needs.
    #[error("component does not implement the `{expected}` world: {detail}")]
    WrongWorld { expected: String, detail: String },
    /// The component did not validate or compile.
    #[error("component failed to compile: {0}")]
    Compile(String),
    /// The component compiled but cannot be instantiated within this host's limits.
    #[error("component cannot be instantiated: {0}")]
    Instantiate(String),
    /// The component needs something this host does not provide (an import, a feature); the
    /// message says how to build it instead.
    #[error("component is not supported by this host: {0}")]
    Unsupported(String),
    /// The component does not fit the limits it would run under; the message names the
    /// spin.toml key or flag to change.
    #[error("component does not fit: {0}")]
    TooBig(String),
}

/// The world and the export an event's component must have.
pub fn world_of(event: Event) -> (&'static str, &'static str) {
    match event {
        Event::Login => ("cim:im/login@0.2.0", "cim:im/login-handler@0.2.0"),
        Event::Private => ("cim:im/private-send@0.2.0", "cim:im/private-handler@0.2.0"),
        Event::Group => ("cim:im/group-send@0.2.0", "cim:im/group-handler@0.2.0"),
        Event::Online => ("cim:im/online-list@0.2.0", "cim:im/online-handler@0.2.0"),
        Event::Callback => ("cim:im/message-callback@0.2.0", "cim:im/callback-handler@0.2.0"),
    }
}

/// A component pre-instantiated for one world.
#[derive(Clone)]
pub(crate) enum WorldPre {
    Login(login::LoginPre<HostState>),
    Private(private_send::PrivateSendPre<HostState>),
    Group(group_send::GroupSendPre<HostState>),
    Online(online_list::OnlineListPre<HostState>),
    Callback(message_callback::MessageCallbackPre<HostState>),
}

impl WorldPre {
    fn new(event: Event, pre: InstancePre<HostState>) -> wasmtime::Result<WorldPre> {
        Ok(match event {
            Event::Login => WorldPre::Login(login::LoginPre::new(pre)?),
            Event::Private => WorldPre::Private(private_send::PrivateSendPre::new(pre)?),
            Event::Group => WorldPre::Group(group_send::GroupSendPre::new(pre)?),
            Event::Online => WorldPre::Online(online_list::OnlineListPre::new(pre)?),
            Event::Callback => WorldPre::Callback(message_callback::MessageCallbackPre::new(pre)?),
        })
    }

    fn instance_pre(&self) -> &InstancePre<HostState> {
        match self {
            WorldPre::Login(pre) => pre.instance_pre(),
            WorldPre::Private(pre) => pre.instance_pre(),
            WorldPre::Group(pre) => pre.instance_pre(),
            WorldPre::Online(pre) => pre.instance_pre(),
            WorldPre::Callback(pre) => pre.instance_pre(),
        }
    }

    /// Type-checks the world's exports on an instance (done lazily, at instantiation).
    fn check_exports(
        &self,
        store: &mut wasmtime::Store<HostState>,
        instance: &Instance,
    ) -> wasmtime::Result<()> {
        match self {
            WorldPre::Login(_) => login::Login::new(store, instance).map(drop),
            WorldPre::Private(_) => private_send::PrivateSend::new(store, instance).map(drop),
            WorldPre::Group(_) => group_send::GroupSend::new(store, instance).map(drop),
            WorldPre::Online(_) => online_list::OnlineList::new(store, instance).map(drop),
            WorldPre::Callback(_) => message_callback::MessageCallback::new(store, instance).map(drop),
        }
    }
}

/// A component ready to serve one event: compiled, checked and pre-instantiated.
pub struct Loaded {
    /// The component id (spin.toml) or upload name.
    pub name: Arc<str>,
    pub event: Event,
    /// Per event, increasing with every load attempt (failed loads leave gaps).
    pub version: u64,
    /// Hex sha256 of the `.wasm`.
    pub sha256: String,
    /// Size of the `.wasm` in bytes.
    pub size: usize,
    pub loaded_at: SystemTime,
    /// Where it came from (a path, or "upload").
    pub source: String,
    pub compiled_from: CompiledFrom,
    /// What it may use: memory cap, deadline, concurrent instances.
    pub limits: Limits,
    /// Its core instances, memories and tables, as read from the `.wasm`.
    pub shape: Shape,
    /// The size of its largest linear memory after instantiation, measured once at load.
    pub(crate) starting_memory: std::sync::OnceLock<usize>,
    /// One permit per instance alive ([`Limits::max_instances`]).
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    pub(crate) caps: Arc<Capabilities>,
    pub(crate) pre: WorldPre,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("name", &self.name)
            .field("event", &self.event)
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .field("source", &self.source)
            .field("compiled_from", &self.compiled_from)
            .field("limits", &self.limits)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

/// What [`Loaded::compile`] needs besides the bytes.
pub(crate) struct LoadRequest {
    pub event: Event,
    pub name: String,
    pub caps: Capabilities,
    pub source: String,
    pub version: u64,
}

impl Loaded {
    /// Compiles (or fetches from the cache) and links `wasm` for `req.event`. Blocking: call
    /// it from `spawn_blocking`.
    pub(crate) fn compile(
        engine: &WasmEngine,
        cache: Option<&CompileCache>,
        wasm: &[u8],
        req: LoadRequest,
    ) -> Result<Loaded, LoadError> {
        check_header(wasm)?;
        let limits = Limits::resolve(&engine.config, req.event, &req.caps.limits);
        // Cheap checks first: a component refused here costs no compile (seconds for Python).
        let shape =
            Shape::of(wasm).map_err(|e| LoadError::Compile(format!("cannot read its sections: {e}")))?;
        if let Some(fix) = shape.unsupported_import().or_else(|| shape.async_refusal()) {
            return Err(LoadError::Unsupported(fix));
        }
        if let Some(why) = shape.misfit(&engine.config.pool) {
            return Err(LoadError::TooBig(why));
        }
        let initial = usize::try_from(shape.largest_initial_memory).unwrap_or(usize::MAX);
        if initial > limits.memory_cap {
            return Err(over_cap(initial, limits.memory_cap, &req.name));
        }
        if limits.memory_cap > engine.config.memory_slot() {
            return Err(LoadError::TooBig(format!(
                "its memory cap of {} is more than this host's pool slots of {}: lower `memory_mib` \
                 under [component.{}.limits] in spin.toml, or start cim-host with a larger \
                 --handler-memory-mib",
                mib(limits.memory_cap),
                mib(engine.config.memory_slot()),
                req.name
            )));
        }
        let sha256 = hex::encode(Sha256::digest(wasm));
        let (component, compiled_from) = match cache {
            Some(cache) => cache.get_or_compile(&engine.engine, wasm, &sha256),
            None => Component::new(&engine.engine, wasm).map(|c| (c, CompiledFrom::Compiler)),
        }
        .map_err(|e| compile_error(format!("{e:#}")))?;

        let (world, export) = world_of(req.event);
        let wrong_world = |detail: String| LoadError::WrongWorld { expected: world.to_owned(), detail };
        let pre = engine.linker.instantiate_pre(&component).map_err(|e| wrong_world(format!("{e:#}")))?;
        let pre = WorldPre::new(req.event, pre).map_err(|_| {
            let exports = exported_names(&engine.engine, &component);
            let found = if exports.is_empty() { "nothing".to_owned() } else { exports.join(", ") };
            wrong_world(format!("component exports {found} but the {} event needs {export}", req.event))
        })?;

        Ok(Loaded {
            name: req.name.into(),
            event: req.event,
            version: req.version,
            sha256,
            size: wasm.len(),
            loaded_at: SystemTime::now(),
            source: req.source,
            compiled_from,
            permits: Arc::new(tokio::sync::Semaphore::new(limits.max_instances as usize)),
            limits,
            shape,
            starting_memory: std::sync::OnceLock::new(),
            caps: Arc::new(req.caps),
            pre,
        })
    }

    /// Instantiates once in a scratch store (with an empty throwaway store behind the
    /// imports), which checks the component's initial memory against the limits and
    /// type-checks its exports, before it may replace a working one.
    pub(crate) async fn check_instantiates(&self, engine: &WasmEngine) -> Result<(), LoadError> {
        let mut store = engine.new_store(self, Context::new(crate::store::Store::memory()));
        let instantiated = self.pre.instance_pre().instantiate_async(&mut store).await;
        let limiter = &store.data().limiter;
        let instance = match instantiated {
            Ok(instance) => instance,
            Err(_) if limiter.denied_at_start => {
                let starting = limiter.denied.unwrap_or(limiter.largest_start);
                return Err(over_cap(starting, self.limits.memory_cap, &self.name));
            }
            Err(e) => return Err(LoadError::Instantiate(format!("{e:#}"))),
        };
        let _ = self.starting_memory.set(limiter.largest_start);
        self.pre.check_exports(&mut store, &instance).map_err(|e| {
            let (world, export) = world_of(self.event);
            LoadError::WrongWorld {
                expected: world.to_owned(),
                detail: format!("its {export} does not match the WIT contract: {e:#}"),
            }
        })
    }
}

impl Loaded {
    /// Its starting memory against its cap, once it has been instantiated at load.
    pub fn headroom(&self) -> Option<Headroom> {
        let starting = *self.starting_memory.get()?;
        Some(Headroom { starting, cap: self.limits.memory_cap })
    }
}

/// The refusal of a component whose memory starts at `starting` bytes, over its `cap`.
fn over_cap(starting: usize, cap: usize, name: &str) -> LoadError {
    LoadError::TooBig(format!(
        "it starts with {} of linear memory, more than its cap of {}: raise `memory_mib` under \
         [component.{name}.limits] in spin.toml to at least {} (or --handler-memory-mib for every \
         component)",
        mib(starting),
        mib(cap),
        starting.div_ceil(1 << 20) + 1,
    ))
}

/// A compile failure, with the fix when wasmtime refused a feature a known toolchain adds.
fn compile_error(detail: String) -> LoadError {
    // wasmtime: "`task.cancel` requires the component model async feature".
    if detail.contains("component model async") {
        let what = detail.split('`').nth(1).unwrap_or("an async built-in");
        return LoadError::Unsupported(async_fix(what));
    }
    LoadError::Compile(detail)
}

/// The names a component exports, for error messages.
fn exported_names(engine: &wasmtime::Engine, component: &Component) -> Vec<String> {
    component.component_type().exports(engine).map(|(name, _)| name.to_owned()).collect()
}

/// Refuses what is not a component before spending a compile on it.
fn check_header(wasm: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8; 4] = b"\0asm";
    const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];
    if wasm.len() < 8 || &wasm[..4] != MAGIC {
        return Err(LoadError::NotAComponent(format!(
            "{} bytes without the `\\0asm` header of a WebAssembly binary",
            wasm.len()
        )));
    }
    if wasm[4..8] == CORE_VERSION {
        return Err(LoadError::NotAComponent(
            "this is a core WebAssembly module; build the handler for `wasm32-wasip2` (or wrap it \
             with `wasm-tools component new`) to get a component"
                .to_owned(),
        ));
    }
    // A component is `\0asm` + version 0x0d + layer 1; anything else is some other encoding.
    if wasm[6..8] != [1, 0] {
        return Err(LoadError::NotAComponent(format!(
            "unknown WebAssembly encoding (version/layer bytes {:02x?})",
            &wasm[4..8]
        )));
    }
    Ok(())
}

/// The component serving one event, and the versions it replaced.
pub(crate) struct Slot {
    current: ArcSwapOption<Loaded>,
    /// Replaced versions, newest first; guarded so installs and rollbacks do not interleave.
    history: Mutex<VecDeque<Arc<Loaded>>>,
    history_len: usize,
    next_version: AtomicU64,
}

impl Slot {
    pub(crate) fn new(history_len: usize) -> Slot {
        Slot {
            current: ArcSwapOption::empty(),
            history: Mutex::new(VecDeque::new()),
            history_len,
            next_version: AtomicU64::new(1),
        }
    }

    pub(crate) fn next_version(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed)
    }

    /// The version new requests get. A request keeps the `Arc` until it finishes.
    pub(crate) fn current(&self) -> Option<Arc<Loaded>> {
        self.current.load_full()
    }

    /// Makes `new` current; the replaced version goes to the history and is returned.
    pub(crate) fn swap(&self, new: Arc<Loaded>) -> Option<Arc<Loaded>> {
        let mut history = lock(&self.history);
        let old = self.current.swap(Some(new));
        if let Some(old) = &old {
            history.push_front(old.clone());
            history.truncate(self.history_len);
        }
        old
    }

    /// Reinstates the most recently replaced version; returns it and the version it replaced.
    pub(crate) fn rollback(&self) -> Option<(Arc<Loaded>, Option<Arc<Loaded>>)> {
        let mut history = lock(&self.history);
        let previous = history.pop_front()?;
        let replaced = self.current.swap(Some(previous.clone()));
        Some((previous, replaced))
    }

    /// Versions available to [`Slot::rollback`], newest first.
    pub(crate) fn history(&self) -> Vec<Arc<Loaded>> {
        lock(&self.history).iter().cloned().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a few pointer moves; a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_classified() {
        assert!(
            matches!(check_header(b"hello world"), Err(LoadError::NotAComponent(m)) if m.contains("11 bytes"))
        );
        assert!(
            matches!(check_header(b"\0asm\x01\0\0\0"), Err(LoadError::NotAComponent(m)) if m.contains("core"))
        );
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}

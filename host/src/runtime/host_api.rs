//! What a guest can call on the host (the `host-api` world): presence, the key-value stores,
//! variables, log and clock, each checked against the component's [`Capabilities`]. Also the
//! per-request store state ([`HostState`]) and its memory limiter.
//!
//! Every import returns `wasmtime::Result<…>`: an `Err` there traps the guest (a host-side
//! failure the guest cannot handle), while the inner `Result` is the error the guest sees.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::host_api::cim::im::key_value::{self, Error as KvError, KeyPage};
use super::bindings::host_api::cim::im::log::{self, Level};
use super::bindings::host_api::cim::im::types::{User, UserId};
use super::bindings::host_api::cim::im::{clock, presence, types, variables};
use super::component::Loaded;
use super::limits::LimitOverrides;
use super::log_limit::{Admit, LogLimiter};
use crate::handlers::{Context, Event};
use crate::store::{MAX_PAGE, Quota, StoreError};

/// The largest key a guest may use, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value a guest may store, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The most entries a list (`append`) may keep; a guest's `max-len` is clamped to it.
pub const MAX_LIST_LEN: u32 = 1000;
/// The most entries one `append-many` call may carry.
pub const MAX_APPEND_ENTRIES: usize = 10_000;
/// Log messages are cut to this many bytes.
pub const MAX_LOG_BYTES: usize = 4096;
/// How much of a guest's stderr is kept to explain a trap (a panic message).
const STDERR_CAPTURE_BYTES: usize = 4096;
/// Table elements a guest may grow to (Rust guests use a few hundred).
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// What a component may touch and use, from its `[component.NAME]` table in spin.toml.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The key-value stores it may use; any other store gets `access-denied`.
    pub key_value_stores: Vec<String>,
    /// Its resolved `[component.NAME.variables]`. May hold secrets: `Debug` prints names only.
    pub variables: HashMap<String, String>,
    /// Its `[component.NAME.limits]`; what it leaves out comes from the host's flags.
    pub limits: LimitOverrides,
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.variables.keys().collect();
        names.sort();
        f.debug_struct("Capabilities")
            .field("key_value_stores", &self.key_value_stores)
            .field("variables", &names)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Capabilities {
    /// The capabilities a manifest grants a component.
    pub fn from_spec(spec: &crate::manifest::ComponentSpec) -> Self {
        Capabilities {
            key_value_stores: spec.key_value_stores.clone(),
            variables: spec.variables.clone(),
            limits: spec.limits,
        }
    }
}

/// The state of one request's [`wasmtime::Store`].
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    caps: Arc<Capabilities>,
    /// The most each key-value store may hold ([`RuntimeConfig::kv_quota`](super::RuntimeConfig)).
    quota: Quota,
    /// The runtime's per-component log buckets.
    log_limiter: Arc<LogLimiter>,
    ctx: Context,
    component: Arc<str>,
    event: Event,
    /// When the request started; the deadline counts from here.
    pub(crate) started: Instant,
    /// Set by the epoch callback when it interrupts the guest for its deadline.
    pub(crate) timed_out: bool,
    /// The guest's stderr (a Rust panic message lands here before the trap).
    stderr: MemoryOutputPipe,
    /// Keeps the epoch ticking while this request's store lives.
    _running: super::engine::Running,
}

impl HostState {
    pub(crate) fn new(
        loaded: &Loaded,
        ctx: Context,
        memory_cap: usize,
        quota: Quota,
        log_limiter: Arc<LogLimiter>,
        running: super::engine::Running,
    ) -> HostState {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE_BYTES);
        // No preopened directories, no environment, no network: WASI is linked only because a
        // std guest imports it.
        let wasi = WasiCtx::builder().stderr(stderr.clone()).build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_cap),
            caps: loaded.caps.clone(),
            quota,
            log_limiter,
            ctx,
            component: loaded.name.clone(),
            event: loaded.event,
            started: Instant::now(),
            timed_out: false,
            stderr,
            _running: running,
        }
    }

    /// What the guest wrote to stderr, trimmed, if anything.
    /// The component this request runs.
    pub(crate) fn component(&self) -> &str {
        &self.component
    }

    pub(crate) fn event(&self) -> Event {
        self.event
    }

    pub(crate) fn stderr(&self) -> Option<String> {
        let bytes = self.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_owned())
    }

    fn check_store(&self, store: &str) -> Result<(), KvError> {
        if crate::store::is_reserved_store(store) {
            return Err(KvError::AccessDenied(format!(
                "key-value store `{store}` is reserved for the host (names beginning `{}` are); component `{}` may not use it",
                crate::store::RESERVED_STORE_PREFIX,
                self.component
            )));
        }
        if self.caps.key_value_stores.iter().any(|s| s == store) {
            Ok(())
        } else {
            Err(KvError::AccessDenied(format!(
                "component `{}` may not use key-value store `{store}` (grant it in key_value_stores of [component.{}])",
                self.component, self.component
            )))
        }
    }

    fn check_key(store: &str, key: &str) -> Result<(), KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KvError::TooLarge(format!(
                "key of {} bytes in store `{store}` is longer than {MAX_KEY_BYTES} bytes",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(store: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        Self::check_key(store, key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(KvError::TooLarge(format!(
                "value of {} bytes for key `{key}` in store `{store}` is larger than {MAX_VALUE_BYTES} bytes",
                value.len()
            )));
        }
        Ok(())
    }
}

fn store_failure(e: StoreError) -> KvError {
    match e {
        StoreError::OverQuota { .. } => KvError::TooLarge(e.to_string()),
        _ => KvError::StoreFailure(e.to_string()),
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for HostState {}

impl presence::Host for HostState {
    async fn online_users(&mut self) -> wasmtime::Result<Vec<User>> {
        let online = self.ctx.store().online().await.map_err(presence_trap)?;
        Ok(online.into_iter().map(|e| User { id: e.user.id, name: e.user.name }).collect())
    }

    async fn is_online(&mut self, id: UserId) -> wasmtime::Result<bool> {
        Ok(self.ctx.store().lookup(id).await.map_err(presence_trap)?.is_some())
    }

    async fn user_name(&mut self, id: UserId) -> wasmtime::Result<Option<String>> {
        Ok(self.ctx.store().lookup(id).await.map_err(presence_trap)?.map(|e| e.user.name))
    }
}

/// Presence has no error in its WIT signature: a store failure traps the guest, which the
/// caller then reports as the handler failing.
fn presence_trap(e: crate::store::StoreError) -> wasmtime::Error {
    wasmtime::format_err!("presence unavailable: {e}")
}

impl key_value::Host for HostState {
    async fn get(
        &mut self,
        store: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, KvError>> {
        if let Err(e) = self.check_store(&store).and_then(|()| Self::check_key(&store, &key)) {
            return Ok(Err(e));
        }
        Ok(self.ctx.store().kv_get(&store, &key).await.map_err(store_failure))
    }

    async fn set(
        &mut self,
        store: String,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), KvError>> {
        if let Err(e) = self.check_store(&store).and_then(|()| Self::check_value(&store, &key, &value)) {
            return Ok(Err(e));
        }
        Ok(self.ctx.store().kv_set(&store, &key, value, self.quota).await.map_err(store_failure))
    }

    async fn delete(&mut self, store: String, key: String) -> wasmtime::Result<Result<(), KvError>> {
        if let Err(e) = self.check_store(&store).and_then(|()| Self::check_key(&store, &key)) {
            return Ok(Err(e));
        }
        Ok(self.ctx.store().kv_delete(&store, &key).await.map_err(store_failure))
    }

    async fn list_keys(
        &mut self,
        store: String,
        prefix: String,
        cursor: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Result<KeyPage, KvError>> {
        if let Err(e) = self.check_store(&store) {
            return Ok(Err(e));
        }
        let limit = usize::try_from(limit).unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
        let page = self.ctx.store().kv_list_keys(&store, &prefix, cursor.as_deref(), limit).await;
        Ok(page.map(|p| KeyPage { keys: p.keys, cursor: p.cursor }).map_err(store_failure))
    }

    async fn append(
        &mut self,
        store: String,
        key: String,
        value: Vec<u8>,
        max_len: u32,
    ) -> wasmtime::Result<Result<(), KvError>> {
        if let Err(e) = self.check_store(&store).and_then(|()| Self::check_value(&store, &key, &value)) {
            return Ok(Err(e));
        }
        let max_len = max_len.clamp(1, MAX_LIST_LEN) as usize;
        Ok(self.ctx.store().kv_append(&store, &key, value, max_len, self.quota).await.map_err(store_failure))
    }

    async fn append_many(
        &mut self,
        store: String,
        entries: Vec<(String, Vec<u8>)>,
        max_len: u32,
    ) -> wasmtime::Result<Result<(), KvError>> {
        if let Err(e) = self.check_store(&store) {
            return Ok(Err(e));
        }
        if entries.len() > MAX_APPEND_ENTRIES {
            return Ok(Err(KvError::TooLarge(format!(
                "{} entries in one append-many to store `{store}`; at most {MAX_APPEND_ENTRIES}",
                entries.len()
            ))));
        }
        if let Some(e) = entries.iter().find_map(|(key, value)| Self::check_value(&store, key, value).err()) {
            return Ok(Err(e));
        }
        let max_len = max_len.clamp(1, MAX_LIST_LEN) as usize;
        Ok(self.ctx.store().kv_append_many(&store, entries, max_len, self.quota).await.map_err(store_failure))
    }

    async fn range(
        &mut self,
        store: String,
        key: String,
        start: i64,
        stop: i64,
    ) -> wasmtime::Result<Result<Vec<Vec<u8>>, KvError>> {
        if let Err(e) = self.check_store(&store).and_then(|()| Self::check_key(&store, &key)) {
            return Ok(Err(e));
        }
        let items = match self.ctx.store().kv_range(&store, &key, start, stop, MAX_PAGE).await {
            Ok(items) => items,
            Err(e) => return Ok(Err(store_failure(e))),
        };
        // Handing the guest more than its memory can hold would only trap it.
        let total: usize = items.iter().map(Vec::len).sum();
        if total > self.limiter.cap {
            return Ok(Err(KvError::TooLarge(format!(
                "range {start}..={stop} of `{key}` in store `{store}` is {total} bytes, more than the guest's memory limit; ask for fewer entries"
            ))));
        }
        Ok(Ok(items))
    }
}

impl variables::Host for HostState {
    async fn get(&mut self, name: String) -> wasmtime::Result<Result<String, String>> {
        Ok(self.caps.variables.get(&name).cloned().ok_or_else(|| {
            format!(
                "component `{}` has no variable `{name}` (declare it in [component.{}.variables])",
                self.component, self.component
            )
        }))
    }
}

impl log::Host for HostState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let dropped = match self.log_limiter.admit(&self.component) {
            Admit::Drop => return Ok(()),
            Admit::Write { dropped } => dropped,
        };
        let message = truncate(&message, MAX_LOG_BYTES);
        let component = &*self.component;
        let event = self.event.as_str();
        if dropped > 0 {
            tracing::warn!(
                component,
                event,
                dropped,
                "{dropped} log lines of the component dropped (over its log rate limit)"
            );
        }
        match level {
            Level::Trace => tracing::trace!(component, event, "{message}"),
            Level::Debug => tracing::debug!(component, event, "{message}"),
            Level::Info => tracing::info!(component, event, "{message}"),
            Level::Warn => tracing::warn!(component, event, "{message}"),
            Level::Error => tracing::error!(component, event, "{message}"),
        }
        Ok(())
    }
}

impl clock::Host for HostState {
    async fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Caps each linear memory and remembers a refused growth, so that the trap that follows
/// (Rust aborts when an allocation fails) can be reported as what it is.
pub(crate) struct MemoryLimiter {
    pub(crate) cap: usize,
    /// The size the guest asked for when it was refused.
    pub(crate) denied: Option<usize>,
    /// The largest size a memory was created with (its starting size, before any growth).
    pub(crate) largest_start: usize,
    /// Whether the refusal was of a memory's starting size, not of a later growth.
    pub(crate) denied_at_start: bool,
}

impl MemoryLimiter {
    fn new(cap: usize) -> Self {
        MemoryLimiter { cap, denied: None, largest_start: 0, denied_at_start: false }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // wasmtime asks with `current == 0` when it creates a memory at instantiation.
        let at_start = current == 0;
        if at_start {
            self.largest_start = self.largest_start.max(desired);
        }
        if desired > self.cap {
            self.denied = Some(desired);
            self.denied_at_start = at_start;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn debug_hides_variable_values() {
        let caps = Capabilities {
            key_value_stores: vec!["default".into()],
            variables: HashMap::from([("token".to_owned(), "s3cret".to_owned())]),
            limits: LimitOverrides::default(),
        };
        let shown = format!("{caps:?}");
        assert!(shown.contains("token") && !shown.contains("s3cret"), "{shown}");
    }
}

//! The wasmtime engine, configured once: pooling allocator, epoch interruption driven by a
//! ticker thread, the shared [`Linker`] (WASI preview 2 + the `host-api` imports), and the
//! dedicated tokio runtime a guest moves to once it has run for an epoch tick, so that a
//! busy guest never delays socket I/O.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::thread::JoinHandle as ThreadHandle;
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{
    Config, Enabled, Engine, EngineWeak, InstanceAllocationStrategy, PoolingAllocationConfig, Store,
    UpdateDeadline,
};

use super::bindings::host_api::HostApi;
use super::component::Loaded;
use super::host_api::HostState;
use super::limits::PoolShape;
use super::log_limit::LogLimiter;
use crate::handlers::{Context, Event};
use crate::limits::Rate;
use crate::store::Quota;

/// How often the epoch advances while a guest runs; the granularity of deadlines and of
/// guest yields.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// After the last guest ends, the ticker wakes this often for [`LINGER`] before it parks. A
/// guest that starts meanwhile does not wake it (one thread wake-up less per call when calls
/// come a few ms apart); its first tick comes within this time instead of [`EPOCH_TICK`].
const LINGER_TICK: Duration = Duration::from_millis(10);
/// How long the ticker lingers after the last guest before it parks (an idle host: no wake-ups).
const LINGER: Duration = Duration::from_secs(1);

/// Pool pages kept resident (instead of being returned to the kernel) when a slot is reused:
/// the difference between ~20 µs and ~11 µs per request (notes/WASMTIME.md). Without
/// `PAGEMAP_SCAN` this part is zeroed whole each time a slot is reused, so it is kept to
/// about what a Rust component touches.
const LINEAR_MEMORY_KEEP_RESIDENT: usize = 2 << 20;
/// The same where the kernel can tell which pages a guest dirtied (`PAGEMAP_SCAN`, Linux
/// 6.7+): only those are reset, so the whole starting memory of a JavaScript or Python
/// component (9–12 MiB) can stay resident. A StarlingMonkey handler with a fresh instance per
/// call: 436 → 294–306 µs p50 (`cim-bench handler`, two runs); Rust components: unchanged.
const LINEAR_MEMORY_KEEP_RESIDENT_SCANNED: usize = 16 << 20;
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// Settings of the component runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Wall-clock budget of one call (instantiation included) to the handlers on a sender's
    /// path (login, private, group, online). A guest past it traps.
    pub deadline: Duration,
    /// The same for the message callback, which runs after delivery, off every sender's
    /// path: its deadline only stops a runaway guest, so it may be longer and leave room
    /// for the store round trips of a busy node.
    pub callback_deadline: Duration,
    /// The largest a guest's linear memory may grow, in bytes (a component's `memory_mib`
    /// in spin.toml overrides it).
    pub memory_cap: usize,
    /// The largest memory cap any component may be given: the size of the pool's memory
    /// slots. Never below `memory_cap`.
    pub largest_memory_cap: usize,
    /// What the pools hold per instance (core instances, memories, tables); a component that
    /// needs more is refused at load. Size it from the components to be loaded.
    pub pool: PoolShape,
    /// Where compiled components are cached (keyed by the wasm's sha256 and the engine
    /// configuration); `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// How many instances may be alive at once (pool size), and the default of each
    /// component's `max_instances`. A request beyond either fails fast.
    pub max_instances: u32,
    /// Threads of the runtime that guests run on (named `cim-wasm`).
    pub worker_threads: usize,
    /// How many replaced versions of each component are kept for rollback.
    pub history: usize,
    /// The most keys and bytes each key-value store may hold, checked on every guest write
    /// (`set`, `append`, `append-many` get `too-large` past it). Exact on the memory store;
    /// on Redis, counted by the hosts in `<prefix>kv-usage:<store>` (see `store::redis::kv`).
    pub kv_quota: Quota,
    /// Log lines each component may write, per second with a burst (`Rate::OFF`: no limit).
    /// Lines over it are dropped and counted; the next line written is preceded by one
    /// saying how many were dropped.
    pub log_rate: Rate,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            deadline: Duration::from_millis(100),
            callback_deadline: Duration::from_secs(1),
            memory_cap: 16 << 20,
            largest_memory_cap: 16 << 20,
            pool: PoolShape::default(),
            cache_dir: None,
            max_instances: 1000,
            worker_threads: 2,
            history: 5,
            kv_quota: Quota::default(),
            log_rate: Rate::new(100, 200),
        }
    }
}

impl RuntimeConfig {
    /// The deadline of one call for `event`.
    pub fn deadline_for(&self, event: Event) -> Duration {
        match event {
            Event::Callback => self.callback_deadline,
            _ => self.deadline,
        }
    }

    /// The size of a pool memory slot: the largest cap a component may have.
    pub fn memory_slot(&self) -> usize {
        self.memory_cap.max(self.largest_memory_cap)
    }

    /// The default configuration with the compile cache in `<data_dir>/cache`.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        RuntimeConfig { cache_dir: Some(data_dir.into().join("cache")), ..RuntimeConfig::default() }
    }
}

/// Everything shared by all components: engine, linker, executor, epoch ticker.
pub(crate) struct WasmEngine {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    pub(crate) config: RuntimeConfig,
    executor: Executor,
    /// Guest log lines per component ([`RuntimeConfig::log_rate`]).
    pub(crate) log_limiter: Arc<LogLimiter>,
    /// Call durations and outcomes per event and component.
    pub(crate) handler_metrics: crate::metrics::HandlerMetrics,
    /// Stops the thread when dropped.
    ticker: Ticker,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine").field("config", &self.config).finish_non_exhaustive()
    }
}

impl WasmEngine {
    pub(crate) fn new(config: RuntimeConfig) -> anyhow::Result<WasmEngine> {
        anyhow::ensure!(
            config.deadline.min(config.callback_deadline) >= EPOCH_TICK,
            "the deadlines must be at least {EPOCH_TICK:?}"
        );
        anyhow::ensure!(config.memory_cap >= 1 << 16, "the memory cap must be at least one 64 KiB page");
        anyhow::ensure!(config.max_instances > 0, "max_instances must be at least 1");

        let shape = config.pool;
        anyhow::ensure!(
            shape.core_instances > 0 && shape.memories > 0 && shape.tables > 0,
            "the pool shape needs at least one core instance, memory and table per instance"
        );
        // Every instance may take the whole per-instance shape, so the totals are the shape
        // times the instances; the per-component maxima make wasmtime enforce the same shape.
        let n = config.max_instances;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(shape.core_instances))
            .max_core_instances_per_component(shape.core_instances)
            .total_memories(n.saturating_mul(shape.memories))
            .max_memories_per_component(shape.memories)
            .total_tables(n.saturating_mul(shape.tables))
            .max_tables_per_component(shape.tables)
            .total_stacks(n)
            .max_memory_size(config.memory_slot())
            .linear_memory_keep_resident(keep_resident().min(config.memory_cap))
            .table_keep_resident(TABLE_KEEP_RESIDENT)
            // Reset only the pages a guest dirtied (Linux 6.7+; elsewhere the kept-resident part is
            // zeroed whole, as before).
            .pagemap_scan(Enabled::Auto);

        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .concurrency_support(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(to_anyhow).map_err(|e| e.context("configuring wasmtime"))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(to_anyhow)?;
        HostApi::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(to_anyhow)?;

        let executor = Executor::new(config.worker_threads.max(1))?;
        let ticker = Ticker::start(engine.weak())?;
        let log_limiter = Arc::new(LogLimiter::new(config.log_rate));
        Ok(WasmEngine {
            engine,
            linker,
            config,
            executor,
            log_limiter,
            handler_metrics: Default::default(),
            ticker,
        })
    }

    /// Runs a guest call `job`: on the caller's thread until it first yields, then on the
    /// guests' runtime. Most calls finish within their first epoch tick (tens of µs), and
    /// running them where the request is saves two thread wake-ups per call (there and
    /// back). A guest yields at every tick ([`WasmEngine::new_store`]), so one that runs
    /// longer, or waits in a host call, holds the caller's thread for about a tick at most
    /// before it moves to the guests' runtime. `Err` if it panicked (a host bug).
    pub(crate) async fn run<F>(&self, job: F) -> Result<F::Output, String>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let mut job = Box::pin(job);
        let first = std::future::poll_fn(|cx| {
            Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| job.as_mut().poll(cx))))
        })
        .await;
        match first {
            Ok(Poll::Ready(output)) => Ok(output),
            Ok(Poll::Pending) => self.spawn(job).await.map_err(|e| e.to_string()),
            Err(panic) => Err(panic_message(&*panic)),
        }
    }

    /// Runs `job` on the guests' runtime; the returned handle can be awaited from any runtime.
    pub(crate) fn spawn<F>(&self, job: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.executor.handle().spawn(job)
    }

    /// Runs blocking work (compiling) on the guests' runtime's blocking pool.
    pub(crate) fn spawn_blocking<F, R>(&self, work: F) -> tokio::task::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.executor.handle().spawn_blocking(work)
    }

    /// A fresh store for one request to `loaded`: its own WASI context, memory cap and
    /// deadline. The epoch callback yields to the executor on every tick (so one long guest
    /// shares the worker threads) and traps once the deadline has passed.
    pub(crate) fn new_store(&self, loaded: &Loaded, ctx: Context) -> Store<HostState> {
        let state = HostState::new(
            loaded,
            ctx,
            loaded.limits.memory_cap,
            self.config.kv_quota,
            self.log_limiter.clone(),
            self.ticker.running(),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        let deadline = loaded.limits.deadline;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            let state = ctx.data_mut();
            if state.started.elapsed() >= deadline {
                state.timed_out = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
        });
        store
    }
}

/// What a caught panic says.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("panicked: {what}")
}

/// How much of each pool slot's linear memory stays resident between instances.
fn keep_resident() -> usize {
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        LINEAR_MEMORY_KEEP_RESIDENT_SCANNED
    } else {
        LINEAR_MEMORY_KEEP_RESIDENT
    }
}

/// Converts wasmtime's own error type, keeping the whole chain in the message.
pub(crate) fn to_anyhow(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// The tokio runtime guests run on. Dropped without blocking, so a [`super::Runtime`] may be
/// dropped from inside another runtime.
struct Executor {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Executor {
    fn new(threads: usize) -> anyhow::Result<Executor> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("cim-wasm")
            // IO too: host imports may (re)connect to Redis from a guest's call.
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("starting the cim-wasm runtime: {e}"))?;
        let handle = runtime.handle().clone();
        Ok(Executor { runtime: Some(runtime), handle })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The thread that advances the engine's epoch every [`EPOCH_TICK`] while a guest runs,
/// lingers (waking every [`LINGER_TICK`]) for [`LINGER`] after the last one, then sleeps
/// (parked, no wake-ups) until the next, so an idle host costs no CPU; stops when dropped.
struct Ticker {
    shared: Arc<TickerShared>,
    thread: Option<ThreadHandle<()>>,
}

#[derive(Debug)]
struct TickerShared {
    stop: AtomicBool,
    /// Stores alive (requests under way); the ticker ticks while this is above 0.
    running: AtomicUsize,
    /// The ticker is parked (or about to park): a guest that starts must wake it.
    parked: AtomicBool,
    /// The ticker thread, to wake it when the first guest starts.
    thread: OnceLock<std::thread::Thread>,
}

impl TickerShared {
    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// Held by every store (one request): while any is alive the epoch advances.
#[derive(Debug)]
pub(crate) struct Running(Arc<TickerShared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    fn start(engine: EngineWeak) -> anyhow::Result<Ticker> {
        let shared = Arc::new(TickerShared {
            stop: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cim-epoch".into())
            .spawn(move || {
                // Sleep to absolute instants so the tick rate does not drift with scheduling.
                let mut next = Instant::now();
                let mut last_busy = Instant::now();
                while !state.stop.load(Ordering::SeqCst) {
                    if state.running.load(Ordering::SeqCst) == 0 {
                        if last_busy.elapsed() >= LINGER {
                            // A guest that starts after `parked` is set wakes the thread; one
                            // that started before is seen by the second check. An unpark
                            // between the check and `park` makes it return at once.
                            state.parked.store(true, Ordering::SeqCst);
                            if state.running.load(Ordering::SeqCst) == 0 {
                                std::thread::park();
                            }
                            state.parked.store(false, Ordering::SeqCst);
                            last_busy = Instant::now();
                        } else {
                            std::thread::sleep(LINGER_TICK);
                            if state.running.load(Ordering::SeqCst) == 0 {
                                continue;
                            }
                            // A guest started while this slept: its first tick is now.
                            if let Some(engine) = engine.upgrade() {
                                engine.increment_epoch();
                            }
                        }
                        next = Instant::now();
                        continue;
                    }
                    last_busy = Instant::now();
                    next += EPOCH_TICK;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("starting the epoch ticker: {e}"))?;
        let _ = shared.thread.set(thread.thread().clone());
        Ok(Ticker { shared, thread: Some(thread) })
    }

    /// Marks a guest as running until the guard is dropped: ticks start within one
    /// [`EPOCH_TICK`] (one [`LINGER_TICK`] while the ticker lingers).
    fn running(&self) -> Running {
        if self.shared.running.fetch_add(1, Ordering::SeqCst) == 0
            && self.shared.parked.load(Ordering::SeqCst)
        {
            self.shared.wake();
        }
        Running(self.shared.clone())
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_has_its_own_deadline() {
        let config = RuntimeConfig::default();
        assert_eq!(config.deadline_for(Event::Group), Duration::from_millis(100));
        assert_eq!(config.deadline_for(Event::Private), Duration::from_millis(100));
        assert_eq!(config.deadline_for(Event::Callback), Duration::from_secs(1));
    }
}

//! What one component may use: its memory cap, deadline and most concurrent instances
//! ([`Limits`], from `[component.NAME.limits]` in spin.toml over the global flags), the shape
//! of a `.wasm` read before it is compiled ([`Shape`]: core instances, memories, tables, and
//! whether it needs a feature this host lacks), the per-instance budget the pooling allocator
//! was sized for ([`PoolShape`]), and the memory headroom shown at push and in
//! `GET /admin/components`.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use wasmparser::{CanonicalFunction, CanonicalOption, ComponentImport, Instance, Parser, Payload};

use super::engine::RuntimeConfig;
use crate::handlers::Event;

/// A component's own limits as spin.toml's `[component.NAME.limits]` gives them; a `None`
/// takes the host's flag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    /// `memory_mib`: the most one of its linear memories may grow to, in MiB.
    pub memory_mib: Option<u64>,
    /// `deadline_ms`: wall-clock budget of one call, instantiation included.
    pub deadline_ms: Option<u64>,
    /// `max_instances`: the most instances of it alive at once.
    pub max_instances: Option<u32>,
}

/// The limits a component runs under, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_cap: usize,
    pub deadline: Duration,
    pub max_instances: u32,
}

impl Limits {
    /// `overrides` over the flags in `config` (the deadline of `event`).
    pub fn resolve(config: &RuntimeConfig, event: Event, overrides: &LimitOverrides) -> Limits {
        Limits {
            memory_cap: overrides
                .memory_mib
                .and_then(|m| usize::try_from(m << 20).ok())
                .unwrap_or(config.memory_cap),
            deadline: overrides.deadline_ms.map_or(config.deadline_for(event), Duration::from_millis),
            max_instances: overrides.max_instances.unwrap_or(config.max_instances).min(config.max_instances),
        }
    }
}

/// `Limits` as JSON: whole MiB and milliseconds, as spin.toml writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LimitsJson {
    pub memory_mib: u64,
    pub deadline_ms: u64,
    pub max_instances: u32,
}

impl From<Limits> for LimitsJson {
    fn from(l: Limits) -> Self {
        LimitsJson {
            // Caps are set in whole MiB (flag and spin.toml alike).
            memory_mib: (l.memory_cap >> 20) as u64,
            deadline_ms: u64::try_from(l.deadline.as_millis()).unwrap_or(u64::MAX),
            max_instances: l.max_instances,
        }
    }
}

/// How much a component's largest linear memory starts at, against its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// Bytes of the largest linear memory right after instantiation.
    pub starting: usize,
    pub cap: usize,
}

impl fmt::Display for Headroom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "starting memory {} of {}", mib(self.starting), mib(self.cap))
    }
}

/// `12.3 MiB`, `16 MiB`, `128 KiB`.
pub fn mib(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes < MIB {
        format!("{} KiB", bytes.div_ceil(1 << 10))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

/// What the pooling allocator reserves for one component instance. The pools hold
/// `max_instances` of these; a component that needs more of any is refused at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

impl Default for PoolShape {
    /// Room for a Rust `wasm32-wasip2` component (main module, WASI adapter, shim and fixup
    /// modules), a Python one (14 core instances) and a JavaScript one. Core instances are
    /// only counted by the pooling allocator (it reserves nothing for them), so room for 16
    /// costs nothing; memories and tables are reserved slots, so those stay at what the
    /// components need.
    fn default() -> Self {
        PoolShape { core_instances: 16, memories: 2, tables: 4 }
    }
}

impl PoolShape {
    /// The smallest shape that holds both.
    pub fn max(self, other: PoolShape) -> PoolShape {
        PoolShape {
            core_instances: self.core_instances.max(other.core_instances),
            memories: self.memories.max(other.memories),
            tables: self.tables.max(other.tables),
        }
    }
}

/// What a `.wasm` component is made of, read without compiling it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// Core instances it creates (one per module instantiation).
    pub core_instances: u32,
    /// Linear memories its modules define.
    pub memories: u32,
    /// Tables its modules define.
    pub tables: u32,
    /// The largest starting size of a memory its modules define, in bytes (64 KiB pages).
    pub largest_initial_memory: u64,
    /// The most memories one module defines (the pool allows one per module).
    pub memories_per_module: u32,
    /// The most tables one module defines (the pool allows one per module).
    pub tables_per_module: u32,
    /// Instances it imports (`wasi:cli/stdout@0.2.6`, …).
    pub imports: Vec<String>,
    /// The first canonical built-in or option of the component-model async feature it uses
    /// (`task.cancel`, `async`, …), which this host does not enable.
    pub uses_async: Option<String>,
}

impl Shape {
    /// Reads the sections of `wasm` (nested modules and components included). Each module is
    /// counted once per `instantiate` of it in the outer component.
    pub fn of(wasm: &[u8]) -> Result<Shape, String> {
        let mut shape = Shape::default();
        // Depth 0 is the outer component; imports count only there.
        let mut depth = 0usize;
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(|e| e.to_string())? {
                Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
                Payload::End(_) => depth = depth.saturating_sub(1),
                Payload::InstanceSection(reader) => {
                    for instance in reader {
                        if matches!(instance.map_err(|e| e.to_string())?, Instance::Instantiate { .. }) {
                            shape.core_instances += 1;
                        }
                    }
                }
                Payload::MemorySection(reader) => {
                    shape.memories += reader.count();
                    shape.memories_per_module = shape.memories_per_module.max(reader.count());
                    for memory in reader {
                        let memory = memory.map_err(|e| e.to_string())?;
                        let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                        let initial = memory.initial.saturating_mul(page);
                        shape.largest_initial_memory = shape.largest_initial_memory.max(initial);
                    }
                }
                Payload::TableSection(reader) => {
                    shape.tables += reader.count();
                    shape.tables_per_module = shape.tables_per_module.max(reader.count());
                }
                Payload::ComponentImportSection(reader) if depth == 0 => {
                    for import in reader {
                        let ComponentImport { name, .. } = import.map_err(|e| e.to_string())?;
                        shape.imports.push(name.name.to_owned());
                    }
                }
                Payload::ComponentCanonicalSection(reader) if shape.uses_async.is_none() => {
                    for func in reader {
                        shape.uses_async = async_feature(&func.map_err(|e| e.to_string())?);
                        if shape.uses_async.is_some() {
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(shape)
    }

    /// What the pools must hold for one instance of this component.
    pub fn pool(&self) -> PoolShape {
        PoolShape { core_instances: self.core_instances, memories: self.memories, tables: self.tables }
    }

    /// Why this component cannot run in pools sized for `pool` per instance, naming the flag
    /// that would make room; `None` if it fits.
    pub fn misfit(&self, pool: &PoolShape) -> Option<String> {
        let over = [
            ("core instances", self.core_instances, pool.core_instances, "--pool-core-instances"),
            ("linear memories", self.memories, pool.memories, "--pool-memories"),
            ("tables", self.tables, pool.tables, "--pool-tables"),
        ];
        let (what, needs, has, flag) = over.into_iter().find(|(_, needs, has, _)| needs > has)?;
        Some(format!(
            "it needs {needs} {what} per instance and this host's pools were sized for {has}: put the \
             component in spin.toml before the host starts (the pools are sized for the largest \
             component there), or start cim-host with `{flag} {needs}`"
        ))
    }

    /// The fix for a component that imports what this host does not provide.
    pub fn unsupported_import(&self) -> Option<String> {
        let http = self.imports.iter().find(|i| i.starts_with("wasi:http/"))?;
        Some(format!(
            "it imports `{http}`, which this host does not provide (handlers get no HTTP). A \
             componentize-js (StarlingMonkey) build imports it unless HTTP is disabled: build with \
             `componentize-js … -d http fetch-event`"
        ))
    }

    /// The fix for a component that needs the component-model async feature.
    pub fn async_refusal(&self) -> Option<String> {
        let what = self.uses_async.as_ref()?;
        Some(async_fix(what))
    }
}

/// The refusal of a component that uses `what` from the component-model async feature.
pub fn async_fix(what: &str) -> String {
    format!(
        "it uses `{what}`, which needs the component-model async feature, and this host runs \
         handlers synchronously. A jco/QuickJS build does this unless async is disabled: build \
         with `jco componentize … --backend quickjs --backend-qjs-disable-async`"
    )
}

/// The name of the async built-in or option `func` uses, if any.
fn async_feature(func: &CanonicalFunction) -> Option<String> {
    match func {
        CanonicalFunction::Lift { options, .. } | CanonicalFunction::Lower { options, .. } => options
            .iter()
            .find(|o| matches!(o, CanonicalOption::Async | CanonicalOption::Callback(_)))
            .map(|_| "async".to_owned()),
        CanonicalFunction::ResourceNew { .. }
        | CanonicalFunction::ResourceDrop { .. }
        | CanonicalFunction::ResourceRep { .. } => None,
        // Threads are a separate feature; wasmtime names it when it refuses them.
        CanonicalFunction::ThreadSpawnRef { .. }
        | CanonicalFunction::ThreadSpawnIndirect { .. }
        | CanonicalFunction::ThreadAvailableParallelism => None,
        other => Some(builtin_name(other)),
    }
}

/// The built-in's name in the WAT text format (`task.cancel`); the variant's name for the
/// rarer ones.
fn builtin_name(func: &CanonicalFunction) -> String {
    let name = match func {
        CanonicalFunction::TaskReturn { .. } => "task.return",
        CanonicalFunction::TaskCancel => "task.cancel",
        CanonicalFunction::ContextGet { .. } => "context.get",
        CanonicalFunction::ContextSet { .. } => "context.set",
        CanonicalFunction::BackpressureInc => "backpressure.inc",
        CanonicalFunction::BackpressureDec => "backpressure.dec",
        CanonicalFunction::SubtaskDrop => "subtask.drop",
        CanonicalFunction::SubtaskCancel { .. } => "subtask.cancel",
        CanonicalFunction::StreamNew { .. } => "stream.new",
        CanonicalFunction::FutureNew { .. } => "future.new",
        CanonicalFunction::ErrorContextNew { .. } => "error-context.new",
        CanonicalFunction::WaitableSetNew => "waitable-set.new",
        CanonicalFunction::WaitableJoin => "waitable.join",
        CanonicalFunction::ThreadYield { .. } => "thread.yield",
        other => {
            let debug = format!("{other:?}");
            return debug.split([' ', '{', '(']).next().unwrap_or(&debug).to_owned();
        }
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_reads_like_the_issue() {
        let h = Headroom { starting: 12_897_484, cap: 16 << 20 };
        assert_eq!(h.to_string(), "starting memory 12.3 MiB of 16 MiB");
        assert_eq!(
            Headroom { starting: 128 << 10, cap: 16 << 20 }.to_string(),
            "starting memory 128 KiB of 16 MiB"
        );
    }

    #[test]
    fn overrides_take_the_flags_as_defaults() {
        let config = RuntimeConfig { max_instances: 100, ..RuntimeConfig::default() };
        let none = Limits::resolve(&config, Event::Group, &LimitOverrides::default());
        assert_eq!(
            none,
            Limits { memory_cap: 16 << 20, deadline: Duration::from_millis(100), max_instances: 100 }
        );
        let callback = Limits::resolve(&config, Event::Callback, &LimitOverrides::default());
        assert_eq!(callback.deadline, Duration::from_secs(1));
        let some = LimitOverrides { memory_mib: Some(64), deadline_ms: Some(250), max_instances: Some(8) };
        let own = Limits::resolve(&config, Event::Group, &some);
        assert_eq!(
            own,
            Limits { memory_cap: 64 << 20, deadline: Duration::from_millis(250), max_instances: 8 }
        );
    }

    #[test]
    fn a_rust_component_fits_the_default_pool() {
        let shape = Shape::of(&super::super::tests::wasm("group_send")).expect("shape");
        assert!(shape.core_instances >= 1 && shape.memories >= 1, "{shape:?}");
        assert_eq!(shape.misfit(&PoolShape::default()), None, "{shape:?}");
        assert_eq!(shape.uses_async, None);
        assert!(shape.imports.iter().any(|i| i.starts_with("cim:im/")), "{shape:?}");
        let tight = PoolShape { core_instances: 1, ..PoolShape::default() };
        let why = shape.misfit(&tight).expect("too many core instances");
        assert!(why.contains("--pool-core-instances") && why.contains("sized for 1"), "{why}");
    }

    #[test]
    fn builtins_are_named_as_in_wat() {
        assert_eq!(builtin_name(&CanonicalFunction::TaskCancel), "task.cancel");
        assert_eq!(builtin_name(&CanonicalFunction::WaitableSetNew), "waitable-set.new");
        assert_eq!(async_feature(&CanonicalFunction::TaskCancel).as_deref(), Some("task.cancel"));
        assert_eq!(async_feature(&CanonicalFunction::ResourceDrop { resource: 0 }), None);
    }
}

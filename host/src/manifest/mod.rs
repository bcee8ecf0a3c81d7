//! `spin.toml`: which component handles which event, where its `.wasm` is, how to build it and
//! what it may touch. Spin manifest version 2 conventions, parsed with our own serde structs
//! (`deny_unknown_fields`, so a typo is an error rather than a silently ignored key) and then
//! validated into a [`Manifest`] whose errors name the bad key or id.
//!
//! ```toml
//! spin_manifest_version = 2
//! [application]
//! name = "cim"
//! [variables]
//! blocked_words = { default = "darn,heck" }
//! [[trigger.cim]]
//! event = "group"
//! component = "group-send"
//! [component.group-send]
//! source = "components/target/wasm32-wasip2/release/group_send.wasm"
//! key_value_stores = ["default"]
//! [component.group-send.variables]
//! blocked_words = "{{ blocked_words }}"
//! [component.group-send.limits]   # optional; each key defaults to the cim-host flag
//! memory_mib = 32                  # --handler-memory-mib
//! deadline_ms = 200                # --handler-deadline-ms (--callback-deadline-ms)
//! max_instances = 100              # --handler-max-instances
//! ```
//!
//! Variables resolve like Spin's: the environment variable `CIM_VARIABLE_<NAME>`, then
//! `SPIN_VARIABLE_<NAME>`, then the declared `default`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::handlers::Event;
use crate::runtime::LimitOverrides;

/// The only manifest version understood.
pub const MANIFEST_VERSION: i64 = 2;

/// Environment prefixes that override an application variable, in priority order.
pub const VARIABLE_ENV_PREFIXES: [&str; 2] = ["CIM_VARIABLE_", "SPIN_VARIABLE_"];

/// Why a manifest was refused. Every variant names the key, id or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type; `message` carries toml's line and
    /// column.
    #[error("invalid manifest {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "unsupported manifest version {found}: only `spin_manifest_version = {MANIFEST_VERSION}` is supported"
    )]
    Version { found: String },
    #[error(
        "[[trigger.cim]] #{index}: unknown event `{event}` (expected one of login, private, group, online, callback)"
    )]
    UnknownEvent { index: usize, event: String },
    #[error("event `{event}` is mapped twice, to components `{first}` and `{second}`")]
    DuplicateEvent { event: Event, first: String, second: String },
    #[error("no [[trigger.cim]] for event `{event}`: every event needs a component")]
    MissingEvent { event: Event },
    #[error(
        "[[trigger.cim]] for event `{event}` names component `{component}`, which has no [component.{component}] table"
    )]
    UnknownComponent { event: Event, component: String },
    #[error("component id `{id}` is not kebab-case (lower-case letters and digits, words joined by `-`)")]
    BadComponentId { id: String },
    #[error("component `{component}`: `source` must not be empty")]
    EmptySource { component: String },
    #[error("component `{component}`: key-value store name `{store}` is invalid (empty or blank)")]
    BadStoreName { component: String, store: String },
    #[error(
        "component `{component}`: key-value store `{store}` is reserved for the host (names beginning `cim-` are); grant another name"
    )]
    ReservedStore { component: String, store: String },
    #[error("{context}: variable name `{name}` is not lower snake case (e.g. `blocked_words`)")]
    BadVariableName { context: String, name: String },
    #[error("variable `{variable}` has both a default and `required = true`")]
    DefaultAndRequired { variable: String },
    #[error("[component.{component}.limits] `{key}` = {value}: {detail}")]
    BadLimit { component: String, key: &'static str, value: String, detail: String },
    #[error("component `{component}` variable `{key}`: {detail}")]
    BadTemplate { component: String, key: String, detail: String },
    #[error(
        "component `{component}` variable `{key}` references `{{{{ {variable} }}}}`, which is not declared in [variables]"
    )]
    UndeclaredVariable { component: String, key: String, variable: String },
    #[error(
        "variable `{variable}` is required but has no value: set CIM_VARIABLE_{env} or SPIN_VARIABLE_{env}"
    )]
    MissingVariable { variable: String, env: String },
}

/// A validated manifest: every event has exactly one existing component and every variable
/// is resolved.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The directory the manifest lives in; relative paths in it are relative to this.
    pub dir: PathBuf,
    pub application: Application,
    /// The application variables as declared (values are resolved into each component).
    pub variables: BTreeMap<String, VariableDecl>,
    /// The component id for each event.
    pub triggers: HashMap<Event, String>,
    /// Every declared component, by id.
    pub components: BTreeMap<String, ComponentSpec>,
}

/// `[application]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    pub name: String,
    pub version: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub authors: Vec<String>,
}

/// One `[variables]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariableDecl {
    pub default: Option<String>,
    #[serde(default)]
    pub required: bool,
    /// The value is never logged.
    #[serde(default)]
    pub secret: bool,
    pub description: Option<String>,
}

/// A `[component.<id>]` after validation.
#[derive(Clone)]
pub struct ComponentSpec {
    pub id: String,
    /// `source` as written.
    pub source_raw: String,
    /// `source` resolved against the manifest's directory.
    pub source: PathBuf,
    pub description: Option<String>,
    /// The key-value stores the component may use; any other store is `access-denied`.
    pub key_value_stores: Vec<String>,
    /// `[component.<id>.variables]` with every template resolved. May hold secrets: [`fmt::Debug`]
    /// prints the names only.
    pub variables: HashMap<String, String>,
    pub build: Option<BuildSpec>,
    /// `[component.<id>.limits]`, validated; absent keys take the host's flags.
    pub limits: LimitOverrides,
}

impl fmt::Debug for ComponentSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.variables.keys().collect();
        names.sort();
        f.debug_struct("ComponentSpec")
            .field("id", &self.id)
            .field("source", &self.source)
            .field("key_value_stores", &self.key_value_stores)
            .field("variables", &names)
            .field("build", &self.build)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// `[component.<id>.build]`, with `workdir` resolved against the manifest's directory.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub command: String,
    pub workdir: PathBuf,
    pub watch: Vec<String>,
}

impl Manifest {
    /// Reads, parses and validates the manifest at `path`, resolving variables from the process
    /// environment.
    pub fn load(path: impl AsRef<Path>) -> Result<Manifest, ManifestError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// [`Manifest::load`] with an explicit environment lookup (for tests and embedding).
    pub fn load_with_env(
        path: impl AsRef<Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Manifest, ManifestError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ManifestError::Io { path: path.to_owned(), source })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        Self::parse(&text, path, &dir, env)
    }

    /// Parses and validates manifest text; `path` only names the manifest in errors and `dir` is
    /// what relative paths are resolved against.
    pub fn parse(
        text: &str,
        path: &Path,
        dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        raw.validate(dir, &env)
    }

    /// The component that handles `event` (every event has one in a validated manifest).
    pub fn component_for(&self, event: Event) -> Option<&ComponentSpec> {
        self.triggers.get(&event).and_then(|id| self.components.get(id))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    spin_manifest_version: Option<toml::Value>,
    /// Spin manifest version 1 used this key; recognised only to refuse it clearly.
    spin_version: Option<toml::Value>,
    application: Application,
    #[serde(default)]
    variables: BTreeMap<String, VariableDecl>,
    #[serde(default)]
    trigger: RawTriggers,
    #[serde(default)]
    component: BTreeMap<String, RawComponent>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTriggers {
    #[serde(default)]
    cim: Vec<RawTrigger>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    event: String,
    component: String,
    /// Spin allows an id per trigger; accepted and unused.
    #[allow(dead_code)]
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    source: String,
    description: Option<String>,
    #[serde(default)]
    key_value_stores: Vec<String>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    build: Option<RawBuild>,
    limits: Option<RawLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory_mib: Option<i64>,
    deadline_ms: Option<i64>,
    max_instances: Option<i64>,
}

/// The ranges `[component.<id>.limits]` accepts (the same as the cim-host flags).
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<i64> = 1..=4096;
pub const DEADLINE_MS_RANGE: std::ops::RangeInclusive<i64> = 1..=60_000;
pub const MAX_INSTANCES_RANGE: std::ops::RangeInclusive<i64> = 1..=100_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    command: String,
    workdir: Option<String>,
    #[serde(default)]
    watch: Vec<String>,
}

impl RawManifest {
    fn validate(self, dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Manifest, ManifestError> {
        self.check_version()?;

        for (name, decl) in &self.variables {
            check_variable_name(name, || "[variables]".to_owned())?;
            if decl.required && decl.default.is_some() {
                return Err(ManifestError::DefaultAndRequired { variable: name.clone() });
            }
        }
        let values = resolve_variables(&self.variables, env)?;

        let mut components = BTreeMap::new();
        for (id, raw) in self.component {
            let spec = validate_component(&id, raw, dir, &values)?;
            components.insert(id, spec);
        }

        let mut triggers: HashMap<Event, String> = HashMap::new();
        for (index, trigger) in self.trigger.cim.into_iter().enumerate() {
            let event = parse_event(&trigger.event).ok_or_else(|| ManifestError::UnknownEvent {
                index: index + 1,
                event: trigger.event.clone(),
            })?;
            if !components.contains_key(&trigger.component) {
                return Err(ManifestError::UnknownComponent { event, component: trigger.component });
            }
            if let Some(first) = triggers.get(&event) {
                return Err(ManifestError::DuplicateEvent {
                    event,
                    first: first.clone(),
                    second: trigger.component,
                });
            }
            triggers.insert(event, trigger.component);
        }
        if let Some(&event) = Event::ALL.iter().find(|e| !triggers.contains_key(e)) {
            return Err(ManifestError::MissingEvent { event });
        }

        Ok(Manifest {
            dir: dir.to_owned(),
            application: self.application,
            variables: self.variables,
            triggers,
            components,
        })
    }

    fn check_version(&self) -> Result<(), ManifestError> {
        if let Some(v) = &self.spin_version {
            return Err(ManifestError::Version { found: format!("{v} (spin_version)") });
        }
        match &self.spin_manifest_version {
            Some(toml::Value::Integer(MANIFEST_VERSION)) => Ok(()),
            Some(other) => Err(ManifestError::Version { found: other.to_string() }),
            None => Err(ManifestError::Version { found: "(missing spin_manifest_version)".into() }),
        }
    }
}

fn parse_event(name: &str) -> Option<Event> {
    Event::ALL.into_iter().find(|e| e.as_str() == name)
}

/// Each declared variable's value: environment override, then default. A variable with
/// neither is an error only if it is `required`; otherwise it stays unresolved (and a template
/// using it is an error).
fn resolve_variables(
    decls: &BTreeMap<String, VariableDecl>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HashMap<String, Option<String>>, ManifestError> {
    let mut values = HashMap::new();
    for (name, decl) in decls {
        let upper = name.to_ascii_uppercase();
        let from_env = VARIABLE_ENV_PREFIXES.iter().find_map(|prefix| env(&format!("{prefix}{upper}")));
        let value = from_env.or_else(|| decl.default.clone());
        if value.is_none() && decl.required {
            return Err(ManifestError::MissingVariable { variable: name.clone(), env: upper });
        }
        values.insert(name.clone(), value);
    }
    Ok(values)
}

fn validate_component(
    id: &str,
    raw: RawComponent,
    dir: &Path,
    values: &HashMap<String, Option<String>>,
) -> Result<ComponentSpec, ManifestError> {
    if !is_kebab_case(id) {
        return Err(ManifestError::BadComponentId { id: id.to_owned() });
    }
    if raw.source.trim().is_empty() {
        return Err(ManifestError::EmptySource { component: id.to_owned() });
    }
    if let Some(store) = raw.key_value_stores.iter().find(|s| s.trim().is_empty()) {
        return Err(ManifestError::BadStoreName { component: id.to_owned(), store: store.clone() });
    }
    if let Some(store) = raw.key_value_stores.iter().find(|s| crate::store::is_reserved_store(s)) {
        return Err(ManifestError::ReservedStore { component: id.to_owned(), store: store.clone() });
    }
    let mut variables = HashMap::new();
    for (key, template) in raw.variables {
        check_variable_name(&key, || format!("[component.{id}.variables]"))?;
        let value = expand_template(id, &key, &template, values)?;
        variables.insert(key, value);
    }
    let limits = validate_limits(id, raw.limits.unwrap_or_default())?;
    let build = raw.build.map(|b| BuildSpec {
        command: b.command,
        workdir: b.workdir.map_or_else(|| dir.to_owned(), |w| dir.join(w)),
        watch: b.watch,
    });
    Ok(ComponentSpec {
        id: id.to_owned(),
        source: dir.join(&raw.source),
        source_raw: raw.source,
        description: raw.description,
        key_value_stores: raw.key_value_stores,
        variables,
        build,
        limits,
    })
}

fn validate_limits(id: &str, raw: RawLimits) -> Result<LimitOverrides, ManifestError> {
    let check =
        |key: &'static str, value: Option<i64>, range: std::ops::RangeInclusive<i64>, unit: &str| match value
        {
            Some(v) if !range.contains(&v) => Err(ManifestError::BadLimit {
                component: id.to_owned(),
                key,
                value: v.to_string(),
                detail: format!("must be {} to {} {unit}", range.start(), range.end()),
            }),
            _ => Ok(value.map(|v| v.unsigned_abs())),
        };
    Ok(LimitOverrides {
        memory_mib: check("memory_mib", raw.memory_mib, MEMORY_MIB_RANGE, "MiB")?,
        deadline_ms: check("deadline_ms", raw.deadline_ms, DEADLINE_MS_RANGE, "milliseconds")?,
        max_instances: check("max_instances", raw.max_instances, MAX_INSTANCES_RANGE, "instances")?
            .and_then(|v| u32::try_from(v).ok()),
    })
}

/// Replaces every `{{ name }}` in `template` with the resolved application variable.
fn expand_template(
    component: &str,
    key: &str,
    template: &str,
    values: &HashMap<String, Option<String>>,
) -> Result<String, ManifestError> {
    let bad = |detail: String| ManifestError::BadTemplate {
        component: component.to_owned(),
        key: key.to_owned(),
        detail,
    };
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| bad(format!("unterminated `{{{{` in {template:?}")))?;
        let name = after[..close].trim();
        if !is_snake_case(name) {
            return Err(bad(format!(
                "`{{{{ {name} }}}}` is not a variable reference (lower snake case name)"
            )));
        }
        match values.get(name) {
            None => {
                return Err(ManifestError::UndeclaredVariable {
                    component: component.to_owned(),
                    key: key.to_owned(),
                    variable: name.to_owned(),
                });
            }
            Some(None) => {
                return Err(bad(format!(
                    "variable `{name}` has no value: give it a default or set CIM_VARIABLE_{}",
                    name.to_ascii_uppercase()
                )));
            }
            Some(Some(value)) => out.push_str(value),
        }
        rest = &after[close + 2..];
    }
    if rest.contains("}}") {
        return Err(bad(format!("`}}}}` without `{{{{` in {template:?}")));
    }
    out.push_str(rest);
    Ok(out)
}

fn check_variable_name(name: &str, context: impl FnOnce() -> String) -> Result<(), ManifestError> {
    if is_snake_case(name) {
        Ok(())
    } else {
        Err(ManifestError::BadVariableName { context: context(), name: name.to_owned() })
    }
}

/// `group-send`, `word-filter2`: lower-case ASCII words of letters and digits joined by single
/// dashes, starting with a letter.
fn is_kebab_case(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .split('-')
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
}

/// `blocked_words`: lower-case ASCII letters, digits and single underscores, starting with a
/// letter (Spin's rule for variable names).
fn is_snake_case(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .split('_')
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
}

#[cfg(test)]
mod tests;

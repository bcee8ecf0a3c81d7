//! Tests of manifest parsing and validation: good manifests and every kind of bad one.

use super::*;

const GOOD: &str = r#"
spin_manifest_version = 2

[application]
name = "cim"
version = "0.1.0"
description = "test"

[variables]
blocked_words = { default = "darn,heck" }
allowed_ids = { default = "1,2,3" }
secret_x = { required = true, secret = true }

[[trigger.cim]]
event = "login"
component = "login"
[[trigger.cim]]
event = "private"
component = "private-send"
[[trigger.cim]]
event = "group"
component = "group-send"
[[trigger.cim]]
event = "online"
component = "online-list"
[[trigger.cim]]
event = "callback"
component = "message-callback"

[component.login]
source = "wasm/login.wasm"
[component.login.variables]
allowed_ids = "{{ allowed_ids }}"
token = "k={{secret_x}};"

[component.private-send]
source = "wasm/private_send.wasm"

[component.group-send]
source = "components/target/wasm32-wasip2/release/group_send.wasm"
key_value_stores = ["default"]
[component.group-send.variables]
blocked_words = "{{ blocked_words }}"
[component.group-send.build]
command = "cargo build --target wasm32-wasip2 --release -p group-send"
workdir = "components"
watch = ["group-send/src/**/*.rs"]

[component.online-list]
source = "wasm/online_list.wasm"

[component.message-callback]
source = "/abs/message_callback.wasm"
key_value_stores = ["default"]
"#;

fn env_with(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
}

fn parse_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Manifest, ManifestError> {
    Manifest::parse(text, Path::new("/app/spin.toml"), Path::new("/app"), env)
}

fn parse(text: &str) -> Result<Manifest, ManifestError> {
    parse_env(text, env_with(&[("SPIN_VARIABLE_SECRET_X", "s3cret")]))
}

#[test]
fn good_manifest_resolves_everything() {
    let m = parse(GOOD).expect("valid");
    assert_eq!(m.application.name, "cim");
    assert_eq!(m.triggers.len(), 5);
    let group = m.component_for(Event::Group).expect("group component");
    assert_eq!(group.id, "group-send");
    assert_eq!(group.source, Path::new("/app/components/target/wasm32-wasip2/release/group_send.wasm"));
    assert_eq!(group.key_value_stores, ["default"]);
    assert_eq!(group.variables["blocked_words"], "darn,heck");
    let build = group.build.as_ref().expect("build");
    assert_eq!(build.workdir, Path::new("/app/components"));
    assert_eq!(build.watch, ["group-send/src/**/*.rs"]);
    let login = m.component_for(Event::Login).expect("login");
    assert_eq!(login.variables["token"], "k=s3cret;");
    assert_eq!(m.component_for(Event::Callback).expect("cb").source, Path::new("/abs/message_callback.wasm"));
    // Secrets stay out of Debug output.
    assert!(!format!("{login:?}").contains("s3cret"));
}

#[test]
fn environment_overrides_defaults_cim_first() {
    let m = parse_env(
        GOOD,
        env_with(&[
            ("SPIN_VARIABLE_SECRET_X", "x"),
            ("SPIN_VARIABLE_BLOCKED_WORDS", "spin"),
            ("CIM_VARIABLE_BLOCKED_WORDS", "cim"),
            ("SPIN_VARIABLE_ALLOWED_IDS", "7"),
        ]),
    )
    .expect("valid");
    assert_eq!(m.component_for(Event::Group).expect("group").variables["blocked_words"], "cim");
    assert_eq!(m.component_for(Event::Login).expect("login").variables["allowed_ids"], "7");
}

#[test]
fn required_variable_without_value_is_named() {
    let err = parse_env(GOOD, |_| None).expect_err("secret_x missing");
    assert!(
        matches!(&err, ManifestError::MissingVariable { variable, .. } if variable == "secret_x"),
        "{err}"
    );
    assert!(err.to_string().contains("SPIN_VARIABLE_SECRET_X"), "{err}");
}

#[test]
fn a_store_reserved_for_the_host_is_refused() {
    let text = GOOD.replace(
        "key_value_stores = [\"default\"]\n[component.group-send.variables]",
        "key_value_stores = [\"default\", \"cim-components\"]\n[component.group-send.variables]",
    );
    let err = parse(&text).expect_err("reserved");
    assert!(
        matches!(&err, ManifestError::ReservedStore { component, store } if component == "group-send" && store == "cim-components"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "component `group-send`: key-value store `cim-components` is reserved for the host (names beginning `cim-` are); grant another name"
    );
}

#[test]
fn unknown_key_is_refused_with_its_position() {
    let text = GOOD.replace(
        "key_value_stores = [\"default\"]\n[component.group-send.variables]",
        "key_value_store = [\"default\"]\n[component.group-send.variables]",
    );
    let err = parse(&text).expect_err("typo");
    let msg = err.to_string();
    assert!(matches!(err, ManifestError::Parse { .. }), "{msg}");
    assert!(msg.contains("key_value_store"), "{msg}");
    assert!(msg.contains("line"), "{msg}");
}

#[test]
fn missing_event_is_named() {
    let text = GOOD.replace("[[trigger.cim]]\nevent = \"online\"\ncomponent = \"online-list\"\n", "");
    let err = parse(&text).expect_err("no online trigger");
    assert!(matches!(err, ManifestError::MissingEvent { event: Event::Online }), "{err}");
    assert!(err.to_string().contains("`online`"), "{err}");
}

#[test]
fn duplicate_and_unknown_events_are_refused() {
    let dup = format!("{GOOD}\n[[trigger.cim]]\nevent = \"group\"\ncomponent = \"login\"\n");
    let err = parse(&dup).expect_err("duplicate");
    assert!(matches!(err, ManifestError::DuplicateEvent { event: Event::Group, .. }), "{err}");
    let unknown = GOOD.replace("event = \"online\"", "event = \"presence\"");
    let err = parse(&unknown).expect_err("unknown event");
    assert!(err.to_string().contains("`presence`"), "{err}");
}

#[test]
fn unknown_component_is_named() {
    let text = GOOD.replace("component = \"online-list\"", "component = \"who-is-there\"");
    let err = parse(&text).expect_err("unknown component");
    assert!(
        matches!(&err, ManifestError::UnknownComponent { event: Event::Online, component } if component == "who-is-there"),
        "{err}"
    );
}

#[test]
fn undeclared_variable_is_named() {
    let text = GOOD.replace("\"{{ blocked_words }}\"", "\"{{ bad_words }}\"");
    let err = parse(&text).expect_err("undeclared");
    assert!(
        matches!(&err, ManifestError::UndeclaredVariable { component, variable, .. } if component == "group-send" && variable == "bad_words"),
        "{err}"
    );
    let text = GOOD.replace("\"{{ blocked_words }}\"", "\"{{ blocked_words \"");
    assert!(matches!(parse(&text), Err(ManifestError::BadTemplate { .. })));
}

#[test]
fn version_one_and_missing_version_are_refused() {
    let v1 = GOOD.replace("spin_manifest_version = 2", "spin_manifest_version = 1");
    let err = parse(&v1).expect_err("v1");
    assert!(matches!(err, ManifestError::Version { .. }), "{err}");
    assert!(err.to_string().contains("version 1"), "{err}");
    let old = GOOD.replace("spin_manifest_version = 2", "spin_version = \"1\"");
    assert!(matches!(parse(&old), Err(ManifestError::Version { .. })));
    let none = GOOD.replace("spin_manifest_version = 2", "");
    assert!(matches!(parse(&none), Err(ManifestError::Version { .. })));
}

#[test]
fn ids_and_names_are_checked() {
    let text = GOOD
        .replace("[component.online-list]", "[component.Online_List]")
        .replace("component = \"online-list\"", "component = \"Online_List\"");
    assert!(matches!(parse(&text), Err(ManifestError::BadComponentId { id }) if id == "Online_List"));
    let text = GOOD.replace("allowed_ids = { default", "AllowedIds = { default");
    assert!(matches!(parse(&text), Err(ManifestError::BadVariableName { name, .. }) if name == "AllowedIds"));
    let text = GOOD.replace("secret_x = { required = true", "secret_x = { default = \"a\", required = true");
    assert!(matches!(parse(&text), Err(ManifestError::DefaultAndRequired { .. })));
    assert!(
        is_kebab_case("group-send")
            && is_kebab_case("a1-b2")
            && !is_kebab_case("-a")
            && !is_kebab_case("a--b")
    );
}

#[test]
fn load_reads_relative_to_the_manifest_directory() {
    let dir = std::env::temp_dir().join(format!("cim-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("spin.toml");
    std::fs::write(&path, GOOD).expect("write");
    let m = Manifest::load_with_env(&path, env_with(&[("CIM_VARIABLE_SECRET_X", "x")])).expect("valid");
    assert_eq!(m.component_for(Event::Login).expect("login").source, dir.join("wasm/login.wasm"));
    let err = Manifest::load(dir.join("missing.toml")).expect_err("missing file");
    assert!(err.to_string().contains("missing.toml"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn component_limits_are_read_and_default_to_none() {
    let text = GOOD.replace(
        "[component.group-send.build]",
        "[component.group-send.limits]\nmemory_mib = 32\ndeadline_ms = 250\nmax_instances = 8\n[component.group-send.build]",
    );
    let m = parse(&text).expect("valid");
    let group = m.component_for(Event::Group).expect("group");
    assert_eq!(
        group.limits,
        LimitOverrides { memory_mib: Some(32), deadline_ms: Some(250), max_instances: Some(8) }
    );
    assert_eq!(m.component_for(Event::Login).expect("login").limits, LimitOverrides::default());
    let partial = GOOD
        .replace("[component.private-send]\n", "[component.private-send]\nlimits = { memory_mib = 64 }\n");
    let private = parse(&partial).expect("valid");
    let limits = private.component_for(Event::Private).expect("private").limits;
    assert_eq!(limits, LimitOverrides { memory_mib: Some(64), ..LimitOverrides::default() });
}

#[test]
fn bad_component_limits_name_the_key_and_range() {
    let with = |limits: &str| {
        GOOD.replace(
            "[component.online-list]\n",
            &format!("[component.online-list]\nlimits = {{ {limits} }}\n"),
        )
    };
    let err = parse(&with("memory_mib = 0")).expect_err("zero memory");
    assert!(matches!(&err, ManifestError::BadLimit { key: "memory_mib", .. }), "{err}");
    assert_eq!(err.to_string(), "[component.online-list.limits] `memory_mib` = 0: must be 1 to 4096 MiB");
    let err = parse(&with("deadline_ms = 600000")).expect_err("ten minutes");
    assert!(err.to_string().contains("`deadline_ms` = 600000: must be 1 to 60000 milliseconds"), "{err}");
    let err = parse(&with("max_instances = -1")).expect_err("negative");
    assert!(err.to_string().contains("`max_instances` = -1"), "{err}");
    let err = parse(&with("memory = 3")).expect_err("unknown key");
    assert!(err.to_string().contains("unknown field `memory`"), "{err}");
    let err = parse(&with("memory_mib = \"32\"")).expect_err("a string");
    assert!(matches!(err, ManifestError::Parse { .. }), "{err}");
}

//! `cim-host new`: a scaffolded handler project builds outside the repository with its own
//! language's tools, and serves messages once pushed to a running host. Rust always; Python
//! and JavaScript when componentize-py and componentize-js are at hand (`CIM_COMPONENTIZE_PY`,
//! `CIM_COMPONENTIZE_JS`, `target/polyglot/` as `.ci/run` installs them, or PATH). CI sets
//! `CIM_POLYGLOT_REQUIRED=1`, which turns a missing tool into a failure instead of a skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cim_proto::{Body, ErrorCode};
use common::{ADMIN_TOKEN, Host, RawClient, binary, expect_error, root};

/// Runs `cim-host new EVENT --lang LANG --out DIR --name NAME`; returns the project directory.
fn scaffold(event: &str, lang: &str, parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    let out = Command::new(binary("cim-host"))
        .args(["new", event, "--lang", lang, "--name", name, "--out"])
        .arg(&dir)
        .output()
        .expect("run cim-host new");
    assert!(out.status.success(), "cim-host new: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// Replaces `from` (which must be there) with `to` in a project file: the tests' own logic
/// goes where the template says "your logic here".
fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} no longer contains {from:?}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

/// Runs a build command line in `dir`, with `program` standing for its first word.
fn run(dir: &Path, program: &Path, line: &str) {
    let started = Instant::now();
    let mut words = line.split_whitespace();
    let first = words.next().unwrap();
    let out = Command::new(program).args(words).current_dir(dir).output().expect("run the build");
    assert!(
        out.status.success(),
        "{line} (as {}) failed:\n{}\n{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{first} built {} in {:.1?}", dir.display(), started.elapsed());
}

fn cim_host(args: &[&str]) -> String {
    let out = Command::new(binary("cim-host")).args(args).output().expect("run cim-host");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "cim-host {args:?}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// `cim-host push`es `wasm` as `component`, timing it (a push compiles the component).
fn push(host: &Host, component: &str, wasm: &Path) {
    let started = Instant::now();
    let stdout =
        cim_host(&["push", component, wasm.to_str().unwrap(), "--to", &host.route(), "--token", ADMIN_TOKEN]);
    assert!(stdout.starts_with(&format!("pushed {component} version")), "{stdout}");
    eprintln!("pushed {} in {:.1?}", wasm.display(), started.elapsed());
}

#[tokio::test]
async fn new_rust_private_handler_builds_checks_and_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let project = scaffold("private", "rust", tmp.path(), "via-scaffold");
    edit(
        &project.join("src/lib.rs"),
        "    let _ = request;\n    SendDecision::Deliver",
        "    SendDecision::Rewrite(format!(\"via scaffold: {}\", request.message.text))",
    );
    // `cargo build --release` as the README says, in a directory outside the workspace, into
    // the components' target directory: the project has their profile and flags, so it reuses
    // their wit-bindgen (~1 minute to compile on two cores) instead of compiling it again.
    common::components();
    let target = root().join("components/target");
    let started = Instant::now();
    let out = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("run cargo build");
    assert!(out.status.success(), "cargo build: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("cargo built {} in {:.1?}", project.display(), started.elapsed());
    let wasm = target.join("wasm32-wasip2/release/via_scaffold.wasm");

    let verdict = cim_host(&["check", wasm.to_str().unwrap(), "--event", "private"]);
    assert!(verdict.starts_with("ok: ") && verdict.contains("cim:im/private-send@0.2.0"), "{verdict}");
    // The 64 KiB stack of .cargo/config.toml: a Rust handler starts small.
    assert!(verdict.contains("starting memory 128 KiB of 16 MiB"), "{verdict}");

    let host = Host::start(&[]).await.unwrap();
    push(&host, "private-send", &wasm);
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    let answer = alice.request(2, Body::private(2, "hello".into())).await;
    assert!(matches!(answer, Body::Ack { .. }), "{answer:?}");
    assert_eq!(bob.delivery().await.text, "via scaffold: hello");
}

/// A polyglot build tool: `env`'s path, else where `.ci/run` installs it, else `name` on
/// PATH. `None` (a skip) when none is there, unless CI requires the tools.
fn tool(env: &str, installed: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::var_os(env)
        .map(PathBuf::from)
        .or_else(|| Some(root().join(installed)).filter(|p| p.is_file()))
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
        });
    if found.is_none() {
        assert!(
            std::env::var("CIM_POLYGLOT_REQUIRED").as_deref() != Ok("1"),
            "CIM_POLYGLOT_REQUIRED=1 but {name} is not installed: set {env}, or put it on PATH"
        );
        eprintln!("skipped: {name} is not installed (set {env}, or put it on PATH)");
    }
    found
}

/// Starts a host with the default pools (they fit a Python component's 14 core instances)
/// and a deadline that a loaded CI machine's first calls into a fresh 18 MB component cannot
/// miss.
async fn polyglot_host() -> Host {
    Host::start(&["--handler-deadline-ms", "2000"]).await.unwrap()
}

/// Sends a group message from alice and returns what bob got.
async fn group_round_trip(alice: &mut RawClient, bob: &mut RawClient, id: u64, text: &str) -> String {
    let answer = alice.request(id, Body::group(text.into())).await;
    assert!(matches!(answer, Body::Ack { .. }), "{answer:?}");
    bob.delivery().await.text
}

#[tokio::test]
async fn new_python_group_handler_serves_and_reports_its_exception() {
    let Some(componentize_py) =
        tool("CIM_COMPONENTIZE_PY", "target/polyglot/venv/bin/componentize-py", "componentize-py")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let project = scaffold("group", "python", tmp.path(), "py-group");
    let app = project.join("app.py");
    edit(
        &app,
        "from wit_world import exports\n",
        "from wit_world import exports\nfrom wit_world.imports.types import SendDecision_Rewrite\n",
    );
    edit(
        &app,
        "        return GroupDecision(SendDecision_Deliver(), Recipients_AllOnlineExceptSender())",
        "        if message.text == \"raise\":\n            \
         raise ValueError(\"py-group refuses this\")\n        \
         return GroupDecision(SendDecision_Rewrite(\"py: \" + message.text), Recipients_AllOnlineExceptSender())",
    );
    // The README's build command, as written.
    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    let build = readme
        .lines()
        .find(|l| l.starts_with("componentize-py ") && l.contains(" componentize app "))
        .expect("the README's componentize-py build command");
    run(&project, &componentize_py, build);

    let host = polyglot_host().await;
    push(&host, "group-send", &project.join("py-group.wasm"));
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    assert_eq!(group_round_trip(&mut alice, &mut bob, 10, "hello").await, "py: hello");

    // An exception: the sender gets the traceback's last line, nobody gets the message.
    let msg = expect_error(alice.request(11, Body::group("raise".into())).await, ErrorCode::HandlerFailed);
    assert!(msg.ends_with("(guest stderr: ValueError: py-group refuses this)"), "{msg}");
    assert!(!msg.contains("Traceback"), "{msg}");
    assert_eq!(group_round_trip(&mut alice, &mut bob, 12, "still here").await, "py: still here");
}

#[tokio::test]
async fn new_js_group_handler_serves_and_reports_its_exception() {
    let Some(componentize_js) =
        tool("CIM_COMPONENTIZE_JS", "target/polyglot/node_modules/.bin/componentize-js", "componentize-js")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let project = scaffold("group", "js", tmp.path(), "js-group");
    edit(
        &project.join("handler.js"),
        "decision: { tag: 'deliver' },",
        "decision: { tag: 'rewrite', val: 'js: ' + message.text },",
    );
    edit(
        &project.join("handler.js"),
        "function decide(message) {\n",
        "function decide(message) {\n  if (message.text === 'throw') throw new TypeError('js-group refuses this');\n",
    );
    // package.json's build script, as written (what `npm run build` runs).
    let package: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(project.join("package.json")).unwrap()).unwrap();
    run(&project, &componentize_js, package["scripts"]["build"].as_str().expect("a build script"));

    let host = polyglot_host().await;
    push(&host, "group-send", &project.join("js-group.wasm"));
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    assert_eq!(group_round_trip(&mut alice, &mut bob, 10, "hello").await, "js: hello");

    // An exception: the sender gets its message (StarlingMonkey prints the message, not its
    // type), nobody gets the group message, the next one works.
    let msg = expect_error(alice.request(11, Body::group("throw".into())).await, ErrorCode::HandlerFailed);
    assert!(msg.ends_with("(guest stderr: js-group refuses this)"), "{msg}");
    assert!(!msg.contains("mozalloc"), "{msg}");
    assert_eq!(group_round_trip(&mut alice, &mut bob, 12, "still here").await, "js: still here");
}

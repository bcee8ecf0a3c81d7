//! One request: a fresh [`wasmtime::Store`], instantiate from the pre-instantiated component,
//! call the export, drop everything. A failure becomes a readable reason: the deadline, the
//! memory cap, a trap (with the guest's panic message when it printed one) or a host error.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Store, Trap};

use super::bindings::host_api::cim::im::types as wit;
use super::component::{Loaded, WorldPre};
use super::engine::WasmEngine;
use super::host_api::HostState;
use crate::handlers::Context;
use tracing::warn;

/// The arguments of one call, already in WIT types.
pub(crate) enum Input {
    Login(wit::LoginRequest),
    Private(Vec<wit::PrivateRequest>),
    Group(Vec<wit::Message>),
    Online(wit::User, Vec<wit::User>),
    Callback(Vec<wit::Delivered>),
}

/// What the guest returned, in WIT types.
pub(crate) enum Output {
    Login(wit::LoginDecision),
    Private(Vec<wit::SendDecision>),
    Group(Vec<wit::GroupDecision>),
    Online(Vec<wit::User>),
    Callback,
}

/// Runs one request on `loaded` (which the caller took from its slot, so a concurrent swap
/// does not affect it). `Err` is the reason the handler failed.
pub(crate) async fn run(
    engine: Arc<WasmEngine>,
    loaded: Arc<Loaded>,
    ctx: Context,
    input: Input,
) -> Result<Output, String> {
    // Fail fast past the component's `max_instances`, like a full pool does.
    let Ok(_permit) = loaded.permits.clone().try_acquire_owned() else {
        return Err(format!(
            "busy: {} instances of it are running, its max_instances (spin.toml [component.{}.limits])",
            loaded.limits.max_instances, loaded.name
        ));
    };
    let mut store = engine.new_store(&loaded, ctx);
    let deadline = loaded.limits.deadline;
    // The epoch callback stops a guest that computes past its deadline; this stops one stuck
    // in a host call (a slow store), by dropping the call, which unwinds the guest.
    let result = tokio::time::timeout(deadline, call(&mut store, &loaded.pre, input)).await;
    match result {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(explain(store.data(), &e, deadline)),
        Err(_elapsed) => Err(format!("timed out after {}", duration(deadline))),
    }
}

async fn call(store: &mut Store<HostState>, pre: &WorldPre, input: Input) -> wasmtime::Result<Output> {
    match (pre, input) {
        (WorldPre::Login(pre), Input::Login(req)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            let decision = instance.cim_im_login_handler().call_login(&mut *store, &req).await?;
            Ok(Output::Login(decision))
        }
        (WorldPre::Private(pre), Input::Private(batch)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            let decisions = instance.cim_im_private_handler().call_handle(&mut *store, &batch).await?;
            Ok(Output::Private(decisions))
        }
        (WorldPre::Group(pre), Input::Group(batch)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            let decisions = instance.cim_im_group_handler().call_handle(&mut *store, &batch).await?;
            Ok(Output::Group(decisions))
        }
        (WorldPre::Online(pre), Input::Online(caller, online)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            let visible =
                instance.cim_im_online_handler().call_visible(&mut *store, &caller, &online).await?;
            Ok(Output::Online(visible))
        }
        (WorldPre::Callback(pre), Input::Callback(batch)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            instance.cim_im_callback_handler().call_on_delivered(&mut *store, &batch).await?;
            Ok(Output::Callback)
        }
        _ => Err(wasmtime::format_err!("host bug: the call does not match the component's world")),
    }
}

/// Why a call failed, in words an operator can act on and short enough for the client: a
/// guest's whole stderr (a Python traceback) goes to the host log, and only its last line
/// into the reason.
fn explain(state: &HostState, e: &wasmtime::Error, deadline: Duration) -> String {
    if state.timed_out {
        return format!("timed out after {}", duration(deadline));
    }
    if let Some(asked) = state.limiter.denied {
        return format!(
            "exceeded the memory limit of {} (tried to grow a memory to {})",
            bytes(state.limiter.cap),
            bytes(asked)
        );
    }
    let mut reason = match e.downcast_ref::<Trap>() {
        Some(trap) => {
            let trap = trap.to_string();
            format!("trapped: {}", trap.strip_prefix("wasm trap: ").unwrap_or(&trap))
        }
        None => format!("failed: {}", e.root_cause()),
    };
    if let Some(stderr) = state.stderr() {
        warn!(
            component = %state.component(),
            event = %state.event(),
            stderr = %stderr,
            "the guest wrote to stderr before it failed"
        );
        if let Some(last) = last_line(&stderr) {
            reason.push_str(&format!(" (guest stderr: {last})"));
        }
    }
    reason
}

/// The most of a guest's stderr a caller is shown.
const STDERR_SHOWN: usize = 200;

/// The line of a guest's stderr that says what went wrong, cut to [`STDERR_SHOWN`] bytes: a
/// Python traceback's exception line (`ValueError: …`), a JavaScript exception's message,
/// else the last line (a Rust panic's message).
fn last_line(stderr: &str) -> Option<String> {
    let tidy = tidy_stderr_lines(stderr);
    let last = python_exception(stderr).or_else(|| js_exception(stderr)).or_else(|| tidy.last().copied())?;
    let mut end = last.len().min(STDERR_SHOWN);
    while !last.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < last.len() { "…" } else { "" };
    Some(format!("{}{cut}", &last[..end]))
}

/// The exception line of the last Python traceback in `stderr`: the first unindented line
/// after its header. componentize-py (0.25) follows the traceback with a panic of its own
/// ("Python function threw an unexpected exception"), which says nothing about the cause.
fn python_exception(stderr: &str) -> Option<&str> {
    let (_, after) = stderr.rsplit_once("Traceback (most recent call last):")?;
    after
        .lines()
        .skip(1)
        .find(|line| !line.is_empty() && !line.starts_with(char::is_whitespace))
        .map(str::trim_end)
}

/// The message of the last uncaught JavaScript exception in `stderr`: the line before its
/// `Stack:` block. componentize-js (0.23, StarlingMonkey) prints the exception's message, its
/// stack, then `Redirecting call to abort() to mozalloc_abort`, which says nothing about the
/// cause.
fn js_exception(stderr: &str) -> Option<&str> {
    let lines: Vec<&str> = stderr.lines().collect();
    let stack = lines.iter().rposition(|line| line.trim_end() == "Stack:")?;
    lines[..stack].iter().rev().map(|line| line.trim()).find(|line| !line.is_empty())
}

/// A guest's stderr on one line, without the std panic hook's boilerplate: `thread
/// '<unnamed>' (1) panicked at src/lib.rs:13:9:\nboom\nnote: run with RUST_BACKTRACE…` becomes
/// `panicked at src/lib.rs:13:9: boom`.
#[cfg(test)]
fn tidy_stderr(stderr: &str) -> String {
    tidy_stderr_lines(stderr).join(" ")
}

fn tidy_stderr_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|line| !line.starts_with("note: run with `RUST_BACKTRACE"))
        .map(|line| match (line.starts_with("thread '"), line.find(" panicked at ")) {
            (true, Some(at)) => &line[at + 1..],
            _ => line,
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect()
}

pub(crate) fn duration(d: Duration) -> String {
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{d:?}")
    }
}

pub(crate) fn bytes(n: usize) -> String {
    const MIB: usize = 1 << 20;
    const KIB: usize = 1 << 10;
    if n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_boilerplate_is_dropped() {
        let stderr = "thread '<unnamed>' (1) panicked at src/lib.rs:13:9:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(tidy_stderr(stderr), "panicked at src/lib.rs:13:9: boom");
        assert_eq!(tidy_stderr("plain\n\nline"), "plain line");
    }

    #[test]
    fn a_traceback_is_cut_to_its_last_line() {
        let traceback = "Traceback (most recent call last):\n  File \"app.py\", line 9, in handle\n    raise ValueError(\"no\")\nValueError: no\n";
        assert_eq!(last_line(traceback).as_deref(), Some("ValueError: no"));
        // componentize-py 0.25 panics after printing the traceback.
        let then_panic = format!(
            "{traceback}\nthread '<unnamed>' (1) panicked at runtime/src/lib.rs:1280:25:\n\
             Python function threw an unexpected exception\n\
             note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
        );
        assert_eq!(last_line(&then_panic).as_deref(), Some("ValueError: no"));
        // Chained exceptions: the last traceback's.
        let chained = format!(
            "{traceback}\nDuring handling of the above exception, another exception occurred:\n\n\
             Traceback (most recent call last):\n  File \"app.py\", line 11, in handle\nKeyError: 'x'\n"
        );
        assert_eq!(last_line(&chained).as_deref(), Some("KeyError: 'x'"));
        let long = "x".repeat(500);
        let shown = last_line(&long).unwrap();
        assert!(shown.len() < 210 && shown.ends_with('…'), "{shown}");
        assert_eq!(last_line("\n \n"), None);
    }

    #[test]
    fn a_javascript_exception_is_cut_to_its_message() {
        let stderr = "js-group refuses this\nStack:\n  decide@handler.js:21:39\n  handle@handler.js:13:18\n\n\
                      Redirecting call to abort() to mozalloc_abort\n";
        assert_eq!(last_line(stderr).as_deref(), Some("js-group refuses this"));
        // Without a stack block, the last line as before.
        assert_eq!(
            last_line("Redirecting call to abort() to mozalloc_abort\n").as_deref(),
            Some("Redirecting call to abort() to mozalloc_abort")
        );
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(bytes(16 << 20), "16 MiB");
        assert_eq!(bytes(16512 << 10), "16512 KiB");
        assert_eq!(bytes(100), "100 bytes");
        assert_eq!(duration(Duration::from_millis(100)), "100 ms");
        assert_eq!(duration(Duration::from_micros(1500)), "1.5ms");
    }
}

//! Per-component limits, memory headroom and the refusals that name their fix.

use super::*;

/// A component made of one import of an (empty) instance named `name`.
fn component_importing(name: &str) -> Vec<u8> {
    use wasm_encoder::{
        Component, ComponentImportSection, ComponentTypeRef, ComponentTypeSection, InstanceType,
    };
    let mut types = ComponentTypeSection::new();
    types.instance(&InstanceType::new());
    let mut imports = ComponentImportSection::new();
    imports.import(name, ComponentTypeRef::Instance(0));
    let mut component = Component::new();
    component.section(&types).section(&imports);
    component.finish()
}

/// A component that defines the async built-in `task.cancel`.
fn component_using_task_cancel() -> Vec<u8> {
    use wasm_encoder::{CanonicalFunctionSection, Component};
    let mut canon = CanonicalFunctionSection::new();
    canon.task_cancel();
    let mut component = Component::new();
    component.section(&canon);
    component.finish()
}

#[tokio::test]
async fn a_loaded_component_reports_its_memory_headroom() {
    let rt = runtime();
    let loaded = install(&rt, Event::Group, "group_send", Capabilities::default()).await;
    let headroom = loaded.headroom().expect("measured at load");
    assert_eq!(headroom.cap, 16 << 20);
    assert!(headroom.starting > 0 && headroom.starting < 2 << 20, "{headroom}");
    assert!(
        headroom.to_string().starts_with("starting memory ") && headroom.to_string().ends_with(" of 16 MiB")
    );
    let info = rt.list().into_iter().find(|i| i.active).expect("listed");
    assert_eq!(info.headroom, Some(headroom.to_string()));
    assert_eq!(info.limits, LimitsJson { memory_mib: 16, deadline_ms: 100, max_instances: 16 });
}

#[tokio::test]
async fn a_component_gets_its_own_limits() {
    let rt = runtime();
    let limits = LimitOverrides { memory_mib: Some(1), deadline_ms: Some(30), max_instances: Some(4) };
    let loaded =
        install(&rt, Event::Group, "loop_forever", Capabilities { limits, ..Capabilities::default() }).await;
    assert_eq!(
        loaded.limits,
        Limits { memory_cap: 1 << 20, deadline: Duration::from_millis(30), max_instances: 4 }
    );
    let ctx = context_with_online(&[1]).await;
    let err = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect_err("must time out");
    assert!(err.reason.contains("timed out after 30 ms"), "{err}");

    let bomb = LimitOverrides { memory_mib: Some(2), ..LimitOverrides::default() };
    install(&rt, Event::Group, "alloc_bomb", Capabilities { limits: bomb, ..Capabilities::default() }).await;
    let err = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect_err("must fail");
    assert!(err.reason.contains("exceeded the memory limit of 2 MiB"), "{err}");
}

#[tokio::test]
async fn calls_past_a_components_max_instances_fail_fast() {
    let rt = runtime();
    let limits =
        LimitOverrides { max_instances: Some(1), deadline_ms: Some(2000), ..LimitOverrides::default() };
    let loaded =
        install(&rt, Event::Group, "loop_forever", Capabilities { limits, ..Capabilities::default() }).await;
    let rt = Arc::new(rt);
    let ctx = context_with_online(&[1]).await;
    let first = {
        let (rt, ctx) = (rt.clone(), ctx.clone());
        tokio::spawn(async move { rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await })
    };
    wait_until_in_flight(&loaded).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while loaded.permits.available_permits() > 0 {
        assert!(Instant::now() < deadline, "the first call never took its instance");
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let err = rt.group(&ctx, vec![message(2, 1, MessageKind::Group, "y")]).await.expect_err("busy");
    assert!(err.reason.contains("busy") && err.reason.contains("max_instances"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "failed fast");
    assert!(first.await.expect("join").is_err(), "the first one times out");
}

#[tokio::test]
async fn a_component_starting_above_its_cap_is_refused_with_the_key_to_raise() {
    let rt = Runtime::new(RuntimeConfig { memory_cap: 64 << 10, ..config() }).expect("runtime");
    let err = rt
        .load(Event::Group, "group-send", wasm("group_send"), Capabilities::default(), "upload")
        .await
        .expect_err("starts above 64 KiB");
    let text = err.to_string();
    assert!(matches!(err, LoadError::TooBig(_)), "{text}");
    assert!(text.contains("more than its cap of 64 KiB"), "{text}");
    assert!(text.contains("`memory_mib` under [component.group-send.limits]"), "{text}");
    assert!(rt.current(Event::Group).is_none());
}

#[tokio::test]
async fn a_component_too_big_for_the_pools_is_refused_before_compiling() {
    let pool = PoolShape { core_instances: 1, ..PoolShape::default() };
    let rt = Runtime::new(RuntimeConfig { pool, ..config() }).expect("runtime");
    let err = rt
        .load(Event::Group, "group-send", wasm("group_send"), Capabilities::default(), "upload")
        .await
        .expect_err("more than one core instance");
    let text = err.to_string();
    assert!(matches!(err, LoadError::TooBig(_)), "{text}");
    assert!(text.contains("--pool-core-instances"), "{text}");
}

#[tokio::test]
async fn refusals_of_the_commonest_toolchain_mistakes_name_the_flag() {
    let rt = runtime();
    let none = Capabilities::default;
    let err = rt
        .load(Event::Group, "js", component_importing("wasi:http/types@0.2.6"), none(), "upload")
        .await
        .expect_err("wasi:http");
    let text = err.to_string();
    assert!(matches!(err, LoadError::Unsupported(_)), "{text}");
    assert!(text.contains("wasi:http/types@0.2.6") && text.contains("-d http fetch-event"), "{text}");

    let err = rt
        .load(Event::Group, "qjs", component_using_task_cancel(), none(), "upload")
        .await
        .expect_err("async");
    let text = err.to_string();
    assert!(matches!(err, LoadError::Unsupported(_)), "{text}");
    assert!(text.contains("`task.cancel`") && text.contains("--backend-qjs-disable-async"), "{text}");
}

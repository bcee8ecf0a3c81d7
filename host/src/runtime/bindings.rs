//! The generated bindings, and nothing else: the `host-api` world once (every import trait
//! and the shared `cim:im/types`), then one module per handler world that reuses those
//! imports through `with`, so the five worlds share one set of import implementations and
//! one set of Rust types.

/// Imports every handler may call, and the WIT types (`cim:im/types`).
pub(crate) mod host_api {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "host-api",
        imports: { default: async | trappable },
    });
}

/// Generates a handler world's bindings, mapping its imports to [`host_api`].
macro_rules! handler_world {
    ($module:ident, $world:literal) => {
        pub(crate) mod $module {
            wasmtime::component::bindgen!({
                path: "../wit",
                world: $world,
                exports: { default: async },
                with: {
                    "cim:im/types": super::host_api::cim::im::types,
                    "cim:im/presence": super::host_api::cim::im::presence,
                    "cim:im/key-value": super::host_api::cim::im::key_value,
                    "cim:im/variables": super::host_api::cim::im::variables,
                    "cim:im/log": super::host_api::cim::im::log,
                    "cim:im/clock": super::host_api::cim::im::clock,
                },
            });
        }
    };
}

handler_world!(login, "login");
handler_world!(private_send, "private-send");
handler_world!(group_send, "group-send");
handler_world!(online_list, "online-list");
handler_world!(message_callback, "message-callback");

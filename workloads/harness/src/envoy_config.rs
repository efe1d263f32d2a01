//! Renders a complete Envoy bootstrap for kvroute.

use std::fmt::Write as _;

use kvroute_core::config::{EndpointConfig, FilterConfig, FleetEndpoint, SidecarEndpoint};

/// Cluster name of the sidecar.
pub const SIDECAR_CLUSTER: &str = "kvroute_sidecar";

/// One engine behind Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    /// Endpoint name (also its Envoy cluster).
    pub name: String,
    /// Host or IP.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Engine {
    /// `IP:port` (an IPv6 address in brackets), as Envoy names the host in a static cluster;
    /// None for a host name (a DNS cluster names its hosts by the addresses it resolves).
    pub fn address(&self) -> Option<String> {
        let ip: std::net::IpAddr = self.host.parse().ok()?;
        Some(std::net::SocketAddr::new(ip, self.port).to_string())
    }

    /// An endpoint listening on this machine's loopback address.
    pub fn local(name: &str, port: u16) -> Self {
        Self {
            name: name.to_string(),
            host: "127.0.0.1".into(),
            port,
        }
    }
}

/// What the bootstrap is made of.
#[derive(Debug, Clone)]
pub struct EnvoySpec {
    /// Where clients connect.
    pub listen_address: String,
    /// Listener port.
    pub listen_port: u16,
    /// Admin port (on 127.0.0.1).
    pub admin_port: u16,
    /// The engines.
    pub engines: Vec<Engine>,
    /// Path of the filter's .wasm file.
    pub wasm_path: String,
    /// The filter configuration (endpoints are filled from `engines`).
    pub filter: FilterConfig,
    /// False renders the same Envoy without kvroute (the baseline of the latency benchmark).
    pub with_filter: bool,
    /// The sidecar serving engine state (cluster `kvroute_sidecar`), if any.
    pub sidecar: Option<Engine>,
    /// The native module (`kvroute-native`, an Envoy dynamic module) in the Wasm filter's place,
    /// with no state singleton (the module runs its own on Envoy's main thread).
    pub native_module: Option<NativeModule>,
    /// Serve the Wasm filter's configuration by ECDS from this file (a watched directory: replace the
    /// file by a rename to apply a new configuration without touching the listener); None: inline.
    pub ecds_path: Option<String>,
    /// An ext_proc gRPC processor (`kvroute-extproc`) in the Wasm filter's place, with no state
    /// singleton: Envoy's `ext_proc` filter in BUFFERED request-body mode calls it for each request.
    pub ext_proc: Option<Engine>,
    /// Whether the bootstrap renders the state singleton (`kvroute_state`); without it a filter VM
    /// runs the state service (see the filter's stand-by).
    pub state_service: bool,
}

/// A dynamic module (`envoy.filters.http.dynamic_modules`) loaded from a shared object.
#[derive(Debug, Clone)]
pub struct NativeModule {
    /// Path of the `.so`.
    pub path: String,
    /// The filter name passed to the module (it picks the module's mode).
    pub filter_name: String,
}

impl EnvoySpec {
    /// The example setup: two engines on 127.0.0.1:8001 and :8002, Envoy on :10000, admin on :9901.
    pub fn example() -> Self {
        let mut spec = Self::new(
            vec![
                Engine::local("engine0", 8001),
                Engine::local("engine1", 8002),
            ],
            "target/wasm32-wasip1/release/kvroute_filter.wasm".into(),
        );
        spec.set_sidecar(Engine::local("sidecar", 9100));
        spec
    }

    /// Routes engine state through a sidecar at this address.
    pub fn set_sidecar(&mut self, at: Engine) {
        self.filter.sidecar = Some(SidecarEndpoint {
            cluster: SIDECAR_CLUSTER.into(),
            authority: "kvroute-sidecar".into(),
            path: "/snapshot".into(),
            stale_after_ms: 1000,
        });
        self.sidecar = Some(at);
    }

    /// Shares this replica's decisions with the fleet's other Envoy replicas through the sidecar
    /// (which must serve `/fleet` from Redis; see [`EnvoySpec::set_sidecar`]).
    pub fn share_fleet(&mut self, sync_ms: u32) {
        self.filter.fleet = Some(FleetEndpoint {
            cluster: SIDECAR_CLUSTER.into(),
            authority: "kvroute-sidecar".into(),
            path: "/fleet".into(),
            sync_ms,
            max_batch_bytes: 256 * 1024,
        });
    }

    /// A spec with default ports and filter settings for these engines.
    pub fn new(engines: Vec<Engine>, wasm_path: String) -> Self {
        let filter = FilterConfig::with_endpoints(
            engines
                .iter()
                .map(|e| EndpointConfig {
                    name: e.name.clone(),
                    cluster: None,
                    capacity_blocks: None,
                    address: e.address(),
                })
                .collect(),
        );
        Self {
            listen_address: "0.0.0.0".into(),
            listen_port: 10000,
            admin_port: 9901,
            engines,
            wasm_path,
            filter,
            with_filter: true,
            sidecar: None,
            native_module: None,
            ecds_path: None,
            ext_proc: None,
            state_service: true,
        }
    }
}

/// The stats tags that turn kvroute's flat stat names into Prometheus labels.
pub const STATS_TAGS: [(&str, &str); 4] = [
    (
        "policy",
        r"^wasmcustom\.kvroute_\w+(?:\.\w+\.[\w-]+)*?(\.policy\.([\w-]+))",
    ),
    (
        "endpoint",
        r"^wasmcustom\.kvroute_\w+(?:\.\w+\.[\w-]+)*?(\.endpoint\.([\w-]+))",
    ),
    (
        "reason",
        r"^wasmcustom\.kvroute_\w+(?:\.\w+\.[\w-]+)*?(\.reason\.([\w-]+))",
    ),
    (
        "op",
        r"^wasmcustom\.kvroute_\w+(?:\.\w+\.[\w-]+)*?(\.op\.([\w-]+))",
    ),
];

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Renders the bootstrap as YAML.
pub fn render(spec: &EnvoySpec) -> String {
    let filter_json = serde_json::to_string(&spec.filter).unwrap_or_default();
    let header = &spec.filter.route_header;
    let names: Vec<&str> = spec.engines.iter().map(|e| e.name.as_str()).collect();
    let buffer_limit = (u64::from(spec.filter.max_body_bytes) * 2).max(1 << 20);
    let mut y = String::new();
    let w = &mut y;
    let _ = writeln!(w, "# kvroute: Envoy in front of {} vLLM-compatible engines, routed by the kvroute wasm filter.", spec.engines.len());
    let _ = writeln!(w, "# Generated by `kvroute-envoy-config` (just envoy-config); edit the generator, not this file.");
    let _ = writeln!(
        w,
        "# Run from the repository root: envoy -c envoy/envoy.yaml --concurrency 2"
    );
    if spec.ecds_path.is_some() {
        let _ = writeln!(w, "# xDS (here ECDS from a file) needs the node named.");
        let _ = writeln!(w, "node: {{ id: kvroute, cluster: kvroute }}");
    }
    let _ = writeln!(w, "admin:");
    let _ = writeln!(w, "  address:");
    let _ = writeln!(
        w,
        "    socket_address: {{ address: 127.0.0.1, port_value: {} }}",
        spec.admin_port
    );
    let _ = writeln!(w, "# Policy and parameters are runtime values: POST /runtime_modify?kvroute.policy=jsq on the admin port.");
    let _ = writeln!(w, "# The singleton polls GET /runtime through the kvroute_admin cluster (the Wasm ABI cannot read runtime).");
    let _ = writeln!(w, "layered_runtime:");
    let _ = writeln!(w, "  layers:");
    let _ = writeln!(w, "  - name: static");
    let _ = writeln!(w, "    static_layer: {{}}");
    let _ = writeln!(w, "  - name: admin");
    let _ = writeln!(w, "    admin_layer: {{}}");
    let _ = writeln!(w, "# kvroute's stat names carry .policy.X / .endpoint.X / .reason.X / .op.X; these make them labels.");
    let _ = writeln!(w, "stats_config:");
    let _ = writeln!(w, "  stats_tags:");
    for (tag, regex) in STATS_TAGS {
        let _ = writeln!(w, "  - tag_name: {tag}");
        let _ = writeln!(w, "    regex: {}", json_str(regex));
    }
    if spec.state_service && spec.native_module.is_none() && spec.ext_proc.is_none() {
        let _ = writeln!(w, "bootstrap_extensions:");
        let _ = writeln!(w, "# The state singleton: owns the prefix directory, polls runtime values, publishes the state.");
        let _ = writeln!(w, "- name: envoy.bootstrap.wasm");
        let _ = writeln!(w, "  typed_config:");
        let _ = writeln!(
            w,
            "    \"@type\": type.googleapis.com/envoy.extensions.wasm.v3.WasmService"
        );
        let _ = writeln!(w, "    singleton: true");
        let _ = writeln!(w, "    config:");
        plugin(w, "      ", "kvroute_state", &spec.wasm_path, &filter_json);
    }
    let _ = writeln!(w, "static_resources:");
    let _ = writeln!(w, "  listeners:");
    let _ = writeln!(w, "  - name: kvroute_listener");
    let _ = writeln!(w, "    address:");
    let _ = writeln!(
        w,
        "      socket_address: {{ address: {}, port_value: {} }}",
        spec.listen_address, spec.listen_port
    );
    let _ = writeln!(w, "    # Above max_body_bytes, so the filter (not Envoy's 413) decides what a large body gets.");
    let _ = writeln!(w, "    per_connection_buffer_limit_bytes: {buffer_limit}");
    let _ = writeln!(w, "    filter_chains:");
    let _ = writeln!(w, "    - filters:");
    let _ = writeln!(
        w,
        "      - name: envoy.filters.network.http_connection_manager"
    );
    let _ = writeln!(w, "        typed_config:");
    let _ = writeln!(w, "          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager");
    let _ = writeln!(w, "          stat_prefix: kvroute");
    let _ = writeln!(w, "          route_config:");
    let _ = writeln!(w, "            name: kvroute_routes");
    let _ = writeln!(w, "            virtual_hosts:");
    let _ = writeln!(w, "            - name: engines");
    let _ = writeln!(w, "              domains: [\"*\"]");
    let _ = writeln!(w, "              routes:");
    let host_header = &spec.filter.host_header;
    let _ = writeln!(w, "              # The filter's choice by host: the chosen engine, then a fallback one, for the override_host");
    let _ = writeln!(w, "              # policy of kvroute_all_engines. A connection refused or reset before any response byte is");
    let _ = writeln!(w, "              # retried once, on the next host named (the filter strips a client-set header).");
    let _ = writeln!(w, "              - match:");
    let _ = writeln!(w, "                  prefix: \"/\"");
    let _ = writeln!(w, "                  headers:");
    let _ = writeln!(w, "                  - name: {host_header}");
    let _ = writeln!(w, "                    present_match: true");
    let _ = writeln!(w, "                route:");
    let _ = writeln!(w, "                  cluster: kvroute_all_engines");
    let _ = writeln!(w, "                  timeout: 0s");
    let _ = writeln!(w, "                  retry_policy:");
    let _ = writeln!(
        w,
        "                    retry_on: connect-failure,refused-stream,reset"
    );
    let _ = writeln!(w, "                    num_retries: 1");
    let _ = writeln!(
        w,
        "                    retry_back_off: {{ base_interval: 0.001s, max_interval: 0.005s }}"
    );
    let _ = writeln!(w, "                    retry_host_predicate:");
    let _ = writeln!(
        w,
        "                    - name: envoy.retry_host_predicates.previous_hosts"
    );
    let _ = writeln!(w, "                      typed_config:");
    let _ = writeln!(w, "                        \"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate");
    let _ = writeln!(
        w,
        "                    host_selection_retry_max_attempts: 3"
    );
    let _ = writeln!(w, "              # The filter's choice by cluster (endpoints without an address). Only engine clusters match, so a");
    let _ = writeln!(
        w,
        "              # client-set header can never reach another cluster."
    );
    let _ = writeln!(w, "              - match:");
    let _ = writeln!(w, "                  prefix: \"/\"");
    let _ = writeln!(w, "                  headers:");
    let _ = writeln!(w, "                  - name: {header}");
    let _ = writeln!(
        w,
        "                    string_match: {{ safe_regex: {{ regex: {} }} }}",
        json_str(&format!("^({})$", names.join("|")))
    );
    let _ = writeln!(
        w,
        "                route: {{ cluster_header: {header}, timeout: 0s }}"
    );
    let _ = writeln!(w, "              # No header (other paths, or the filter bypassed): all engines, least request.");
    let _ = writeln!(w, "              - match: {{ prefix: \"/\" }}");
    let _ = writeln!(
        w,
        "                route: {{ cluster: kvroute_all_engines, timeout: 0s }}"
    );
    let _ = writeln!(w, "          http_filters:");
    if let (true, Some(m)) = (spec.with_filter, &spec.native_module) {
        let _ = writeln!(w, "          - name: envoy.filters.http.dynamic_modules");
        let _ = writeln!(w, "            typed_config:");
        let _ = writeln!(w, "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter");
        let _ = writeln!(w, "              dynamic_module_config:");
        // The Wasm filter's stat namespace, so both builds' stats have the same names in
        // `/stats` and the same tags (STATS_TAGS).
        let _ = writeln!(w, "                metrics_namespace: wasmcustom");
        let _ = writeln!(
            w,
            "                module: {{ local: {{ filename: {} }} }}",
            json_str(&m.path)
        );
        let _ = writeln!(w, "              filter_name: {}", json_str(&m.filter_name));
        let _ = writeln!(w, "              filter_config:");
        let _ = writeln!(
            w,
            "                \"@type\": type.googleapis.com/google.protobuf.StringValue"
        );
        let _ = writeln!(w, "                value: {}", json_str(&filter_json));
    } else if let (true, Some(_)) = (spec.with_filter, &spec.ext_proc) {
        let _ = writeln!(
            w,
            "          # kvroute's decision in an external gRPC processor (kvroute-extproc)."
        );
        let _ = writeln!(w, "          - name: envoy.filters.http.ext_proc");
        let _ = writeln!(w, "            typed_config:");
        let _ = writeln!(w, "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor");
        let _ = writeln!(w, "              grpc_service:");
        let _ = writeln!(
            w,
            "                envoy_grpc: {{ cluster_name: {EXT_PROC_CLUSTER} }}"
        );
        let _ = writeln!(w, "                timeout: 1s");
        let _ = writeln!(
            w,
            "              # A processor that is down lets requests through (the fallback route)."
        );
        let _ = writeln!(w, "              failure_mode_allow: true");
        let _ = writeln!(w, "              processing_mode:");
        let _ = writeln!(w, "                request_header_mode: SEND");
        let _ = writeln!(w, "                request_body_mode: BUFFERED");
        let _ = writeln!(w, "                response_header_mode: SKIP");
        let _ = writeln!(w, "                response_body_mode: NONE");
        let _ = writeln!(w, "                request_trailer_mode: SKIP");
        let _ = writeln!(w, "                response_trailer_mode: SKIP");
    } else if let (true, Some(path)) = (spec.with_filter, &spec.ecds_path) {
        let dir = std::path::Path::new(path)
            .parent()
            .map_or_else(|| ".".to_string(), |d| d.display().to_string());
        let _ = writeln!(w, "          # The filter's configuration comes by ECDS from a watched file (render_ecds writes it).");
        let _ = writeln!(w, "          - name: kvroute");
        let _ = writeln!(w, "            config_discovery:");
        let _ = writeln!(w, "              config_source:");
        let _ = writeln!(w, "                path_config_source:");
        let _ = writeln!(w, "                  path: {}", json_str(path));
        let _ = writeln!(
            w,
            "                  watched_directory: {{ path: {} }}",
            json_str(&dir)
        );
        let _ = writeln!(w, "              type_urls: [\"{WASM_FILTER_TYPE}\"]");
    } else if spec.with_filter {
        let _ = writeln!(w, "          - name: envoy.filters.http.wasm");
        let _ = writeln!(w, "            typed_config:");
        wasm_filter(w, "              ", &spec.wasm_path, &filter_json);
    }
    let _ = writeln!(w, "          - name: envoy.filters.http.router");
    let _ = writeln!(w, "            typed_config:");
    let _ = writeln!(w, "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router");
    let _ = writeln!(w, "  clusters:");
    for e in &spec.engines {
        cluster(w, &e.name, "ROUND_ROBIN", &[e]);
    }
    let all: Vec<&Engine> = spec.engines.iter().collect();
    all_engines_cluster(w, host_header, &all);
    let admin = Engine {
        name: "admin".into(),
        host: "127.0.0.1".into(),
        port: spec.admin_port,
    };
    cluster(w, &spec.filter.admin_cluster, "ROUND_ROBIN", &[&admin]);
    if let (true, Some(sc)) = (spec.with_filter, &spec.sidecar) {
        cluster(w, SIDECAR_CLUSTER, "ROUND_ROBIN", &[sc]);
    }
    if let (true, Some(p)) = (spec.with_filter, &spec.ext_proc) {
        cluster(w, EXT_PROC_CLUSTER, "ROUND_ROBIN", &[p]);
        let _ = writeln!(w, "    typed_extension_protocol_options:");
        let _ = writeln!(
            w,
            "      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:"
        );
        let _ = writeln!(w, "        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions");
        let _ = writeln!(
            w,
            "        explicit_http_config: {{ http2_protocol_options: {{}} }}"
        );
    }
    y
}

/// Cluster name of the ext_proc processor.
pub const EXT_PROC_CLUSTER: &str = "kvroute_extproc";

const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// The Wasm HTTP filter's typed config (inline, or as an ECDS resource).
fn wasm_filter(w: &mut String, ind: &str, wasm: &str, filter_json: &str) {
    let _ = writeln!(w, "{ind}\"@type\": {WASM_FILTER_TYPE}");
    let _ = writeln!(w, "{ind}config:");
    let pind = format!("{ind}  ");
    plugin(w, &pind, "kvroute", wasm, filter_json);
    let _ = writeln!(
        w,
        "{pind}# Required to pause on request headers until the body is read."
    );
    let _ = writeln!(w, "{pind}allow_on_headers_stop_iteration: true");
    let _ = writeln!(
        w,
        "{pind}# A crashed VM is replaced; requests meanwhile take the fallback route."
    );
    let _ = writeln!(w, "{pind}failure_policy: FAIL_RELOAD");
}

/// The ECDS resource file for `spec.ecds_path`: the Wasm filter with `filter` as its
/// configuration JSON (the state singleton keeps the bootstrap's).
pub fn render_ecds(spec: &EnvoySpec, filter_json: &str) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "resources:");
    let _ = writeln!(
        w,
        "- \"@type\": type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
    );
    let _ = writeln!(w, "  name: kvroute");
    let _ = writeln!(w, "  typed_config:");
    wasm_filter(&mut w, "    ", &spec.wasm_path, filter_json);
    w
}

fn plugin(w: &mut String, ind: &str, root_id: &str, wasm: &str, config_json: &str) {
    let _ = writeln!(w, "{ind}name: {root_id}");
    let _ = writeln!(w, "{ind}root_id: {root_id}");
    let _ = writeln!(w, "{ind}vm_config:");
    let _ = writeln!(w, "{ind}  vm_id: kvroute");
    let _ = writeln!(w, "{ind}  runtime: envoy.wasm.runtime.v8");
    let _ = writeln!(
        w,
        "{ind}  code: {{ local: {{ filename: {} }} }}",
        json_str(wasm)
    );
    let _ = writeln!(w, "{ind}configuration:");
    let _ = writeln!(
        w,
        "{ind}  \"@type\": type.googleapis.com/google.protobuf.StringValue"
    );
    let _ = writeln!(w, "{ind}  value: {}", json_str(config_json));
}

/// The cluster of all engines: the host named in `host_header` (Envoy's `override_host` policy),
/// else least request.
fn all_engines_cluster(w: &mut String, host_header: &str, engines: &[&Engine]) {
    let name = "kvroute_all_engines";
    let _ = writeln!(w, "  - name: {name}");
    let _ = writeln!(w, "    type: STATIC");
    let _ = writeln!(w, "    connect_timeout: 1s");
    let _ = writeln!(w, "    load_balancing_policy:");
    let _ = writeln!(w, "      policies:");
    let _ = writeln!(w, "      - typed_extension_config:");
    let _ = writeln!(
        w,
        "          name: envoy.load_balancing_policies.override_host"
    );
    let _ = writeln!(w, "          typed_config:");
    let _ = writeln!(w, "            \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost");
    let _ = writeln!(w, "            override_host_sources:");
    let _ = writeln!(w, "            - header: {host_header}");
    let _ = writeln!(w, "            fallback_policy:");
    let _ = writeln!(w, "              policies:");
    let _ = writeln!(w, "              - typed_extension_config:");
    let _ = writeln!(
        w,
        "                  name: envoy.load_balancing_policies.least_request"
    );
    let _ = writeln!(w, "                  typed_config:");
    let _ = writeln!(w, "                    \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest");
    let _ = writeln!(w, "    load_assignment:");
    let _ = writeln!(w, "      cluster_name: {name}");
    let _ = writeln!(w, "      endpoints:");
    let _ = writeln!(w, "      - lb_endpoints:");
    for e in engines {
        let _ = writeln!(w, "        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}", e.host, e.port);
    }
}

fn cluster(w: &mut String, name: &str, lb: &str, engines: &[&Engine]) {
    let _ = writeln!(w, "  - name: {name}");
    let _ = writeln!(w, "    type: STATIC");
    let _ = writeln!(w, "    connect_timeout: 1s");
    let _ = writeln!(w, "    lb_policy: {lb}");
    let _ = writeln!(w, "    load_assignment:");
    let _ = writeln!(w, "      cluster_name: {name}");
    let _ = writeln!(w, "      endpoints:");
    let _ = writeln!(w, "      - lb_endpoints:");
    for e in engines {
        let _ = writeln!(w, "        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}", e.host, e.port);
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    /// The shipped example is exactly the generator's default output.
    #[test]
    fn shipped_example_is_generated() {
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../envoy/envoy.yaml"
        ))
        .unwrap();
        assert_eq!(
            shipped,
            render(&EnvoySpec::example()),
            "run `just envoy-config` to regenerate envoy/envoy.yaml"
        );
    }

    /// The shipped native example is the generator's output with the native module.
    #[test]
    fn shipped_native_example_is_generated() {
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../envoy/envoy-native.yaml"
        ))
        .unwrap();
        let mut spec = EnvoySpec::example();
        spec.native_module = Some(NativeModule {
            path: "target/release/libkvroute_native.so".into(),
            filter_name: "kvroute".into(),
        });
        assert_eq!(
            shipped,
            render(&spec),
            "run `just envoy-config` to regenerate envoy/envoy-native.yaml"
        );
        assert!(shipped.contains("metrics_namespace: wasmcustom"));
        assert!(!shipped.contains("envoy.bootstrap.wasm"));
    }

    /// The hand-written "add to an existing config" example carries the same stat tags and the
    /// same filter settings that matter (pausing on headers, fail reload) as the generator.
    #[test]
    fn add_to_existing_example_matches_the_generator() {
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../envoy/add-to-existing.yaml"
        ))
        .unwrap();
        for (tag, regex) in STATS_TAGS {
            assert!(example.contains(&format!("tag_name: {tag}")), "{tag}");
            assert!(example.contains(&json_str(regex)), "{regex}");
        }
        for needle in [
            "allow_on_headers_stop_iteration: true",
            "failure_policy: FAIL_RELOAD",
            "root_id: kvroute_state",
            "singleton: true",
        ] {
            assert!(example.contains(needle), "{needle}");
        }
    }

    #[test]
    fn embedded_filter_config_is_valid() {
        let y = render(&EnvoySpec::example());
        let line = y
            .lines()
            .find(|l| l.trim_start().starts_with("value: "))
            .unwrap();
        let json: String =
            serde_json::from_str(line.trim_start().trim_start_matches("value: ")).unwrap();
        let c = FilterConfig::from_json(json.as_bytes()).unwrap();
        assert_eq!(c.endpoints.len(), 2);
    }
}

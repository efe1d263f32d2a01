//! Prints an Envoy bootstrap for kvroute in front of the given engines.
//!
//! `kvroute-envoy-config` with no flags prints the shipped example (envoy/envoy.yaml);
//! `--native target/release/libkvroute_native.so` the same with the native module in the `.wasm`
//! filter's place (envoy/envoy-native.yaml).

use clap::Parser;
use kvroute_harness::envoy_config::{render, Engine, EnvoySpec, NativeModule};

#[derive(Parser, Debug)]
#[command(about = "Render an Envoy bootstrap with the kvroute filter")]
struct Args {
    /// An engine as NAME=HOST:PORT (repeat; default: the two-engine example).
    #[arg(long = "engine")]
    engines: Vec<String>,
    /// Listener port.
    #[arg(long, default_value_t = 10000)]
    listen_port: u16,
    /// Admin port.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// Path of the filter's .wasm file.
    #[arg(
        long,
        default_value = "target/wasm32-wasip1/release/kvroute_filter.wasm"
    )]
    wasm: String,
    /// Path of the native module (`libkvroute_native.so`): load it instead of the `.wasm`.
    #[arg(long)]
    native: Option<String>,
    /// Default policy (runtime key kvroute.policy overrides it).
    #[arg(long)]
    policy: Option<String>,
    /// The sidecar as HOST:PORT ("none" for no sidecar).
    #[arg(long, default_value = "127.0.0.1:9100")]
    sidecar: String,
    /// Share decisions with the fleet's other Envoy replicas through the sidecar's Redis log,
    /// exchanging every this many ms (docs/deployment.md; needs a sidecar).
    #[arg(long)]
    fleet_sync_ms: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut spec = if args.engines.is_empty() {
        EnvoySpec::example()
    } else {
        let engines = args
            .engines
            .iter()
            .map(|e| {
                let (name, addr) = e
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--engine {e}: want NAME=HOST:PORT"))?;
                let (host, port) = addr
                    .rsplit_once(':')
                    .ok_or_else(|| anyhow::anyhow!("--engine {e}: want NAME=HOST:PORT"))?;
                Ok(Engine {
                    name: name.into(),
                    host: host.into(),
                    port: port.parse()?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        EnvoySpec::new(engines, args.wasm.clone())
    };
    spec.sidecar = None;
    spec.filter.sidecar = None;
    if args.sidecar != "none" {
        let (host, port) = args
            .sidecar
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("--sidecar: want HOST:PORT or none"))?;
        spec.set_sidecar(Engine {
            name: "sidecar".into(),
            host: host.into(),
            port: port.parse()?,
        });
    }
    if let Some(ms) = args.fleet_sync_ms {
        anyhow::ensure!(spec.sidecar.is_some(), "--fleet-sync-ms needs a sidecar");
        spec.share_fleet(ms);
    }
    if let Some(path) = args.native {
        spec.native_module = Some(NativeModule {
            path,
            filter_name: "kvroute".into(),
        });
    }
    spec.listen_port = args.listen_port;
    spec.admin_port = args.admin_port;
    spec.wasm_path = args.wasm;
    if let Some(p) = args.policy {
        spec.filter.defaults.policy = p
            .parse()
            .map_err(|()| anyhow::anyhow!("unknown policy {p}"))?;
    }
    if let Err(errors) = spec.filter.validate() {
        for e in errors {
            eprintln!("invalid: {e}");
        }
        anyhow::bail!("invalid configuration");
    }
    print!("{}", render(&spec));
    Ok(())
}

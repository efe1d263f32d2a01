//! `kvroute-extproc --config FILE`: kvroute's decision behind Envoy's `ext_proc` filter, the
//! architecture of the Gateway API Inference Extension and llm-d (an endpoint picker as a gRPC
//! service beside Envoy). Envoy sends each request's headers, then its whole body (BUFFERED mode);
//! the processor parses the body, decides with the same core as the filter (`LocalRouter`: one
//! directory for every stream) and answers with the routing header and a route-cache clear. Its
//! in-flight count of a request ends when Envoy closes that request's stream.
//!
//! It exists so the Envoy bench can measure what this architecture costs against the Wasm filter,
//! on the same decision. Prints `listening on ADDR` once it serves.

use std::pin::Pin;
use std::sync::Arc;

use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as In, processing_response::Response as Out, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ProcessingRequest,
    ProcessingResponse, TrailersResponse,
};
use kvroute_core::local::LocalRouter;
use kvroute_core::request::ApiKind;
use kvroute_core::FilterConfig;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser, Debug)]
#[command(about = "kvroute's routing decision as an Envoy ext_proc gRPC processor")]
struct Args {
    /// The filter configuration JSON (the same schema as the Wasm filter's plugin configuration).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

#[derive(Debug)]
struct Processor {
    router: Arc<LocalRouter>,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

/// A header's value from Envoy's map (`raw_value` in current Envoys, `value` in older ones).
fn header<'a>(h: &'a HttpHeaders, name: &str) -> Option<&'a [u8]> {
    let map = h.headers.as_ref()?;
    map.headers.iter().find(|v| v.key == name).map(|v| {
        if v.raw_value.is_empty() {
            v.value.as_bytes()
        } else {
            v.raw_value.as_slice()
        }
    })
}

fn api_kind(path: &[u8]) -> Option<ApiKind> {
    let path = path.split(|b| *b == b'?').next().unwrap_or_default();
    match path {
        b"/v1/chat/completions" => Some(ApiKind::Chat),
        b"/v1/completions" => Some(ApiKind::Completions),
        _ => None,
    }
}

fn reply(r: Out) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..ProcessingResponse::default()
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = Outbound;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let router = self.router.clone();
        tokio::spawn(async move {
            let config = &router.config;
            let (mut kind, mut session, mut counted) = (None, None, None);
            while let Ok(Some(msg)) = inbound.message().await {
                let out = match msg.request {
                    Some(In::RequestHeaders(h)) => {
                        kind = header(&h, ":path").and_then(api_kind);
                        session = header(&h, &config.session_header)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .map(str::to_string);
                        Out::RequestHeaders(HeadersResponse::default())
                    }
                    Some(In::RequestBody(b)) => {
                        let mut common = CommonResponse::default();
                        let decided =
                            kind.and_then(|k| router.route(k, &b.body, session.as_deref()));
                        if let Some((d, c)) = decided {
                            if let Some(e) = config.endpoints.get(d.endpoint) {
                                common.header_mutation = Some(HeaderMutation {
                                    set_headers: vec![HeaderValueOption {
                                        header: Some(HeaderValue {
                                            key: config.route_header.clone(),
                                            raw_value: e.cluster().as_bytes().to_vec(),
                                            ..HeaderValue::default()
                                        }),
                                        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd
                                            as i32,
                                        ..HeaderValueOption::default()
                                    }],
                                    ..HeaderMutation::default()
                                });
                                common.clear_route_cache = true;
                            }
                            counted = Some(c);
                        }
                        Out::RequestBody(BodyResponse {
                            response: Some(common),
                        })
                    }
                    Some(In::ResponseHeaders(_)) => {
                        Out::ResponseHeaders(HeadersResponse::default())
                    }
                    Some(In::ResponseBody(_)) => Out::ResponseBody(BodyResponse::default()),
                    Some(In::RequestTrailers(_)) => {
                        Out::RequestTrailers(TrailersResponse::default())
                    }
                    Some(In::ResponseTrailers(_)) => {
                        Out::ResponseTrailers(TrailersResponse::default())
                    }
                    None => continue,
                };
                if tx.send(Ok(reply(out))).await.is_err() {
                    break;
                }
            }
            if let Some(c) = counted {
                router.complete(c);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let json = std::fs::read(&args.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let config = FilterConfig::from_json(&json)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    let processor = Processor {
        router: Arc::new(LocalRouter::new(config)),
    };
    // No Nagle delay on the replies (gRPC servers set TCP_NODELAY; without it each small reply
    // waits on the peer's delayed ACK, about 40 ms).
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    tonic::transport::Server::builder()
        .add_service(ExternalProcessorServer::new(processor))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

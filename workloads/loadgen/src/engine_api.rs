//! What the harness reads from an engine (vLLM or the emulator) over its own HTTP API.

/// The model the engine at `base_url` serves, as a client reads it from `/v1/models`.
pub async fn served_model(client: &reqwest::Client, base_url: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = client
        .get(format!("{base_url}/v1/models"))
        .send()
        .await?
        .json()
        .await?;
    v.pointer("/data/0/id")
        .and_then(|m| m.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{base_url}/v1/models names no model"))
}

/// The engine's Prometheus page (`/metrics`).
pub async fn metrics_page(client: &reqwest::Client, base_url: &str) -> anyhow::Result<String> {
    Ok(client
        .get(format!("{base_url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

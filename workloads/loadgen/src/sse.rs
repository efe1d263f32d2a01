//! The JSON events of an OpenAI-style streaming response (`text/event-stream`), as they arrive.
//!
//! The SSE grammar (events split across reads, multi-line `data:` fields, CRLF line ends, comments,
//! a UTF-8 character split between two reads) is `eventsource-stream`'s. This adds what every
//! client here does with it: each event's data as JSON (`[DONE]` and anything else that is not JSON
//! skipped), the text a chunk carries, and its usage.

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::Value;

/// Each event of `response`'s body whose data is JSON, in order. An error (the connection failed
/// mid-stream, or the body broke the SSE grammar) comes as `Err` with its message; the caller
/// decides whether to read on.
pub fn json_events(response: reqwest::Response) -> impl Stream<Item = Result<Value, String>> {
    response
        .bytes_stream()
        .eventsource()
        .filter_map(|event| async move {
            match event {
                Ok(e) => serde_json::from_str::<Value>(&e.data).ok().map(Ok),
                Err(e) => Some(Err(e.to_string())),
            }
        })
}

/// The text a streamed chunk carries: a chat completion's delta, or a completion's text.
pub fn chunk_text(v: &Value) -> Option<&str> {
    v.pointer("/choices/0/delta/content")
        .or_else(|| v.pointer("/choices/0/text"))
        .and_then(Value::as_str)
}

/// The usage a chunk reports (the last one, with `stream_options.include_usage`): prompt,
/// completion and cached prompt tokens.
pub fn chunk_usage(v: &Value) -> Option<(Option<u64>, Option<u64>, Option<u64>)> {
    let u = v.get("usage").filter(|u| !u.is_null())?;
    Some((
        u.get("prompt_tokens").and_then(Value::as_u64),
        u.get("completion_tokens").and_then(Value::as_u64),
        u.pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64),
    ))
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
    use tokio::io::AsyncWriteExt;

    /// A server that writes `parts` as one chunked SSE response, flushing between them.
    async fn serve(parts: Vec<Vec<u8>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut req).await;
            s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
            for p in parts {
                s.write_all(format!("{:x}\r\n", p.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(&p).await.unwrap();
                s.write_all(b"\r\n").await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            s.write_all(b"0\r\n\r\n").await.unwrap();
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn events_split_anywhere_arrive_whole_and_in_order() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"h\u{e9}\"}}]}\r\n\r\n\
                    : a comment\n\n\
                    data: {\"choices\":[{\"text\":\"llo\"}],\n\
                    data: \"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\
                    \"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n\
                    data: [DONE]\n\n";
        // Cut inside the two-byte UTF-8 character and inside an event.
        let bytes = body.as_bytes();
        let cut = body.find('\u{e9}').unwrap() + 1;
        let url = serve(vec![
            bytes[..cut].to_vec(),
            bytes[cut..cut + 20].to_vec(),
            bytes[cut + 20..].to_vec(),
        ])
        .await;
        let r = reqwest::get(&url).await.unwrap();
        let events: Vec<Value> = json_events(r).map(|e| e.unwrap()).collect::<Vec<_>>().await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(chunk_text(&events[0]), Some("h\u{e9}"));
        assert_eq!(chunk_text(&events[1]), Some("llo"));
        assert_eq!(chunk_usage(&events[1]), Some((Some(7), Some(2), Some(4))));
        assert_eq!(chunk_usage(&events[0]), None);
    }
}

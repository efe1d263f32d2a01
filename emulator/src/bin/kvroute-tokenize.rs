//! Prints the emulator's token counts for chats, one JSON object per input line:
//! in `{"messages": [{"role", "content"}...]}`, out `{"prompt_tokens": N, "content_tokens": [n...]}`
//! (`prompt_tokens` with the Llama 3 chat template and generation prompt; `content_tokens` per
//! message text). Used by scripts/tokenizer_error.py to compare with a real tokenizer.

use std::io::{BufRead, Write};

use kvroute_emulator::tokenizer::{count, encode_chat, ChatMessage};

fn main() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout());
    for line in stdin.lock().lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let msgs: Vec<(String, String)> = v
            .get("messages")
            .and_then(|m| m.as_array())
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or("user").to_string(),
                            m["content"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let chat: Vec<ChatMessage<'_>> = msgs
            .iter()
            .map(|(r, c)| ChatMessage {
                role: r,
                content: c,
            })
            .collect();
        let content: Vec<usize> = msgs.iter().map(|(_, c)| count(c)).collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"prompt_tokens": encode_chat(&chat).len(), "content_tokens": content})
        )?;
    }
    Ok(())
}

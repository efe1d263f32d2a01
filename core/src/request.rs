//! Borrowed parsing of OpenAI `/v1/chat/completions` and `/v1/completions` request bodies.
//!
//! Strings borrow from the body wherever JSON escaping allows, `tools` and `tool_calls` stay raw JSON
//! slices, and unknown fields are skipped: a 100 KB prompt is never copied. Every failure has a
//! reason ([`ParseError::reason`]) that the filter counts.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Which OpenAI endpoint a body was posted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
}

impl ApiKind {
    /// The API a request path (query string ignored) belongs to, if it is one the router handles.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        match path {
            "/v1/chat/completions" => Some(Self::Chat),
            "/v1/completions" => Some(Self::Completions),
            _ => None,
        }
    }
}

/// Why a body could not be used for prefix routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The body was empty.
    #[error("empty body")]
    EmptyBody,
    /// The body is not valid UTF-8.
    #[error("body is not valid UTF-8")]
    InvalidUtf8,
    /// The body is not JSON (syntax error or truncated).
    #[error("body is not JSON")]
    NotJson,
    /// JSON, but a known field has the wrong type (or the top level is not an object).
    #[error("a field has the wrong type")]
    WrongType,
    /// JSON object without `messages` (chat) or `prompt` (completions), or with an empty one.
    #[error("no messages or prompt")]
    NoPrompt,
}

impl ParseError {
    /// Every reason, for defining one counter each.
    pub const ALL: [ParseError; 5] = [
        Self::EmptyBody,
        Self::InvalidUtf8,
        Self::NotJson,
        Self::WrongType,
        Self::NoPrompt,
    ];

    /// Stable name used in stats.
    pub fn reason(self) -> &'static str {
        match self {
            Self::EmptyBody => "empty_body",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::NotJson => "not_json",
            Self::WrongType => "wrong_type",
            Self::NoPrompt => "no_prompt",
        }
    }
}

/// A parsed request, borrowing from the body.
#[derive(Debug)]
pub struct ParsedRequest<'a> {
    /// The `model` field ("" when absent).
    pub model: Cow<'a, str>,
    /// The OpenAI `user` field.
    pub user: Option<Cow<'a, str>>,
    /// Raw JSON of `tools` (chat only).
    pub tools: Option<&'a RawValue>,
    /// The prompt: chat messages or a completion prompt.
    pub prompt: Prompt<'a>,
    /// Whether the engine's response will carry `usage` (and so `cached_tokens`, where the engine
    /// reports it): a response that is not streamed always does; a stream only with
    /// `stream_options.include_usage` true.
    pub usage_expected: bool,
    /// Whether the response is streamed (`"stream": true`): an engine answers such a request's
    /// headers at once, before its prefill, as vLLM's server does.
    pub streamed: bool,
}

/// The prompt of a request.
#[derive(Debug)]
pub enum Prompt<'a> {
    /// Chat messages, in order.
    Chat(Vec<Message<'a>>),
    /// A completion prompt. For a batch (array of prompts) only the first one is kept: the batch
    /// goes to one endpoint, and its first prompt is what decides the prefix match.
    Text(PromptText<'a>),
}

/// A completion prompt.
#[derive(Debug)]
pub enum PromptText<'a> {
    /// Text.
    Text(Cow<'a, str>),
    /// Token ids, kept as their raw JSON array.
    Tokens(&'a RawValue),
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message<'a> {
    /// `system`, `developer`, `user`, `assistant`, `tool`, ...
    #[serde(borrow)]
    pub role: Cow<'a, str>,
    /// String content, an array of parts, or null.
    #[serde(default, borrow)]
    pub content: Content<'a>,
    /// Optional participant name.
    #[serde(default, borrow)]
    pub name: Option<Cow<'a, str>>,
    /// Raw JSON of assistant tool calls.
    #[serde(default, borrow)]
    pub tool_calls: Option<&'a RawValue>,
    /// Id of the tool call a `tool` message answers.
    #[serde(default, borrow)]
    pub tool_call_id: Option<Cow<'a, str>>,
}

/// Message content.
#[derive(Debug, Default)]
pub enum Content<'a> {
    /// Absent or null (assistant messages carrying only tool calls).
    #[default]
    None,
    /// Plain string content.
    Text(Cow<'a, str>),
    /// Array of content parts.
    Parts(Vec<Part<'a>>),
}

/// One content part.
#[derive(Debug)]
pub enum Part<'a> {
    /// `{"type":"text","text":...}`
    Text(Cow<'a, str>),
    /// Any other part (image, audio, file), kept as raw JSON: its bytes identify it.
    Other(&'a RawValue),
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default, borrow)]
    prompt: Option<RawPrompt<'a>>,
    /// Kept raw: a value of the wrong type here is the engine's to refuse, not a reason to route
    /// without the prompt.
    #[serde(default, borrow)]
    stream: Option<&'a RawValue>,
    #[serde(default, borrow)]
    stream_options: Option<&'a RawValue>,
}

/// `stream_options`, read only for `include_usage`.
#[derive(Deserialize)]
struct StreamOptions<'a> {
    #[serde(default, borrow)]
    include_usage: Option<&'a RawValue>,
}

/// Whether a response carries `usage`: always unless it is `streamed` without
/// `"stream_options": {"include_usage": true}`.
fn usage_expected(streamed: bool, options: Option<&RawValue>) -> bool {
    if !streamed {
        return true;
    }
    options
        .and_then(|o| serde_json::from_str::<StreamOptions<'_>>(o.get()).ok())
        .and_then(|o| o.include_usage)
        .is_some_and(|u| u.get() == "true")
}

/// Parse a request body posted to `kind`'s path.
pub fn parse_request(kind: ApiKind, body: &[u8]) -> Result<ParsedRequest<'_>, ParseError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ParseError::EmptyBody);
    }
    // The whole body's UTF-8 is checked in one pass first (the ASCII fast path of `from_utf8`), so
    // the parser reads a `str` and does not check each string again as it borrows it: about twice
    // as fast a parse natively as `from_slice` on a chat body. Invalid UTF-8 anywhere in the body,
    // even in a field the router ignores, is counted as such (vLLM refuses that body too).
    let text = std::str::from_utf8(body).map_err(|_| ParseError::InvalidUtf8)?;
    let raw: RawRequest<'_> = serde_json::from_str(text).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            ParseError::WrongType
        } else {
            ParseError::NotJson
        }
    })?;
    let prompt = match kind {
        ApiKind::Chat => match raw.messages {
            Some(m) if !m.is_empty() => Prompt::Chat(m),
            _ => return Err(ParseError::NoPrompt),
        },
        ApiKind::Completions => match raw.prompt {
            Some(RawPrompt(Some(p))) => Prompt::Text(p),
            _ => return Err(ParseError::NoPrompt),
        },
    };
    let streamed = raw.stream.is_some_and(|s| s.get() == "true");
    Ok(ParsedRequest {
        model: raw.model.unwrap_or(Cow::Borrowed("")),
        user: raw.user,
        tools: if kind == ApiKind::Chat {
            raw.tools
        } else {
            None
        },
        prompt,
        usage_expected: usage_expected(streamed, raw.stream_options),
        streamed,
    })
}

impl<'a> Content<'a> {
    /// Calls `f` with each piece of text the content holds, in order.
    pub fn for_each_text(&self, mut f: impl FnMut(&str)) {
        match self {
            Content::None => {}
            Content::Text(t) => f(t),
            Content::Parts(parts) => {
                for p in parts {
                    if let Part::Text(t) = p {
                        f(t);
                    }
                }
            }
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of content parts, or null")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::None)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::new();
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    parts.push(part_from_raw(raw).map_err(de::Error::custom)?);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct RawPart<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

fn part_from_raw(raw: &RawValue) -> Result<Part<'_>, serde_json::Error> {
    let p: RawPart<'_> = serde_json::from_str(raw.get())?;
    Ok(match (p.kind.as_ref(), p.text) {
        ("text" | "input_text", Some(t)) => Part::Text(t),
        _ => Part::Other(raw),
    })
}

/// `prompt`: a string, an array of strings, an array of token ids, or an array of those arrays.
struct RawPrompt<'a>(Option<PromptText<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for RawPrompt<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: &'de RawValue = Deserialize::deserialize(d)?;
        let s = raw.get();
        match s.as_bytes().first() {
            Some(b'"') => {
                let t = json_str(s).map_err(de::Error::custom)?;
                Ok(RawPrompt(if t.is_empty() {
                    None
                } else {
                    Some(PromptText::Text(t))
                }))
            }
            Some(b'[') => {
                let mut items = serde_json::Deserializer::from_str(s);
                let first = FirstItem::deserialize(&mut items).map_err(de::Error::custom)?;
                Ok(RawPrompt(match first.0 {
                    None => None,
                    Some(item) => match item.get().as_bytes().first() {
                        Some(b'"') => {
                            let t = json_str(item.get()).map_err(de::Error::custom)?;
                            if t.is_empty() {
                                None
                            } else {
                                Some(PromptText::Text(t))
                            }
                        }
                        Some(b'[') => Some(PromptText::Tokens(item)),
                        Some(b'0'..=b'9') => Some(PromptText::Tokens(raw)),
                        _ => {
                            return Err(de::Error::custom(
                                "prompt items must be strings or token ids",
                            ))
                        }
                    },
                }))
            }
            Some(b'n') => Ok(RawPrompt(None)),
            _ => Err(de::Error::custom("prompt must be a string or an array")),
        }
    }
}

/// A JSON string literal, borrowed when it has no escapes.
fn json_str(s: &str) -> Result<Cow<'_, str>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    serde_json::from_str::<Borrowed<'_>>(s).map(|b| b.0)
}

/// First element of a JSON array, as raw JSON; the rest is validated and skipped.
struct FirstItem<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstItem<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FirstItem<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<&'de RawValue>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstItem(first))
            }
        }
        d.deserialize_seq(V)
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

    fn chat(body: &str) -> Result<ParsedRequest<'_>, ParseError> {
        parse_request(ApiKind::Chat, body.as_bytes())
    }

    #[test]
    fn paths() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions"),
            Some(ApiKind::Chat)
        );
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions?x=1"),
            Some(ApiKind::Chat)
        );
        assert_eq!(
            ApiKind::from_path("/v1/completions"),
            Some(ApiKind::Completions)
        );
        assert_eq!(ApiKind::from_path("/v1/models"), None);
        assert_eq!(ApiKind::from_path("/v1/chat/completionsx"), None);
    }

    #[test]
    fn string_and_parts_content_borrow() {
        let body = r#"{"model":"m","user":"u1","messages":[
            {"role":"system","content":"You are terse."},
            {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"http://x/a.png"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]}
        ],"temperature":0.2,"stream":true}"#;
        let r = chat(body).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.user.as_deref(), Some("u1"));
        let Prompt::Chat(m) = &r.prompt else { panic!() };
        assert_eq!(m.len(), 3);
        assert!(matches!(
            &m[0].content,
            Content::Text(Cow::Borrowed("You are terse."))
        ));
        let Content::Parts(p) = &m[1].content else {
            panic!()
        };
        assert!(matches!(&p[0], Part::Text(t) if t == "hi"));
        assert!(matches!(&p[1], Part::Other(_)));
        assert!(matches!(m[2].content, Content::None));
        assert!(m[2].tool_calls.is_some());
    }

    #[test]
    fn usage_is_expected_unless_a_stream_leaves_it_out() {
        let usage = |extra: &str| {
            chat(&format!(
                r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
            ))
            .unwrap()
            .usage_expected
        };
        assert!(usage(""));
        assert!(usage(r#","stream":false"#));
        assert!(!usage(r#","stream":true"#));
        assert!(!usage(r#","stream":true,"stream_options":{}"#));
        assert!(!usage(
            r#","stream":true,"stream_options":{"include_usage":false}"#
        ));
        assert!(!usage(r#","stream":true,"stream_options":null"#));
        assert!(usage(
            r#","stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}"#
        ));
        assert!(usage(
            r#","stream_options":{"include_usage":true},"stream":true"#
        ));
        // Wrong types are the engine's to refuse: the prompt is still routed on.
        assert!(!usage(r#","stream":true,"stream_options":"yes""#));
        assert!(usage(r#","stream":"yes""#));
    }

    #[test]
    fn only_stream_true_is_streamed() {
        let streamed = |extra: &str| {
            chat(&format!(
                r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
            ))
            .unwrap()
            .streamed
        };
        assert!(streamed(r#","stream":true"#));
        assert!(streamed(
            r#","stream" : true ,"stream_options":{"include_usage":true}"#
        ));
        for extra in [
            "",
            r#","stream":false"#,
            r#","stream":null"#,
            r#","stream":"true""#,
        ] {
            assert!(!streamed(extra), "{extra}");
        }
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let r = chat(r#"{"messages":[{"role":"user","content":"a\nb \u00e9"}]}"#).unwrap();
        let Prompt::Chat(m) = &r.prompt else { panic!() };
        assert!(matches!(&m[0].content, Content::Text(t) if t == "a\nb é"));
    }

    #[test]
    fn completions_prompt_forms() {
        let p = |b: &'static str| parse_request(ApiKind::Completions, b.as_bytes());
        assert!(matches!(
            p(r#"{"prompt":"abc"}"#).unwrap().prompt,
            Prompt::Text(PromptText::Text(Cow::Borrowed("abc")))
        ));
        assert!(
            matches!(p(r#"{"prompt":["abc","def"]}"#).unwrap().prompt, Prompt::Text(PromptText::Text(t)) if t == "abc")
        );
        assert!(
            matches!(p(r#"{"prompt":[1,2,3]}"#).unwrap().prompt, Prompt::Text(PromptText::Tokens(t)) if t.get() == "[1,2,3]")
        );
        assert!(
            matches!(p(r#"{"prompt":[[1,2],[3]]}"#).unwrap().prompt, Prompt::Text(PromptText::Tokens(t)) if t.get() == "[1,2]")
        );
        assert_eq!(p(r#"{"prompt":""}"#).unwrap_err(), ParseError::NoPrompt);
        assert_eq!(p(r#"{"prompt":[]}"#).unwrap_err(), ParseError::NoPrompt);
        assert_eq!(p(r#"{"prompt":5}"#).unwrap_err(), ParseError::WrongType);
        assert_eq!(p(r#"{"prompt":[{}]}"#).unwrap_err(), ParseError::WrongType);
        assert_eq!(
            p(r#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap_err(),
            ParseError::NoPrompt
        );
    }

    #[test]
    fn errors_by_reason() {
        assert_eq!(chat("").unwrap_err(), ParseError::EmptyBody);
        assert_eq!(chat("  \n").unwrap_err(), ParseError::EmptyBody);
        assert_eq!(
            parse_request(ApiKind::Chat, b"{\"messages\":\"\xff\"}").unwrap_err(),
            ParseError::InvalidUtf8
        );
        // In a field the router ignores, too (the body is checked whole before it is parsed).
        assert_eq!(
            parse_request(
                ApiKind::Chat,
                b"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"x\":\"\xff\"}"
            )
            .unwrap_err(),
            ParseError::InvalidUtf8
        );
        assert_eq!(chat("hello").unwrap_err(), ParseError::NotJson);
        assert_eq!(
            chat(r#"{"messages":[{"role":"user","content":"x"}"#).unwrap_err(),
            ParseError::NotJson
        );
        assert_eq!(chat("[1,2]").unwrap_err(), ParseError::WrongType);
        assert_eq!(
            chat(r#"{"messages":"hi"}"#).unwrap_err(),
            ParseError::WrongType
        );
        assert_eq!(
            chat(r#"{"messages":[{"role":5,"content":"x"}]}"#).unwrap_err(),
            ParseError::WrongType
        );
        assert_eq!(
            chat(r#"{"messages":[{"role":"user","content":7}]}"#).unwrap_err(),
            ParseError::WrongType
        );
        assert_eq!(
            chat(r#"{"model":1,"messages":[{"role":"user","content":"x"}]}"#).unwrap_err(),
            ParseError::WrongType
        );
        assert_eq!(
            chat(r#"{"messages":[]}"#).unwrap_err(),
            ParseError::NoPrompt
        );
        assert_eq!(chat(r#"{"model":"m"}"#).unwrap_err(), ParseError::NoPrompt);
    }
}

//! A user's history from the route API: `GET /history/<id>?stream=inbox|group&limit=N`.

use hyper::StatusCode;
use serde::{Deserialize, Deserializer};

use crate::error::ClientError;
use crate::route;

/// Which of a user's streams to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryStream {
    /// Their private messages, both directions.
    Inbox,
    /// The group stream (the messages this user may see).
    Group,
}

impl HistoryStream {
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryStream::Inbox => "inbox",
            HistoryStream::Group => "group",
        }
    }
}

/// One page of a stream, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct History {
    pub user_id: u64,
    pub stream: String,
    /// Newest first.
    pub messages: Vec<HistoryMessage>,
    /// Entries up to this position are no longer kept.
    #[serde(default, deserialize_with = "decimal")]
    pub trimmed_through: u64,
    /// The stream's last position.
    #[serde(default, deserialize_with = "decimal")]
    pub last: u64,
}

/// One message of a history page.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HistoryMessage {
    /// Sent as a decimal string (positions may exceed 2^53); a number is read too.
    #[serde(deserialize_with = "decimal")]
    pub position: u64,
    /// The message id (sent as a decimal string: JSON numbers lose precision past 2^53).
    #[serde(deserialize_with = "decimal")]
    pub id: u64,
    /// `private` or `group`.
    pub kind: String,
    pub from: Sender,
    /// The receiver of a private message; `None` for a group message.
    #[serde(default)]
    pub to: Option<u64>,
    pub text: String,
    pub timestamp_ms: u64,
}

/// Who sent a history message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Sender {
    pub id: u64,
    pub name: String,
}

fn decimal<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(u64),
    }
    match Id::deserialize(d)? {
        Id::Number(n) => Ok(n),
        Id::Text(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// Fetches the newest `limit` messages of `user_id`'s `stream` from the route API at `route`.
pub(crate) async fn fetch(
    route: &str,
    user_id: u64,
    stream: HistoryStream,
    limit: usize,
    token: Option<&str>,
) -> Result<History, ClientError> {
    let url =
        format!("{}/history/{user_id}?stream={}&limit={limit}", route.trim_end_matches('/'), stream.as_str());
    let (status, _, body) = route::get(&url, token).await?;
    if status != StatusCode::OK {
        return Err(ClientError::Route(format!("GET {url}: {status}: {}", route::snippet(&body))));
    }
    serde_json::from_slice(&body).map_err(|e| {
        ClientError::Route(format!("GET {url}: unexpected answer ({e}): {}", route::snippet(&body)))
    })
}

/// Both streams' pages merged: oldest first (by time, then id), each message once, the newest
/// `limit` of them.
pub fn merge(pages: &[History], limit: usize) -> Vec<HistoryMessage> {
    let mut all: Vec<HistoryMessage> = pages.iter().flat_map(|p| p.messages.iter().cloned()).collect();
    all.sort_by_key(|m| (m.timestamp_ms, m.id));
    all.dedup_by_key(|m| m.id);
    let skip = all.len().saturating_sub(limit);
    all.split_off(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INBOX: &str = r#"{"user_id":2,"stream":"inbox","messages":[
        {"position":"2","id":"30","kind":"private","from":{"id":1,"name":"alice"},"to":2,"text":"b","timestamp_ms":300},
        {"position":1,"id":"10","kind":"private","from":{"id":1,"name":"alice"},"to":2,"text":"a","timestamp_ms":100}
    ],"trimmed_through":"0","last":"2"}"#;
    const GROUP: &str = r#"{"user_id":2,"stream":"group","messages":[
        {"position":7,"id":"20","kind":"group","from":{"id":1,"name":"alice"},"to":null,"text":"g","timestamp_ms":200}
    ],"trimmed_through":0,"last":7}"#;

    #[test]
    fn pages_parse_and_merge_oldest_first() {
        let inbox: History = serde_json::from_str(INBOX).unwrap();
        let group: History = serde_json::from_str(GROUP).unwrap();
        assert_eq!(inbox.messages[0].id, 30);
        assert_eq!(group.messages[0].to, None);
        let texts = |ms: Vec<HistoryMessage>| ms.into_iter().map(|m| m.text).collect::<Vec<_>>();
        assert_eq!(texts(merge(&[inbox.clone(), group.clone()], 10)), ["a", "g", "b"]);
        assert_eq!(texts(merge(&[inbox, group], 2)), ["g", "b"]);
    }

    #[tokio::test]
    async fn fetch_sends_the_token_and_reads_the_page() {
        let route = crate::test_support::FakeRoute::start(vec![(200, INBOX.into())]).await;
        let page = fetch(&route.url, 2, HistoryStream::Inbox, 5, Some("tok")).await.unwrap();
        assert_eq!(page.messages.len(), 2);
        let request = route.requests().remove(0);
        assert!(request.starts_with("GET /history/2?stream=inbox&limit=5 HTTP/1.1\r\n"), "{request}");
        assert!(request.to_ascii_lowercase().contains("authorization: bearer tok\r\n"), "{request}");

        route.answer(vec![(403, r#"{"error":"forbidden"}"#.into())]);
        let err = fetch(&route.url, 3, HistoryStream::Group, 5, None).await.unwrap_err().to_string();
        assert!(err.contains("403") && err.contains("forbidden"), "{err}");
    }
}

//! Example group-send handler: masks every blocked word with `*` of the same length, then
//! delivers to every online user but the sender.
//!
//! The blocked words come from the component variable `blocked_words`, a comma-separated list
//! (`blocked_words = "darn, heck"`). Matching is case-insensitive and on whole words only, a word
//! being a maximal run of letters and digits: with `darn` blocked, `Darn it!` becomes `**** it!`
//! while `darned` is left alone. Entries containing anything but letters and digits never match.

wit_bindgen::generate!({ path: "../../wit", world: "group-send" });

use std::collections::BTreeSet;

use cim::im::log::{Level, log};
use cim::im::types::{GroupDecision, Message, Recipients, SendDecision};
use cim::im::variables;
use exports::cim::im::group_handler::Guest;

/// The component variable that lists the blocked words.
const BLOCKED_WORDS: &str = "blocked_words";

struct WordFilter;

impl Guest for WordFilter {
    fn handle(batch: Vec<Message>) -> Vec<GroupDecision> {
        // Read once per batch: the host instantiates per batch, so there is nothing to cache.
        let blocked = match variables::get(BLOCKED_WORDS) {
            Ok(list) => parse_blocked(&list),
            Err(e) => {
                log(Level::Warn, &format!("word-filter passes everything: {e}"));
                BTreeSet::new()
            }
        };
        batch
            .iter()
            .map(|message| GroupDecision {
                decision: match mask(&message.text, &blocked) {
                    Some(masked) => SendDecision::Rewrite(masked),
                    None => SendDecision::Deliver,
                },
                recipients: Recipients::AllOnlineExceptSender,
            })
            .collect()
    }
}

export!(WordFilter);

/// The blocked words of a comma-separated list, trimmed and lower-cased; empty entries dropped.
fn parse_blocked(list: &str) -> BTreeSet<String> {
    list.split(',').map(str::trim).filter(|word| !word.is_empty()).map(str::to_lowercase).collect()
}

/// `text` with every blocked word masked, or `None` if it contains none.
fn mask(text: &str, blocked: &BTreeSet<String>) -> Option<String> {
    if blocked.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut rest = text;
    while !rest.is_empty() {
        // Alternate: a run of non-word characters (copied as is), then a run of word characters.
        let gap = rest.find(char::is_alphanumeric).unwrap_or(rest.len());
        out.push_str(&rest[..gap]);
        rest = &rest[gap..];
        let word_len = rest.find(|c: char| !c.is_alphanumeric()).unwrap_or(rest.len());
        let word = &rest[..word_len];
        if !word.is_empty() && blocked.contains(&word.to_lowercase()) {
            out.extend(std::iter::repeat_n('*', word.chars().count()));
            changed = true;
        } else {
            out.push_str(word);
        }
        rest = &rest[word_len..];
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(list: &str, text: &str) -> Option<String> {
        mask(text, &parse_blocked(list))
    }

    #[test]
    fn masks_whole_words_case_insensitively() {
        assert_eq!(filter("darn, HECK", "Darn it, heck!").as_deref(), Some("**** it, ****!"));
        assert_eq!(filter("darn", "darn darn").as_deref(), Some("**** ****"));
    }

    #[test]
    fn leaves_partial_words_and_clean_text_alone() {
        assert_eq!(filter("darn", "darned undarn"), None);
        assert_eq!(filter("darn", "hello world"), None);
        assert_eq!(filter("", "darn"), None);
        assert_eq!(filter(" , ,", "darn"), None);
    }

    #[test]
    fn masks_by_characters_not_bytes() {
        assert_eq!(filter("café", "un CAFÉ noir").as_deref(), Some("un **** noir"));
        assert_eq!(filter("日本", "日本 ok").as_deref(), Some("** ok"));
    }

    #[test]
    fn keeps_punctuation_and_whitespace() {
        assert_eq!(filter("x", "  x\t(x)-x.").as_deref(), Some("  *\t(*)-*."));
    }
}

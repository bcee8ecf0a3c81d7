//! The embedded in-memory store used by a single node.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use super::{Claim, OnlineEntry, StoreError};

#[derive(Debug)]
enum Value {
    Bytes(Vec<u8>),
    List(VecDeque<Vec<u8>>),
}

/// Presence and key-value data in this process. Every operation holds one lock briefly
/// and never awaits, so a plain mutex is right.
#[derive(Debug, Default)]
pub struct MemoryStore {
    online: Mutex<BTreeMap<u64, OnlineEntry>>,
    kv: Mutex<HashMap<String, BTreeMap<String, Value>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated (every update is
    // one insert or remove), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves LRANGE-style indexes against a list of `len` items.
fn range_bounds(len: usize, start: i64, stop: i64) -> Option<(usize, usize)> {
    let len = len as i64;
    let norm = |i: i64| if i < 0 { len + i } else { i };
    let start = norm(start).max(0);
    let stop = norm(stop).min(len - 1);
    (start <= stop && start < len).then_some((start as usize, stop as usize))
}

impl MemoryStore {
    pub fn claim(&self, entry: OnlineEntry) -> Claim {
        let mut online = lock(&self.online);
        if let Some(existing) = online.get(&entry.user.id) {
            return Claim::AlreadyOnline(existing.clone());
        }
        online.insert(entry.user.id, entry);
        Claim::Claimed
    }

    pub fn release(&self, user_id: u64, node_id: &str, conn_id: u64) -> bool {
        let mut online = lock(&self.online);
        match online.get(&user_id) {
            Some(e) if e.node_id == node_id && e.conn_id == conn_id => {
                online.remove(&user_id);
                true
            }
            _ => false,
        }
    }

    pub fn lookup(&self, user_id: u64) -> Option<OnlineEntry> {
        lock(&self.online).get(&user_id).cloned()
    }

    pub fn online(&self) -> Vec<OnlineEntry> {
        lock(&self.online).values().cloned().collect()
    }

    pub fn kv_get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match lock(&self.kv).get(store).and_then(|s| s.get(key)) {
            None => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(b.clone())),
            Some(Value::List(_)) => Err(StoreError::WrongType { key: key.to_owned() }),
        }
    }

    pub fn kv_set(&self, store: &str, key: &str, value: Vec<u8>) {
        lock(&self.kv).entry(store.to_owned()).or_default().insert(key.to_owned(), Value::Bytes(value));
    }

    pub fn kv_delete(&self, store: &str, key: &str) {
        if let Some(s) = lock(&self.kv).get_mut(store) {
            s.remove(key);
        }
    }

    pub fn kv_list_keys(&self, store: &str, prefix: &str) -> Vec<String> {
        lock(&self.kv)
            .get(store)
            .map(|s| {
                s.range(prefix.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn kv_append(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        max_len: usize,
    ) -> Result<(), StoreError> {
        let mut kv = lock(&self.kv);
        let entry = kv
            .entry(store.to_owned())
            .or_default()
            .entry(key.to_owned())
            .or_insert_with(|| Value::List(VecDeque::new()));
        let Value::List(list) = entry else {
            return Err(StoreError::WrongType { key: key.to_owned() });
        };
        list.push_front(value);
        list.truncate(max_len.max(1));
        Ok(())
    }

    /// Appends every `(key, value)` in order under one lock. A key that holds a plain value
    /// fails the call before anything is written.
    pub fn kv_append_many(
        &self,
        store: &str,
        entries: Vec<(String, Vec<u8>)>,
        max_len: usize,
    ) -> Result<(), StoreError> {
        let mut kv = lock(&self.kv);
        let lists = kv.entry(store.to_owned()).or_default();
        if let Some((key, _)) = entries.iter().find(|(k, _)| matches!(lists.get(k), Some(Value::Bytes(_)))) {
            return Err(StoreError::WrongType { key: key.clone() });
        }
        for (key, value) in entries {
            if let Value::List(list) = lists.entry(key).or_insert_with(|| Value::List(VecDeque::new())) {
                list.push_front(value);
                list.truncate(max_len.max(1));
            }
        }
        Ok(())
    }

    pub fn kv_range(
        &self,
        store: &str,
        key: &str,
        start: i64,
        stop: i64,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let kv = lock(&self.kv);
        match kv.get(store).and_then(|s| s.get(key)) {
            None => Ok(Vec::new()),
            Some(Value::Bytes(_)) => Err(StoreError::WrongType { key: key.to_owned() }),
            Some(Value::List(list)) => Ok(match range_bounds(list.len(), start, stop) {
                Some((a, b)) => list.range(a..=b).cloned().collect(),
                None => Vec::new(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_proto::User;

    fn entry(id: u64, conn: u64) -> OnlineEntry {
        OnlineEntry { user: User { id, name: format!("u{id}") }, node_id: "n".into(), conn_id: conn }
    }

    #[test]
    fn claim_is_exclusive_and_release_checks_the_owner() {
        let s = MemoryStore::default();
        assert_eq!(s.claim(entry(1, 10)), Claim::Claimed);
        assert!(matches!(s.claim(entry(1, 11)), Claim::AlreadyOnline(e) if e.conn_id == 10));
        assert!(!s.release(1, "n", 11), "another connection must not release it");
        assert!(s.release(1, "n", 10));
        assert_eq!(s.lookup(1), None);
    }

    #[test]
    fn capped_list_keeps_the_newest() {
        let s = MemoryStore::default();
        for i in 0..5u8 {
            s.kv_append("default", "h", vec![i], 3).unwrap();
        }
        assert_eq!(s.kv_range("default", "h", 0, -1).unwrap(), vec![vec![4], vec![3], vec![2]]);
        assert_eq!(s.kv_range("default", "h", 1, 1).unwrap(), vec![vec![3]]);
        assert_eq!(s.kv_range("default", "h", 5, 9).unwrap(), Vec::<Vec<u8>>::new());
        assert!(s.kv_get("default", "h").is_err());
    }

    #[test]
    fn append_many_keeps_order_per_key_and_checks_types_first() {
        let s = MemoryStore::default();
        let many = |pairs: &[(&str, u8)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), vec![*v])).collect();
        s.kv_append_many("default", many(&[("a", 1), ("b", 2), ("a", 3), ("a", 4)]), 2).unwrap();
        assert_eq!(s.kv_range("default", "a", 0, -1).unwrap(), vec![vec![4], vec![3]]);
        assert_eq!(s.kv_range("default", "b", 0, -1).unwrap(), vec![vec![2]]);
        s.kv_set("default", "plain", vec![0]);
        let err = s.kv_append_many("default", many(&[("b", 5), ("plain", 6)]), 2).unwrap_err();
        assert!(matches!(err, StoreError::WrongType { key } if key == "plain"));
        assert_eq!(s.kv_range("default", "b", 0, -1).unwrap(), vec![vec![2]], "nothing was written");
    }

    #[test]
    fn list_keys_by_prefix() {
        let s = MemoryStore::default();
        s.kv_set("a", "history:1", vec![]);
        s.kv_set("a", "history:2", vec![]);
        s.kv_set("a", "other", vec![]);
        s.kv_set("b", "history:3", vec![]);
        assert_eq!(s.kv_list_keys("a", "history:"), vec!["history:1", "history:2"]);
    }
}

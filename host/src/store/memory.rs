//! The embedded in-memory store used by a single node.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use std::ops::Bound;

use async_trait::async_trait;

use super::{Claim, KeyPage, KeyValue, OnlineEntry, Presence, Quota, StoreError};

#[derive(Debug)]
enum Value {
    Bytes(Vec<u8>),
    List(VecDeque<Vec<u8>>),
}

impl Value {
    /// Bytes of the value, as a quota counts them.
    fn size(&self) -> u64 {
        match self {
            Value::Bytes(b) => b.len() as u64,
            Value::List(l) => l.iter().map(|e| e.len() as u64).sum(),
        }
    }
}

/// One key-value store and its size in bytes (keys plus values), kept exact under the lock.
#[derive(Debug, Default)]
struct Space {
    map: BTreeMap<String, Value>,
    bytes: u64,
}

impl Space {
    fn usage(&self) -> (u64, u64) {
        (self.map.len() as u64, self.bytes)
    }

    /// Bytes `key` takes now (its length and its value's), 0 if it is missing.
    fn size_of(&self, key: &str) -> u64 {
        self.map.get(key).map_or(0, |v| key.len() as u64 + v.size())
    }

    /// Bytes of the list at `key` once `pushed` (in order) went onto its head and it was cut
    /// to `max_len`, without changing it.
    fn list_size_after(&self, key: &str, pushed: &[&Vec<u8>], max_len: usize) -> u64 {
        let old = match self.map.get(key) {
            Some(Value::List(l)) => Some(l),
            _ => None,
        };
        let entries = pushed.iter().rev().copied().chain(old.into_iter().flatten());
        key.len() as u64 + entries.take(max_len.max(1)).map(|e| e.len() as u64).sum::<u64>()
    }
}

/// `after - before` as a signed growth.
fn growth(before: u64, after: u64) -> i64 {
    i64::try_from(after).unwrap_or(i64::MAX).saturating_sub(i64::try_from(before).unwrap_or(i64::MAX))
}

/// Presence and key-value data in this process. Every operation holds one lock briefly
/// and never awaits, so a plain mutex is right.
#[derive(Debug, Default)]
pub struct MemoryStore {
    online: Mutex<BTreeMap<u64, OnlineEntry>>,
    kv: Mutex<HashMap<String, Space>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated (every update is
    // one insert or remove), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves LRANGE-style indexes against a list of `len` items, keeping at most `max`
/// (at least 1) from the start.
fn range_bounds(len: usize, start: i64, stop: i64, max: usize) -> Option<(usize, usize)> {
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    let norm = |i: i64| if i < 0 { len.saturating_add(i) } else { i };
    let start = norm(start).max(0);
    let last = start.saturating_add(i64::try_from(max.max(1)).unwrap_or(i64::MAX) - 1);
    let stop = norm(stop).min(len - 1).min(last);
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
        match lock(&self.kv).get(store).and_then(|s| s.map.get(key)) {
            None => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(b.clone())),
            Some(Value::List(_)) => Err(StoreError::WrongType { key: key.to_owned() }),
        }
    }

    pub fn kv_set(&self, store: &str, key: &str, value: Vec<u8>, quota: Quota) -> Result<(), StoreError> {
        let mut kv = lock(&self.kv);
        let space = kv.entry(store.to_owned()).or_default();
        let (old, new) = (space.size_of(key), (key.len() + value.len()) as u64);
        let new_key = i64::from(!space.map.contains_key(key));
        quota.check(store, space.usage(), (new_key, growth(old, new)))?;
        space.map.insert(key.to_owned(), Value::Bytes(value));
        space.bytes = space.bytes - old + new;
        Ok(())
    }

    pub fn kv_delete(&self, store: &str, key: &str) {
        if let Some(space) = lock(&self.kv).get_mut(store) {
            let old = space.size_of(key);
            space.map.remove(key);
            space.bytes -= old;
        }
    }

    /// How many keys and bytes `store` holds.
    pub fn kv_usage(&self, store: &str) -> (u64, u64) {
        lock(&self.kv).get(store).map_or((0, 0), Space::usage)
    }

    /// Up to `limit` keys starting with `prefix`, in order, after `cursor` (the last key of
    /// the previous page). The cursor is a position, not a snapshot: keys added or removed
    /// meanwhile do not shift it.
    pub fn kv_list_keys(&self, store: &str, prefix: &str, cursor: Option<&str>, limit: usize) -> KeyPage {
        let kv = lock(&self.kv);
        let Some(map) = kv.get(store).map(|s| &s.map) else { return KeyPage::default() };
        let from = match cursor {
            Some(c) if c >= prefix => Bound::Excluded(c),
            _ => Bound::Included(prefix),
        };
        let mut matching = map
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix));
        let keys: Vec<String> = matching.by_ref().take(limit.max(1)).cloned().collect();
        let more = matching.next().is_some();
        let cursor = if more { keys.last().cloned() } else { None };
        KeyPage { keys, cursor }
    }

    pub fn kv_append(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        self.kv_append_many(store, vec![(key.to_owned(), value)], max_len, quota)
    }

    /// Appends every `(key, value)` in order under one lock. A key that holds a plain value,
    /// or a batch that would take the store over `quota`, fails the call before anything is
    /// written.
    pub fn kv_append_many(
        &self,
        store: &str,
        entries: Vec<(String, Vec<u8>)>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        let mut kv = lock(&self.kv);
        let space = kv.entry(store.to_owned()).or_default();
        if let Some((key, _)) =
            entries.iter().find(|(k, _)| matches!(space.map.get(k), Some(Value::Bytes(_))))
        {
            return Err(StoreError::WrongType { key: key.clone() });
        }
        // Values per key, keys in first-seen order, to size each list as it will end up.
        let mut by_key: Vec<(&str, Vec<&Vec<u8>>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (key, value) in &entries {
            match index.get(key.as_str()) {
                Some(&i) => by_key[i].1.push(value),
                None => {
                    index.insert(key, by_key.len());
                    by_key.push((key, vec![value]));
                }
            }
        }
        let (mut new_keys, mut before, mut after) = (0i64, 0u64, 0u64);
        for (key, values) in &by_key {
            new_keys += i64::from(!space.map.contains_key(*key));
            before += space.size_of(key);
            after += space.list_size_after(key, values, max_len);
        }
        quota.check(store, space.usage(), (new_keys, growth(before, after)))?;
        drop((by_key, index));
        for (key, value) in entries {
            if let Value::List(list) = space.map.entry(key).or_insert_with(|| Value::List(VecDeque::new())) {
                list.push_front(value);
                list.truncate(max_len.max(1));
            }
        }
        space.bytes = space.bytes - before + after;
        Ok(())
    }

    pub fn kv_range(
        &self,
        store: &str,
        key: &str,
        start: i64,
        stop: i64,
        max: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let kv = lock(&self.kv);
        match kv.get(store).and_then(|s| s.map.get(key)) {
            None => Ok(Vec::new()),
            Some(Value::Bytes(_)) => Err(StoreError::WrongType { key: key.to_owned() }),
            Some(Value::List(list)) => Ok(match range_bounds(list.len(), start, stop, max) {
                Some((a, b)) => list.range(a..=b).cloned().collect(),
                None => Vec::new(),
            }),
        }
    }
}

#[async_trait]
impl Presence for MemoryStore {
    async fn claim(&self, entry: OnlineEntry) -> Result<Claim, StoreError> {
        Ok(MemoryStore::claim(self, entry))
    }

    async fn release(&self, user_id: u64, node_id: &str, conn_id: u64) -> Result<bool, StoreError> {
        Ok(MemoryStore::release(self, user_id, node_id, conn_id))
    }

    async fn lookup(&self, user_id: u64) -> Result<Option<OnlineEntry>, StoreError> {
        Ok(MemoryStore::lookup(self, user_id))
    }

    async fn lookup_many(&self, user_ids: &[u64]) -> Result<Vec<OnlineEntry>, StoreError> {
        Ok(user_ids.iter().filter_map(|&id| MemoryStore::lookup(self, id)).collect())
    }

    async fn online(&self) -> Result<Vec<OnlineEntry>, StoreError> {
        Ok(MemoryStore::online(self))
    }

    async fn replace(&self, old: &OnlineEntry, new: OnlineEntry) -> Result<bool, StoreError> {
        let mut online = lock(&self.online);
        match online.get(&old.user.id) {
            Some(e) if e.node_id == old.node_id && e.conn_id == old.conn_id => {
                online.insert(new.user.id, new);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

#[async_trait]
impl KeyValue for MemoryStore {
    async fn kv_get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        MemoryStore::kv_get(self, store, key)
    }

    async fn kv_set(&self, store: &str, key: &str, value: Vec<u8>, quota: Quota) -> Result<(), StoreError> {
        MemoryStore::kv_set(self, store, key, value, quota)
    }

    async fn kv_delete(&self, store: &str, key: &str) -> Result<(), StoreError> {
        MemoryStore::kv_delete(self, store, key);
        Ok(())
    }

    async fn kv_list_keys(
        &self,
        store: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        Ok(MemoryStore::kv_list_keys(self, store, prefix, cursor, limit))
    }

    async fn kv_append(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        MemoryStore::kv_append(self, store, key, value, max_len, quota)
    }

    async fn kv_append_many(
        &self,
        store: &str,
        entries: Vec<(String, Vec<u8>)>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        MemoryStore::kv_append_many(self, store, entries, max_len, quota)
    }

    async fn kv_usage(&self, store: &str) -> Result<(u64, u64), StoreError> {
        Ok(MemoryStore::kv_usage(self, store))
    }

    async fn kv_range(
        &self,
        store: &str,
        key: &str,
        start: i64,
        stop: i64,
        max: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        MemoryStore::kv_range(self, store, key, start, stop, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_proto::User;

    fn entry(id: u64, conn: u64) -> OnlineEntry {
        OnlineEntry {
            user: User { id, name: format!("u{id}") },
            node_id: "n".into(),
            conn_id: conn,
            resume: String::new(),
        }
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
            s.kv_append("default", "h", vec![i], 3, Quota::NONE).unwrap();
        }
        assert_eq!(s.kv_range("default", "h", 0, -1, 1000).unwrap(), vec![vec![4], vec![3], vec![2]]);
        assert_eq!(s.kv_range("default", "h", 1, 1, 1000).unwrap(), vec![vec![3]]);
        assert_eq!(s.kv_range("default", "h", 5, 9, 1000).unwrap(), Vec::<Vec<u8>>::new());
        assert!(s.kv_get("default", "h").is_err());
    }

    #[test]
    fn append_many_keeps_order_per_key_and_checks_types_first() {
        let s = MemoryStore::default();
        let many = |pairs: &[(&str, u8)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), vec![*v])).collect();
        s.kv_append_many("default", many(&[("a", 1), ("b", 2), ("a", 3), ("a", 4)]), 2, Quota::NONE).unwrap();
        assert_eq!(s.kv_range("default", "a", 0, -1, 1000).unwrap(), vec![vec![4], vec![3]]);
        assert_eq!(s.kv_range("default", "b", 0, -1, 1000).unwrap(), vec![vec![2]]);
        s.kv_set("default", "plain", vec![0], Quota::NONE).unwrap();
        let err = s.kv_append_many("default", many(&[("b", 5), ("plain", 6)]), 2, Quota::NONE).unwrap_err();
        assert!(matches!(err, StoreError::WrongType { key } if key == "plain"));
        assert_eq!(s.kv_range("default", "b", 0, -1, 1000).unwrap(), vec![vec![2]], "nothing was written");
    }

    #[test]
    fn list_keys_by_prefix() {
        let s = MemoryStore::default();
        s.kv_set("a", "history:1", vec![], Quota::NONE).unwrap();
        s.kv_set("a", "history:2", vec![], Quota::NONE).unwrap();
        s.kv_set("a", "other", vec![], Quota::NONE).unwrap();
        s.kv_set("b", "history:3", vec![], Quota::NONE).unwrap();
        assert_eq!(s.kv_list_keys("a", "history:", None, 10).keys, vec!["history:1", "history:2"]);
    }

    #[test]
    fn range_is_bounded_at_the_start_of_the_asked_range() {
        let s = MemoryStore::default();
        s.kv_append_many(
            "d",
            (0..5000u32).map(|i| ("big".to_owned(), i.to_be_bytes().to_vec())).collect(),
            10_000,
            Quota::NONE,
        )
        .unwrap();
        let newest = |i: u32| (4999 - i).to_be_bytes().to_vec();
        let page = s.kv_range("d", "big", 0, -1, 1000).unwrap();
        assert_eq!(page.len(), 1000);
        assert_eq!((page[0].clone(), page[999].clone()), (newest(0), newest(999)));
        let page = s.kv_range("d", "big", 4500, i64::MAX, 1000).unwrap();
        assert_eq!((page.len(), page[0].clone()), (500, newest(4500)));
        let page = s.kv_range("d", "big", -1500, -1, 1000).unwrap();
        assert_eq!((page.len(), page[0].clone(), page[999].clone()), (1000, newest(3500), newest(4499)));
        assert!(s.kv_range("d", "big", i64::MIN, i64::MIN, 1000).unwrap().is_empty());
        assert_eq!(s.kv_range("d", "big", i64::MIN, 0, 1000).unwrap(), vec![newest(0)]);
        assert!(s.kv_range("d", "big", i64::MAX, -1, 1000).unwrap().is_empty());
        assert_eq!(s.kv_range("d", "big", 10, 12, 2).unwrap(), vec![newest(10), newest(11)]);
    }

    #[test]
    fn list_keys_pages_after_the_cursor() {
        let s = MemoryStore::default();
        for i in 0..25 {
            s.kv_set("a", &format!("k:{i:02}"), vec![], Quota::NONE).unwrap();
        }
        s.kv_set("a", "j", vec![], Quota::NONE).unwrap();
        s.kv_set("a", "l", vec![], Quota::NONE).unwrap();
        let (mut listed, mut cursor, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = s.kv_list_keys("a", "k:", cursor.as_deref(), 10);
            assert!(page.keys.len() <= 10);
            listed.extend(page.keys);
            pages += 1;
            // A key added behind the cursor is not listed; one ahead of it is.
            if pages == 1 {
                s.kv_set("a", "k:00a", vec![], Quota::NONE).unwrap();
                s.kv_set("a", "k:99", vec![], Quota::NONE).unwrap();
            }
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let mut expected: Vec<String> = (0..25).map(|i| format!("k:{i:02}")).collect();
        expected.push("k:99".into());
        assert_eq!((listed, pages), (expected, 3));
        let last = s.kv_list_keys("a", "k:", Some("k:24"), 10);
        assert_eq!(last, KeyPage { keys: vec!["k:99".into()], cursor: None });
        assert_eq!(s.kv_list_keys("a", "k:", Some("a"), 1).keys, vec!["k:00"], "a cursor before the prefix");
        assert_eq!(s.kv_list_keys("a", "k:", Some("z"), 1), KeyPage::default());
        assert_eq!(s.kv_list_keys("none", "", None, 1), KeyPage::default());
    }

    #[test]
    fn quotas_count_keys_and_bytes_exactly() {
        let s = MemoryStore::default();
        let quota = Quota { max_keys: 3, max_bytes: 100 };
        s.kv_set("q", "a", vec![0; 9], quota).unwrap();
        assert_eq!(s.kv_usage("q"), (1, 10));
        s.kv_set("q", "a", vec![0; 19], quota).unwrap();
        assert_eq!(s.kv_usage("q"), (1, 20), "an overwrite replaces the old size");
        s.kv_set("q", "b", vec![], quota).unwrap();
        s.kv_set("q", "c", vec![], quota).unwrap();
        let err = s.kv_set("q", "d", vec![], quota).unwrap_err();
        assert_eq!(err.to_string(), "key-value store `q` would go over its quota of 3 keys");
        s.kv_set("q", "c", vec![0; 10], quota).expect("an existing key may still be written");
        assert!(
            matches!(s.kv_set("q", "c", vec![0; 80], quota), Err(StoreError::OverQuota { limit, .. }) if limit == "100 bytes")
        );
        s.kv_delete("q", "a");
        assert_eq!(s.kv_usage("q"), (2, 12));

        // Lists: what the trim drops is freed, so a capped list at the limit keeps appending.
        for i in 0..50u8 {
            s.kv_append("q", "h", vec![i; 20], 4, quota).unwrap();
        }
        assert_eq!(s.kv_usage("q"), (3, 12 + 1 + 80));
        let err = s.kv_append_many("q", vec![("h".into(), vec![0; 20]), ("x".into(), vec![])], 4, quota);
        assert!(matches!(err, Err(StoreError::OverQuota { .. })), "a fourth key: nothing written");
        assert_eq!(s.kv_usage("q"), (3, 93));
        s.kv_append_many("q", vec![("h".into(), vec![1; 5]), ("h".into(), vec![2; 5])], 2, quota).unwrap();
        assert_eq!(s.kv_usage("q"), (3, 12 + 1 + 10));
        s.kv_set("q", "h", vec![], quota).unwrap();
        assert_eq!(s.kv_usage("q"), (3, 13), "a list replaced by a value");
        assert!(s.kv_append("q", "h", vec![], 1, quota).is_err(), "h is not a list any more");
    }
}

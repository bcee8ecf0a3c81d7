//! [`RedisStore`] behind the store surfaces ([`Presence`], [`KeyValue`]): each method is the
//! store's own of the same name.

use async_trait::async_trait;

use super::RedisStore;
use crate::store::{Claim, KeyPage, KeyValue, OnlineEntry, Presence, Quota, StoreError};

#[async_trait]
impl Presence for RedisStore {
    async fn claim(&self, entry: OnlineEntry) -> Result<Claim, StoreError> {
        RedisStore::claim(self, entry).await
    }

    async fn release(&self, user_id: u64, node_id: &str, conn_id: u64) -> Result<bool, StoreError> {
        RedisStore::release(self, user_id, node_id, conn_id).await
    }

    async fn lookup(&self, user_id: u64) -> Result<Option<OnlineEntry>, StoreError> {
        RedisStore::lookup(self, user_id).await
    }

    async fn lookup_many(&self, user_ids: &[u64]) -> Result<Vec<OnlineEntry>, StoreError> {
        RedisStore::lookup_many(self, user_ids).await
    }

    async fn online(&self) -> Result<Vec<OnlineEntry>, StoreError> {
        RedisStore::online(self).await
    }

    async fn replace(&self, old: &OnlineEntry, new: OnlineEntry) -> Result<bool, StoreError> {
        RedisStore::replace(self, old, new).await
    }
}

#[async_trait]
impl KeyValue for RedisStore {
    async fn kv_get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        RedisStore::kv_get(self, store, key).await
    }

    async fn kv_set(&self, store: &str, key: &str, value: Vec<u8>, quota: Quota) -> Result<(), StoreError> {
        RedisStore::kv_set(self, store, key, value, quota).await
    }

    async fn kv_delete(&self, store: &str, key: &str) -> Result<(), StoreError> {
        RedisStore::kv_delete(self, store, key).await
    }

    async fn kv_list_keys(
        &self,
        store: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        RedisStore::kv_list_keys(self, store, prefix, cursor, limit).await
    }

    async fn kv_append(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        RedisStore::kv_append(self, store, key, value, max_len, quota).await
    }

    async fn kv_append_many(
        &self,
        store: &str,
        entries: Vec<(String, Vec<u8>)>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        RedisStore::kv_append_many(self, store, entries, max_len, quota).await
    }

    async fn kv_usage(&self, store: &str) -> Result<(u64, u64), StoreError> {
        RedisStore::kv_usage(self, store).await
    }

    async fn kv_range(
        &self,
        store: &str,
        key: &str,
        start: i64,
        stop: i64,
        max: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        RedisStore::kv_range(self, store, key, start, stop, max).await
    }
}

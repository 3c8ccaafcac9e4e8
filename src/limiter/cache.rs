//! A look-up cache bounded in age and in size, timed by the limiter's clock.
//!
//! Entries older than the age bound are never returned. When an insert finds the cache full, the
//! expired entries go first; if that frees nothing, the oldest half goes. So memory follows the
//! keys in use now, not every key ever seen, and one burst of new keys cannot grow it for good.

use std::hash::Hash;

use dashmap::DashMap;

pub(crate) struct Cache<K: Eq + Hash, V> {
    entries: DashMap<K, (i64, V)>,
    max_age_ms: i64,
    max_entries: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
    pub fn new(max_age_ms: i64, max_entries: usize) -> Self {
        Self {
            entries: DashMap::new(),
            max_age_ms,
            max_entries: max_entries.max(1),
        }
    }

    /// The value cached for `key`, if it was stored less than the age bound before `now`.
    pub fn get(&self, key: &K, now: i64) -> Option<V> {
        let entry = self.entries.get(key)?;
        let (at, value) = &*entry;
        (now.saturating_sub(*at) < self.max_age_ms).then(|| value.clone())
    }

    pub fn insert(&self, key: K, value: V, now: i64) {
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&key) {
            self.evict(now);
        }
        self.entries.insert(key, (now, value));
    }

    pub fn clear(&self) {
        self.entries.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn evict(&self, now: i64) {
        self.entries
            .retain(|_, (at, _)| now.saturating_sub(*at) < self.max_age_ms);
        if self.entries.len() < self.max_entries {
            return;
        }
        let mut ages: Vec<i64> = self.entries.iter().map(|e| e.value().0).collect();
        ages.sort_unstable();
        let cutoff = ages[ages.len() / 2];
        self.entries.retain(|_, (at, _)| *at > cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_size_stays_bounded() {
        let cache = Cache::new(1_000, 10);
        cache.insert("a", 1, 0);
        assert_eq!(cache.get(&"a", 999), Some(1));
        assert_eq!(cache.get(&"a", 1_000), None, "expired at the age bound");
        for i in 0..1_000 {
            cache.insert(i.to_string().leak() as &str, i, 2_000 + i);
            assert!(cache.len() <= 10, "{} entries", cache.len());
        }
        assert_eq!(cache.get(&"999", 3_000), Some(999), "the newest stays");
    }
}

//! A look-up cache bounded in age and in size, timed by the limiter's clock.
//!
//! Entries older than the age bound are never returned. An entry in the last quarter of its life
//! is still returned, and the first reader that sees it there is told to refresh it (one reader
//! per entry at a time, again after a pause if that refresh brought nothing): a key in use is
//! re-read in the background before it expires and its readers never wait for the store. When an
//! insert finds the cache full, the expired entries go first; if that frees nothing, the oldest
//! half goes. So memory follows the keys in use now, not every key ever seen, and one burst of new
//! keys cannot grow it for good.

use std::hash::Hash;

use dashmap::DashMap;

pub(crate) struct Cache<K: Eq + Hash, V> {
    entries: DashMap<K, Slot<V>>,
    max_age_ms: i64,
    max_entries: usize,
}

struct Slot<V> {
    at: i64,
    value: V,
    /// When a reader last took on refreshing this entry (`i64::MIN`: never).
    refresh_claimed: i64,
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
    #[cfg(test)]
    pub fn get(&self, key: &K, now: i64) -> Option<V> {
        self.get_or_claim(key, now).map(|(v, _)| v)
    }

    /// The value cached for `key` (as [`Cache::get`]), and whether this caller should refresh it
    /// now: it is in the last quarter of its life and no other caller took that on within the
    /// last eighth of its life.
    pub fn get_or_claim(&self, key: &K, now: i64) -> Option<(V, bool)> {
        let (value, due) = {
            let slot = self.entries.get(key)?;
            let age = now.saturating_sub(slot.at);
            if age >= self.max_age_ms {
                return None;
            }
            let due = age >= self.max_age_ms - self.max_age_ms / 4
                && now.saturating_sub(slot.refresh_claimed) >= self.retry_ms();
            (slot.value.clone(), due)
        };
        if !due {
            return Some((value, false));
        }
        // Claimed under the shard's write lock: one caller wins.
        let claimed = self.entries.get_mut(key).is_some_and(|mut slot| {
            let free = now.saturating_sub(slot.refresh_claimed) >= self.retry_ms();
            if free {
                slot.refresh_claimed = now;
            }
            free
        });
        Some((value, claimed))
    }

    fn retry_ms(&self) -> i64 {
        (self.max_age_ms / 8).max(1)
    }

    pub fn insert(&self, key: K, value: V, now: i64) {
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&key) {
            self.evict(now);
        }
        self.entries.insert(
            key,
            Slot {
                at: now,
                value,
                refresh_claimed: i64::MIN,
            },
        );
    }

    pub fn clear(&self) {
        self.entries.clear();
    }

    /// Drops the entries past the age bound (they would never be returned again).
    pub fn purge(&self, now: i64) {
        self.entries
            .retain(|_, slot| now.saturating_sub(slot.at) < self.max_age_ms);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn evict(&self, now: i64) {
        self.purge(now);
        if self.entries.len() < self.max_entries {
            return;
        }
        let mut ages: Vec<i64> = self.entries.iter().map(|e| e.value().at).collect();
        ages.sort_unstable();
        let cutoff = ages[ages.len() / 2];
        self.entries.retain(|_, slot| slot.at > cutoff);
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

    #[test]
    fn one_reader_refreshes_an_entry_in_the_last_quarter_of_its_life() {
        let cache = Cache::new(1_000, 10);
        cache.insert("a", 1, 0);
        assert_eq!(cache.get_or_claim(&"a", 749), Some((1, false)));
        assert_eq!(cache.get_or_claim(&"a", 750), Some((1, true)), "due");
        assert_eq!(cache.get_or_claim(&"a", 751), Some((1, false)), "taken");
        assert_eq!(
            cache.get_or_claim(&"a", 875),
            Some((1, true)),
            "the refresh brought nothing: another reader tries again"
        );
        cache.insert("a", 2, 900);
        assert_eq!(
            cache.get_or_claim(&"a", 1_500),
            Some((2, false)),
            "refreshed"
        );
        assert_eq!(cache.get_or_claim(&"a", 1_900), None, "expired");
    }
}

//! The heaviest denied keys right now: a Space-Saving sketch (Metwally, Agrawal, El Abbadi 2005) of
//! a fixed number of counters, whose counts halve every [`HALF_LIFE`] so that it shows what is
//! hammering now, not since start.
//!
//! Space-Saving keeps `capacity` (key, count, error) entries. A key already there adds to its count;
//! a new key takes the place of the smallest entry and inherits its count (the error bound). Any key
//! with more than `total / capacity` of the traffic is guaranteed to be in the table, and no count is
//! ever below the key's true count. Halving every count at once keeps both properties, relative to
//! the decayed total. The smallest entry is found in O(1) with a min-heap indexed by key.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// How fast old denials fade: a key that stopped being denied drops to half its count every 10 s.
pub const HALF_LIFE: Duration = Duration::from_secs(10);
/// Keys are cut to this many bytes (on a character boundary): the sketch's memory is bounded.
pub const MAX_KEY_BYTES: usize = 256;

/// One row of [`TopKeys::top`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TopKey {
    pub key: String,
    /// Denials counted for the key (decayed), an over-estimate by at most `error`.
    pub count: f64,
    pub error: f64,
    /// `count` as a share of every denial counted (decayed the same way).
    pub share: f64,
}

struct Entry {
    key: Box<str>,
    count: f64,
    error: f64,
}

struct Sketch {
    /// A min-heap by count: the root is the entry a new key replaces.
    heap: Vec<Entry>,
    /// Key -> position in `heap`.
    index: HashMap<Box<str>, usize>,
    total: f64,
    decayed_at: Instant,
}

/// A bounded heavy-hitter sketch; cheap enough to feed every denial.
pub struct TopKeys {
    capacity: usize,
    sketch: Mutex<Sketch>,
}

impl TopKeys {
    /// A sketch of `capacity` counters (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            sketch: Mutex::new(Sketch {
                heap: Vec::with_capacity(capacity),
                index: HashMap::with_capacity(capacity),
                total: 0.0,
                decayed_at: Instant::now(),
            }),
        }
    }

    /// Counts one denial of `key`.
    pub fn record(&self, key: &str) {
        self.record_at(key, 1.0, Instant::now());
    }

    pub(crate) fn record_at(&self, key: &str, weight: f64, now: Instant) {
        let key = truncate(key);
        let mut s = self.sketch.lock();
        s.decay(now);
        s.total += weight;
        if let Some(&i) = s.index.get(key) {
            s.heap[i].count += weight;
            s.sift_down(i);
        } else if s.heap.len() < self.capacity {
            let at = s.heap.len();
            s.index.insert(key.into(), at);
            s.heap.push(Entry {
                key: key.into(),
                count: weight,
                error: 0.0,
            });
            s.sift_up(at);
        } else {
            // Replace the smallest: the new key inherits its count as its error bound.
            let floor = s.heap[0].count;
            let old = std::mem::replace(
                &mut s.heap[0],
                Entry {
                    key: key.into(),
                    count: floor + weight,
                    error: floor,
                },
            );
            s.index.remove(&old.key);
            s.index.insert(key.into(), 0);
            s.sift_down(0);
        }
    }

    /// The `n` heaviest keys, heaviest first.
    pub fn top(&self, n: usize) -> Vec<TopKey> {
        self.top_at(n, Instant::now())
    }

    pub(crate) fn top_at(&self, n: usize, now: Instant) -> Vec<TopKey> {
        let mut s = self.sketch.lock();
        s.decay(now);
        let total = s.total.max(f64::MIN_POSITIVE);
        let mut rows: Vec<TopKey> = s
            .heap
            .iter()
            .map(|e| TopKey {
                key: e.key.to_string(),
                count: e.count,
                error: e.error,
                share: e.count / total,
            })
            .collect();
        drop(s);
        rows.sort_by(|a, b| b.count.total_cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        rows.truncate(n);
        rows
    }
}

impl Sketch {
    /// Halves every count once per HALF_LIFE elapsed (a uniform scale keeps the heap in order).
    fn decay(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.decayed_at);
        let halvings = (elapsed.as_secs_f64() / HALF_LIFE.as_secs_f64()).floor();
        if halvings < 1.0 {
            return;
        }
        let factor = 0.5f64.powf(halvings);
        for e in &mut self.heap {
            e.count *= factor;
            e.error *= factor;
        }
        self.total *= factor;
        self.decayed_at += HALF_LIFE.mul_f64(halvings);
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        for i in [a, b] {
            if let Some(slot) = self.index.get_mut(&self.heap[i].key) {
                *slot = i;
            }
        }
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[parent].count <= self.heap[i].count {
                break;
            }
            self.swap(parent, i);
            i = parent;
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < self.heap.len() && self.heap[l].count < self.heap[least].count {
                least = l;
            }
            if r < self.heap.len() && self.heap[r].count < self.heap[least].count {
                least = r;
            }
            if least == i {
                return;
            }
            self.swap(i, least);
            i = least;
        }
    }
}

fn truncate(key: &str) -> &str {
    if key.len() <= MAX_KEY_BYTES {
        return key;
    }
    let mut end = MAX_KEY_BYTES;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    &key[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn finds_a_key_at_five_percent_among_a_hundred_thousand() {
        let top = TopKeys::new(100);
        let mut rng = StdRng::seed_from_u64(7);
        let now = Instant::now();
        for _ in 0..1_000_000 {
            if rng.random_bool(0.05) {
                top.record_at("hot", 1.0, now);
            } else {
                let k = rng.random_range(0..100_000u32);
                top.record_at(&format!("user-{k}"), 1.0, now);
            }
        }
        let rows = top.top_at(5, now);
        assert_eq!(rows[0].key, "hot", "{rows:?}");
        // Never below the truth (about 50,000), over by at most its error bound.
        assert!(rows[0].count - rows[0].error <= 51_500.0, "{rows:?}");
        assert!(rows[0].count >= 48_500.0, "{rows:?}");
        assert!((0.04..0.07).contains(&rows[0].share), "{rows:?}");
        assert_eq!(top.sketch.lock().heap.len(), 100, "bounded");
    }

    #[test]
    fn shows_now_rather_than_since_start() {
        let top = TopKeys::new(10);
        let t0 = Instant::now();
        for _ in 0..1000 {
            top.record_at("yesterday", 1.0, t0);
        }
        // A minute later another key is hammered, far less in total.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..100 {
            top.record_at("now", 1.0, later);
        }
        let rows = top.top_at(2, later);
        assert_eq!(rows[0].key, "now", "{rows:?}");
        assert!(rows[1].count < 20.0, "1000 halved six times: {rows:?}");
    }

    #[test]
    fn the_heap_stays_a_heap_and_the_index_true() {
        let top = TopKeys::new(8);
        let mut rng = StdRng::seed_from_u64(3);
        let now = Instant::now();
        for _ in 0..10_000 {
            let k = rng.random_range(0..40u32);
            top.record_at(&k.to_string(), f64::from(k % 5 + 1), now);
            let s = top.sketch.lock();
            for (i, e) in s.heap.iter().enumerate() {
                assert_eq!(s.index[&e.key], i);
                if i > 0 {
                    assert!(s.heap[(i - 1) / 2].count <= e.count);
                }
            }
            assert_eq!(s.index.len(), s.heap.len());
        }
    }

    #[test]
    fn long_keys_are_cut_on_a_character_boundary() {
        let top = TopKeys::new(2);
        let long = "é".repeat(300);
        top.record(&long);
        let rows = top.top(1);
        assert!(rows[0].key.len() <= MAX_KEY_BYTES);
        assert!(long.starts_with(&rows[0].key));
    }
}

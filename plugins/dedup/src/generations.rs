//! Remembered keys for a `key` that includes the `event_time` column, the usual case (`key:
//! [symbol, ts]`): two rows with the same key have the same event time, so a key is looked for in
//! one place only, the generation of its own event time.
//!
//! Keys are filed in generations of `retention / 64` of event time (at most 65.5 s). The newest
//! generations take keys in a hash map; an older one is *frozen*: its keys move to flat arrays
//! grouped by the top bits of their hash, about 11 bytes a key (the hash, the event time within
//! the generation in 16 bits, and an index of groups) against a map's 17 bytes a slot at 44–87%
//! load, and with no spare room to double into. A generation is dropped whole once the watermark
//! has passed every expiry it can hold: no sweep of the table.
//!
//! What passes never depends on generations: a key is remembered or not exactly as with
//! [`crate::Keys`], which the model test in `tests.rs` holds this to.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use crate::IdentityHasher;

/// Generations a retention is split into, unless that makes them longer than 2^16 ms (then
/// more): a key's event time within its generation is kept in 16 bits.
const GENERATIONS_PER_RETENTION: i64 = 64;

/// A generation's map is frozen, even while it still takes keys, once it holds this many and at
/// least half as many as the generation's frozen part (so that each key is moved about three
/// times, not once per freeze): a generation of millions of keys still holds a map of up to a
/// third of them.
const HOT_LIMIT: usize = 1 << 16;

type HotMap = HashMap<u64, u16, BuildHasherDefault<IdentityHasher>>;

/// Keys of one span of event time, `start..=last`.
struct Generation {
    number: i64,
    /// Its first and last millisecond: `width` ms, but for the generations cut off at either
    /// end of i64.
    start: i64,
    last: i64,
    /// Key hash → event time (ms) after `start`, for keys not in `frozen`.
    hot: HotMap,
    frozen: Frozen,
    /// Frozen whole once, as it became one of the older generations.
    aged: bool,
}

/// Keys in flat arrays, grouped by the top `bits` of their hash: the keys whose top bits are `b`
/// are at `index[b]..index[b + 1]`, four to eight of them on average, in no order.
#[derive(Default)]
struct Frozen {
    bits: u32,
    index: Vec<u32>,
    hashes: Vec<u64>,
    offsets: Vec<u16>,
}

impl Frozen {
    fn len(&self) -> usize {
        self.hashes.len()
    }

    fn group(&self, hash: u64) -> usize {
        if self.bits == 0 {
            0
        } else {
            (hash >> (64 - self.bits)) as usize
        }
    }

    fn contains(&self, hash: u64) -> bool {
        if self.hashes.is_empty() {
            return false;
        }
        let group = self.group(hash);
        let (from, to) = (self.index[group] as usize, self.index[group + 1] as usize);
        self.hashes[from..to].contains(&hash)
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u16)> + '_ {
        self.hashes
            .iter()
            .copied()
            .zip(self.offsets.iter().copied())
    }

    /// The keys of `self` and `hot` (none in both) as one frozen set: a counting sort by the
    /// top bits, two passes over the keys.
    fn merged(&self, hot: &HotMap) -> Frozen {
        let n = self.len() + hot.len();
        // Four to eight keys a group (one cache line of hashes): the index costs 0.5–1 byte a
        // key.
        let bits = (n / 8).max(1).next_power_of_two().trailing_zeros().min(30);
        let mut frozen = Frozen {
            bits,
            index: vec![0; (1 << bits) + 1],
            hashes: vec![0; n],
            offsets: vec![0; n],
        };
        let keys = || self.iter().chain(hot.iter().map(|(&h, &o)| (h, o)));
        for (hash, _) in keys() {
            let group = frozen.group(hash);
            frozen.index[group + 1] += 1;
        }
        for group in 1..frozen.index.len() {
            frozen.index[group] += frozen.index[group - 1];
        }
        // `next[g]`: where group g's next key goes (the index shifted by one group).
        let mut next = frozen.index[..1 << bits].to_vec();
        for (hash, offset) in keys() {
            let group = frozen.group(hash);
            let at = next[group] as usize;
            next[group] += 1;
            frozen.hashes[at] = hash;
            frozen.offsets[at] = offset;
        }
        frozen
    }
}

impl Generation {
    #[cfg(test)]
    fn contains(&self, hash: u64) -> bool {
        self.frozen.contains(hash) || self.hot.contains_key(&hash)
    }

    fn len(&self) -> usize {
        self.hot.len() + self.frozen.len()
    }

    fn freeze(&mut self) {
        if self.hot.is_empty() {
            return;
        }
        self.frozen = self.frozen.merged(&self.hot);
        self.hot = HotMap::default();
    }
}

/// Keys by generation of event time.
pub(crate) struct Generations {
    /// Event time (ms) a generation spans.
    width: i64,
    retention: i64,
    /// Ordered by number; a span of event time with no key has no generation.
    generations: VecDeque<Generation>,
    /// The generation the last key went to.
    last: usize,
    /// The newest generation number a key went to.
    newest: i64,
    len: usize,
}

/// What a row's key was found to be.
pub(crate) enum Seen {
    /// Remembered already: the row is a duplicate.
    Before,
    /// Not remembered, and not to be (its expiry is behind the watermark): the row passes.
    Passed,
    /// Remembered now: the row passes.
    New,
}

impl Generations {
    pub(crate) fn new(retention: i64) -> Self {
        Generations {
            width: (retention / GENERATIONS_PER_RETENTION).clamp(1, i64::from(u16::MAX) + 1),
            retention,
            generations: VecDeque::new(),
            last: 0,
            newest: i64::MIN,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The generation of event time `t`, made if need be.
    fn generation(&mut self, t: i64) -> &mut Generation {
        if let Some(g) = self.generations.get(self.last)
            && g.start <= t
            && t <= g.last
        {
            return &mut self.generations[self.last];
        }
        let number = t.div_euclid(self.width);
        let at = match self.generations.binary_search_by_key(&number, |g| g.number) {
            Ok(at) => at,
            Err(at) => {
                let first = i128::from(number) * i128::from(self.width);
                let last = first + i128::from(self.width) - 1;
                let clamp = |n: i128| n.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
                self.generations.insert(
                    at,
                    Generation {
                        number,
                        start: clamp(first),
                        last: clamp(last),
                        hot: HotMap::default(),
                        frozen: Frozen::default(),
                        aged: false,
                    },
                );
                at
            }
        };
        self.newest = self.newest.max(number);
        self.last = at;
        &mut self.generations[at]
    }

    /// Remembers `hash` first seen at event time `t` (ms), unless it is remembered already.
    pub(crate) fn remember(&mut self, hash: u64, t: i64) -> Seen {
        let generation = self.generation(t);
        if generation.frozen.contains(hash) {
            return Seen::Before;
        }
        // `t - start` is below the width, which is at most 2^16.
        let offset = (t - generation.start) as u16;
        match generation.hot.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => Seen::Before,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(offset);
                self.len += 1;
                Seen::New
            }
        }
    }

    /// Whether `hash` at event time `t` is remembered.
    #[cfg(test)]
    pub(crate) fn contains(&self, hash: u64, t: i64) -> bool {
        let number = t.div_euclid(self.width);
        self.generations
            .binary_search_by_key(&number, |g| g.number)
            .is_ok_and(|at| self.generations[at].contains(hash))
    }

    /// Freezes the maps that grew past [`HOT_LIMIT`], and those of every generation but the two
    /// newest as it becomes older. Late keys may still come to an older one: they go to its map,
    /// frozen again once they are an eighth of the generation.
    pub(crate) fn settle(&mut self) {
        let newest = self.newest;
        for generation in &mut self.generations {
            let hot = generation.hot.len();
            let frozen = generation.frozen.len();
            let old = generation.number < newest.saturating_sub(1);
            if hot >= HOT_LIMIT.max(frozen / 2)
                || (old && !generation.aged)
                || (old && hot > 0 && hot >= frozen / 8)
            {
                generation.freeze();
                generation.aged |= old;
            }
        }
    }

    /// Drops the generations whose every key's expiry (first event time + retention) is before
    /// `watermark`.
    pub(crate) fn forget_before(&mut self, watermark: i64) {
        let retention = self.retention;
        let expired = |g: &Generation| g.last.saturating_add(retention) < watermark;
        let mut dropped = 0;
        while let Some(g) = self.generations.front()
            && expired(g)
        {
            self.len -= g.len();
            self.generations.pop_front();
            dropped += 1;
        }
        if dropped > 0 {
            self.last = 0;
        }
    }

    /// Every key as (hash, first event time).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, i64)> + '_ {
        self.generations.iter().flat_map(|g| {
            let start = g.start;
            g.frozen
                .iter()
                .chain(g.hot.iter().map(|(&h, &o)| (h, o)))
                .map(move |(h, o)| (h, start + i64::from(o)))
        })
    }

    pub(crate) fn clear(&mut self) {
        *self = Generations::new(self.retention);
    }

    /// Frozen keys, for tests that check both halves of a generation are read.
    #[cfg(test)]
    pub(crate) fn frozen_len(&self) -> usize {
        self.generations.iter().map(|g| g.frozen.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_finds_every_key_in_its_map_or_its_frozen_arrays() {
        // 300,000 keys in one generation: its map is frozen into the arrays as it passes the
        // limit, several times; then keys come to it after a newer generation started.
        let mut keys = Generations::new(600_000);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let hashes: Vec<u64> = (0..300_000).map(|_| next()).collect();
        for (i, &hash) in hashes.iter().enumerate() {
            assert!(matches!(
                keys.remember(hash, 1_000 + i as i64 % 7),
                Seen::New
            ));
            if i % 8192 == 0 {
                keys.settle();
            }
        }
        keys.settle();
        assert!(
            keys.frozen_len() >= 1 << 17,
            "frozen: {}",
            keys.frozen_len()
        );
        assert!(keys.frozen_len() < hashes.len(), "all frozen");
        for &hash in &hashes {
            assert!(matches!(keys.remember(hash, 1_003), Seen::Before));
            assert!(keys.contains(hash, 1_000));
            // Another generation does not have it.
            assert!(!keys.contains(hash, 1_000 + 3 * 9_375));
        }
        // Two newer generations: the first is now old and frozen whole, and late keys to it go
        // to its map.
        keys.remember(next(), 1_000 + 9_375);
        keys.remember(next(), 1_000 + 2 * 9_375);
        keys.settle();
        assert_eq!(keys.frozen_len(), hashes.len());
        let late = next();
        assert!(matches!(keys.remember(late, 1_000), Seen::New));
        assert!(matches!(keys.remember(late, 1_000), Seen::Before));
        assert_eq!(keys.len(), hashes.len() + 3);
        let mut listed: Vec<u64> = keys.iter().map(|(h, _)| h).collect();
        listed.sort_unstable();
        listed.dedup();
        assert_eq!(listed.len(), keys.len(), "a key listed twice or lost");
        assert!(
            keys.iter()
                .all(|(_, t)| (1_000..1_000 + 3 * 9_375).contains(&t)),
            "first event times kept"
        );
        // The watermark past the first generation's last expiry drops it whole.
        keys.forget_before(9_375 + 600_000);
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn a_generation_is_dropped_only_once_the_watermark_passes_its_last_expiry() {
        // Retention 64 s: generations of 1 s. A key at the last millisecond of one expires at
        // that millisecond plus the retention, and is kept while the watermark is there.
        let mut keys = Generations::new(64_000);
        let last = 5 * 1_000 + 999;
        keys.remember(7, 5 * 1_000);
        keys.remember(8, last);
        keys.forget_before(last + 64_000);
        assert!(keys.contains(8, last), "dropped at its expiry");
        keys.forget_before(last + 64_001);
        assert!(!keys.contains(8, last) && !keys.contains(7, 5_000));
        assert_eq!(keys.len(), 0);
        // Negative event times file by the same rule.
        keys.remember(9, -1);
        assert!(keys.contains(9, -1) && !keys.contains(9, 0));
        keys.forget_before(-1 + 64_000);
        assert_eq!(keys.len(), 1);
        keys.forget_before(64_000);
        assert_eq!(keys.len(), 0);
        // The first generation above i64::MIN is partial: its keys keep their times.
        let mut keys = Generations::new(600_000);
        keys.remember(3, i64::MIN);
        keys.remember(4, i64::MIN + 9_000);
        assert!(keys.contains(3, i64::MIN) && keys.contains(4, i64::MIN + 9_000));
        let mut times: Vec<i64> = keys.iter().map(|(_, t)| t).collect();
        times.sort_unstable();
        assert_eq!(times, [i64::MIN, i64::MIN + 9_000]);
        keys.forget_before(i64::MIN + 600_000);
        assert_eq!(keys.len(), 2);
        keys.forget_before(i64::MAX);
        assert_eq!(keys.len(), 0);
        // A day's retention: generations of 2^16 ms, whose last millisecond still fits.
        let mut keys = Generations::new(86_400_000);
        let t = 3 * 65_536 + 65_535;
        keys.remember(1, t);
        assert!(keys.contains(1, t) && !keys.contains(1, t + 1));
        assert_eq!(keys.iter().collect::<Vec<_>>(), [(1, t)]);
    }
}

//! The internal repartition topic is read without holes.
//!
//! Every message of the internal topic is written by an idempotent, non-transactional producer
//! into a topic that is never compacted, so its offsets have no gaps: a record at offset `n + 2`
//! after `n` means the broker showed a later message before an earlier one was stored. Tansu
//! 0.6 does exactly that when several producers (the upstream halves of several processes)
//! write to one partition at once: its `produce` moves the partition's end before it stores the
//! message, and a fetch lists the messages stored below the end, skipping one still on its way.
//! A consumer that went on would never read that message, and the keyed half would compute
//! without its rows (what the scale-out test once showed: the seven ticks of one message
//! missing from every table, in no dead letter; with this guard the test has met such a hole
//! and read on exactly). So a hop reader that meets a gap drops the record after it, reads the
//! partition again from the missing offset, and stops the run if the gap stays open for
//! [`GAP_LIMIT`]: a message the broker never shows cannot be computed without.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

/// How long a gap may stay open before the run stops.
pub(crate) const GAP_LIMIT: Duration = Duration::from_secs(60);

/// What to do with a record just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The next one: hand it on.
    Take,
    /// Read before (a fetch from before a seek back): drop it.
    Again,
    /// Offsets before it are not there yet: drop it and read the partition again from
    /// `missing`; `first` says whether this gap was just found (else it was met before), and
    /// `open` how long it has been open.
    Gap {
        missing: i64,
        first: bool,
        open: Duration,
    },
}

/// Per partition read, the offset the next record must have, and the gap open there.
#[derive(Debug, Default)]
pub(crate) struct Gapless {
    parts: HashMap<(String, i32), Reading>,
}

#[derive(Debug)]
struct Reading {
    next: i64,
    /// The gap open: since when, and how often the partition was read again.
    gap: Option<(Instant, u64)>,
}

impl Gapless {
    /// The partition starts (again) at `offset`: the first record read must have it.
    pub fn expect(&mut self, topic: &str, partition: i32, offset: i64) {
        let reading = Reading {
            next: offset,
            gap: None,
        };
        self.parts.insert((topic.to_string(), partition), reading);
    }

    /// The partition is no longer read, or starts where the broker says, not known here (its
    /// first record sets the expectation).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.parts.remove(&(topic.to_string(), partition));
    }

    /// Judges a record at `offset` of `topic`/`partition`, read at `now`; a gap that closes is
    /// returned with how long it was open and how often the partition was read again.
    pub fn check(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        now: Instant,
    ) -> (Verdict, Option<(i64, Duration, u64)>) {
        let reading = match self.parts.entry((topic.to_string(), partition)) {
            Entry::Vacant(v) => {
                v.insert(Reading {
                    next: offset + 1,
                    gap: None,
                });
                return (Verdict::Take, None);
            }
            Entry::Occupied(o) => o.into_mut(),
        };
        let missing = reading.next;
        if offset < missing {
            return (Verdict::Again, None);
        }
        if offset == missing {
            reading.next = offset + 1;
            let closed = reading
                .gap
                .take()
                .map(|(since, reads)| (missing, now.saturating_duration_since(since), reads));
            return (Verdict::Take, closed);
        }
        let (since, reads) = reading.gap.get_or_insert((now, 0));
        let first = *reads == 0;
        *reads += 1;
        (
            Verdict::Gap {
                missing,
                first,
                open: now.saturating_duration_since(*since),
            },
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order_are_taken_and_a_record_past_a_hole_is_not() {
        let t0 = Instant::now();
        let mut g = Gapless::default();
        g.expect("hop", 0, 10);
        assert_eq!(g.check("hop", 0, 10, t0).0, Verdict::Take);
        assert_eq!(g.check("hop", 0, 11, t0).0, Verdict::Take);
        // 12 is not there yet: 13 is refused, every time, until 12 comes.
        let (v, _) = g.check("hop", 0, 13, t0);
        assert_eq!(
            v,
            Verdict::Gap {
                missing: 12,
                first: true,
                open: Duration::ZERO
            }
        );
        let later = t0 + Duration::from_millis(30);
        assert_eq!(
            g.check("hop", 0, 13, later).0,
            Verdict::Gap {
                missing: 12,
                first: false,
                open: Duration::from_millis(30)
            }
        );
        // Read again from 12: it is there now; 13 follows; a copy of 11 is dropped.
        let (v, closed) = g.check("hop", 0, 12, later);
        assert_eq!(v, Verdict::Take);
        assert_eq!(closed, Some((12, Duration::from_millis(30), 2)));
        assert_eq!(g.check("hop", 0, 11, later).0, Verdict::Again);
        assert_eq!(g.check("hop", 0, 13, later).0, Verdict::Take);
    }

    #[test]
    fn partitions_are_judged_apart_and_a_new_start_clears_an_open_gap() {
        let t0 = Instant::now();
        let mut g = Gapless::default();
        g.expect("hop", 0, 0);
        g.expect("hop", 1, 5);
        assert!(matches!(
            g.check("hop", 0, 1, t0).0,
            Verdict::Gap { missing: 0, .. }
        ));
        assert_eq!(g.check("hop", 1, 5, t0).0, Verdict::Take);
        // Assigned again at 1: the gap at 0 is not this reader's any more.
        g.expect("hop", 0, 1);
        assert_eq!(g.check("hop", 0, 1, t0), (Verdict::Take, None));
    }

    #[test]
    fn a_partition_of_unknown_start_takes_its_first_record_as_the_start() {
        let t0 = Instant::now();
        let mut g = Gapless::default();
        g.forget("hop", 2);
        assert_eq!(g.check("hop", 2, 40, t0).0, Verdict::Take);
        assert!(matches!(
            g.check("hop", 2, 42, t0).0,
            Verdict::Gap { missing: 41, .. }
        ));
        g.forget("hop", 2);
        assert_eq!(g.check("hop", 2, 42, t0).0, Verdict::Take);
    }
}

//! `dedup`: drops rows whose key columns were already seen, within a retention measured in event
//! time (like Spark's `dropDuplicatesWithinWatermark`). The first row of a key passes; later
//! rows with the same key are dropped until the watermark passes the first row's event time plus
//! `retention`, when the key is forgotten.
//!
//! ```yaml
//! config:
//!   key: [symbol, ts]
//!   event_time: ts
//!   retention: 10m
//! ```
//!
//! State is compact: a key is kept as its 64-bit xxh3 hash (a false duplicate needs two distinct
//! keys to collide: about 1 in 3·10⁷ at a million live keys), in sets bucketed by expiry time, so
//! eviction drops whole buckets.
#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use arrow::array::BooleanArray;
use flowgate_sdk::columns::is_event_time_type;
use flowgate_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

mod key;

/// The step's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Columns that make a row's identity.
    pub key: Vec<String>,
    /// The event-time column (timestamp or epoch milliseconds).
    pub event_time: String,
    /// How long after a row's event time its key is remembered.
    pub retention: Duration,
}

/// Keys are already hashes: feed them to the table as they are.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeySet = HashSet<u64, BuildHasherDefault<IdentityHasher>>;

/// The `dedup` transform.
pub struct Dedup {
    key_columns: Vec<usize>,
    event_time: usize,
    retention: i64,
    bucket_width: i64,
    /// Expiry bucket (expiry time / bucket width) → key hashes expiring in it.
    buckets: BTreeMap<i64, KeySet>,
    watermark: i64,
}

#[derive(Serialize, Deserialize)]
struct State {
    watermark: i64,
    buckets: Vec<(i64, Vec<u64>)>,
}

/// How many expiry buckets a retention is split into: more buckets evict closer to the exact
/// time, fewer make each lookup cheaper.
const BUCKETS_PER_RETENTION: i64 = 8;

impl Dedup {
    fn seen(&self, hash: u64) -> bool {
        self.buckets.values().rev().any(|set| set.contains(&hash))
    }

    /// Keys currently remembered.
    pub fn live_keys(&self) -> usize {
        self.buckets.values().map(HashSet::len).sum()
    }
}

impl Transform for Dedup {
    type Config = Config;
    const NAME: &'static str = "dedup";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const STATE_VERSION: u32 = 1;

    fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        if config.key.is_empty() {
            return Err(Error::config("key", "name at least one column"));
        }
        let key_columns = config
            .key
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let index = column_index(input, name, &format!("key[{i}]"))?;
                key::check_type(input.field(index).data_type())
                    .map_err(|e| Error::config(&format!("key[{i}]"), e))?;
                Ok(index)
            })
            .collect::<Result<Vec<_>>>()?;
        let event_time = column_index(input, &config.event_time, "event_time")?;
        let data_type = input.field(event_time).data_type();
        if !is_event_time_type(data_type) {
            return Err(Error::config(
                "event_time",
                format!(
                    "column `{}` is {data_type}, not a timestamp",
                    config.event_time
                ),
            ));
        }
        let retention = config.retention.as_millis();
        if retention <= 0 {
            return Err(Error::config("retention", "must be greater than zero"));
        }
        let dedup = Dedup {
            key_columns,
            event_time,
            retention,
            bucket_width: (retention / BUCKETS_PER_RETENTION).max(1),
            buckets: BTreeMap::new(),
            watermark: i64::MIN,
        };
        Ok((dedup, input.clone()))
    }

    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        let rows = batch.num_rows();
        let mut hashes = vec![0u64; rows];
        for &column in &self.key_columns {
            key::hash_column(batch.column(column), &mut hashes)?;
        }
        let times = event_time_millis(&batch, self.event_time)?;
        let mut keep = Vec::with_capacity(rows);
        let mut output = Output::empty();
        for (row, hash) in hashes.into_iter().enumerate() {
            if times.is_null(row) {
                keep.push(false);
                output.reject(row, "event time is null");
                continue;
            }
            if self.seen(hash) {
                keep.push(false);
                continue;
            }
            keep.push(true);
            let expiry = times.value(row).saturating_add(self.retention);
            if expiry >= self.watermark {
                let bucket = expiry.div_euclid(self.bucket_width);
                self.buckets.entry(bucket).or_default().insert(hash);
            }
        }
        if keep.iter().all(|k| *k) {
            output.push(batch);
        } else {
            output.push(filter_record_batch(&batch, &BooleanArray::from(keep))?);
        }
        Ok(output)
    }

    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output> {
        self.watermark = self.watermark.max(ts_ms);
        // A bucket holds expiries in [b·w, (b+1)·w): all expired once (b+1)·w ≤ watermark.
        let first_live = self.watermark.div_euclid(self.bucket_width);
        self.buckets = self.buckets.split_off(&first_live);
        Ok(Output::empty())
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        let state = State {
            watermark: self.watermark,
            buckets: self
                .buckets
                .iter()
                .map(|(b, set)| (*b, set.iter().copied().collect()))
                .collect(),
        };
        postcard::to_allocvec(&state).map_err(|e| Error::internal(format!("encoding state: {e}")))
    }

    fn restore(&mut self, version: u32, state: &[u8]) -> Result<()> {
        if version != Self::STATE_VERSION {
            return Err(Error::bad_input(format!(
                "dedup reads state version {}, got {version}",
                Self::STATE_VERSION
            )));
        }
        let state: State = postcard::from_bytes(state)
            .map_err(|e| Error::bad_input(format!("dedup state is corrupt: {e}")))?;
        self.watermark = state.watermark;
        self.buckets = state
            .buckets
            .into_iter()
            .map(|(b, keys)| (b, keys.into_iter().collect()))
            .collect();
        Ok(())
    }
}

/// Hash of one value, chained onto the row's hash so far.
fn chain(bytes: &[u8], seed: u64) -> u64 {
    xxh3_64_with_seed(bytes, seed)
}

export_transform!(Dedup);

/// Scripted runs shared with the host's WASM tests.
#[cfg(any(test, feature = "scenarios"))]
pub mod scenarios;

#[cfg(test)]
mod tests;

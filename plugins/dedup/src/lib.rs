//! `dedup`: drops rows whose key columns were already seen, within a retention measured in event
//! time (like Spark's `dropDuplicatesWithinWatermark`). The first row of a key passes; a later
//! row with the same key is dropped while its event time is within `retention` of the first
//! row's, and the key is forgotten once the watermark passes that first event time plus
//! `retention`.
//!
//! ```yaml
//! config:
//!   key: [symbol, ts]
//!   event_time: ts
//!   retention: 10m
//! ```
//!
//! Each row is judged by event time alone (its own against the remembered key's), never by when
//! the key is evicted, so how the host batches rows never changes what passes.
//!
//! State is compact: a key is kept as its 64-bit xxh3 hash (a false duplicate needs two distinct
//! keys to collide: about 1 in 3·10⁷ at a million live keys) with its first event time or
//! expiry, and nothing else. Where `key` includes the `event_time` column (as above), two rows
//! with one key have one event time, and keys are filed by it in generations of `retention / 64`
//! (at most 65.5 s; [`generations`]): a row's key is looked for in its own generation only,
//! older generations are packed into flat arrays (about 11 bytes a key), and a generation is
//! dropped whole once the watermark passes its last expiry. Any other key goes to one table of hash → expiry, split in
//! 64 shards so that its doublings leave smaller holes in the instance's memory (39 MiB per
//! million keys, from 68 unsplit); keys are forgotten in steps of `retention / 8` of event time:
//! each time the watermark passes such a step, one sweep of the table drops every key that
//! expired before it. Snapshots (state version 3) store each key's
//! first event time, the key columns and the event-time column: a changed `retention` restores
//! correctly (expiries are recomputed), a changed `key` or `event_time` is refused (those keys
//! mean something else now).
//!
//! Checkpoints are incremental: a delta holds the watermark and the keys remembered since the
//! last one, so a checkpoint costs the keys that arrived in its epoch, not the whole retention.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};

use arrow::array::BooleanArray;
use flowgate_sdk::STATE_HEADER;
use flowgate_sdk::columns::is_event_time_type;
use flowgate_sdk::hash::xxh3_64_with_seed;
use flowgate_sdk::prelude::*;
use serde::{Deserialize, Serialize};

mod generations;
mod key;

use generations::{Generations, Seen};

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
pub(crate) struct IdentityHasher(u64);

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

type KeyMap = HashMap<u64, i64, BuildHasherDefault<IdentityHasher>>;

/// Key hash → expiry, in [`SHARDS`] maps chosen by bits 32–37 of the hash (the map itself places
/// a key by its low bits and tags it with the top 7 bits of a `usize`: bits 25–31 in WASM). A
/// map doubles when full and, in WASM, the memory of the table it left stays the instance's:
/// split in shards, each doubling leaves a hole a shard's size, which the next shard to double
/// can take.
struct Keys {
    shards: Vec<KeyMap>,
}

const SHARDS: usize = 64;

impl Default for Keys {
    fn default() -> Self {
        Keys {
            shards: (0..SHARDS).map(|_| KeyMap::default()).collect(),
        }
    }
}

impl Keys {
    fn shard(&mut self, hash: u64) -> &mut KeyMap {
        &mut self.shards[(hash >> 32) as usize % SHARDS]
    }

    fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    fn entry(&mut self, hash: u64) -> Entry<'_, u64, i64> {
        self.shard(hash).entry(hash)
    }

    fn insert(&mut self, hash: u64, expiry: i64) {
        self.shard(hash).insert(hash, expiry);
    }

    fn retain(&mut self, keep: impl Fn(&i64) -> bool) {
        for shard in &mut self.shards {
            shard.retain(|_, e| keep(e));
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &i64)> {
        self.shards.iter().flatten()
    }

    fn clear(&mut self) {
        *self = Keys::default();
    }

    fn reserve(&mut self, additional: usize) {
        // An eighth over the average: shards get more or fewer keys than the average.
        let share = additional / SHARDS;
        for shard in &mut self.shards {
            shard.reserve(share + share / 8 + 16);
        }
    }
}

/// The `dedup` transform.
pub struct Dedup {
    key_names: Vec<String>,
    event_time_name: String,
    key_columns: Vec<usize>,
    event_time: usize,
    retention: i64,
    bucket_width: i64,
    /// The keys remembered.
    store: Store,
    /// Keys whose expiry is before this bucket (× `bucket_width`) are gone from a
    /// [`Store::Any`].
    swept_to: i64,
    watermark: i64,
    /// Keys remembered since the last delta (incremental checkpoints) with the event time each
    /// was remembered at (its first), in the order remembered (a key possibly more than once); `None` while not keeping track
    /// (until the host first asks for a delta, or after the list outgrew
    /// [`Dedup::touched_limit`]: the host then takes a full snapshot).
    touched: Option<Touched>,
}

/// Where remembered keys are kept.
enum Store {
    /// `key` includes the `event_time` column: keys by generation of their event time.
    Timed(Generations),
    /// Any other key: key hash → expiry (its first event time plus `retention`).
    Any(Keys),
}

impl Store {
    /// Judges a row of key `hash` at event time `t`, and remembers its key if it is new.
    fn see(&mut self, hash: u64, t: i64, retention: i64, watermark: i64) -> Seen {
        let expiry = t.saturating_add(retention);
        match self {
            // The key's first row had this same event time: remembered, it is a duplicate
            // unless the watermark has passed its expiry.
            Store::Timed(_) if expiry < watermark => Seen::Passed,
            Store::Timed(keys) => keys.remember(hash, t),
            // A duplicate is judged by event time: within `retention` of the key's first row
            // (and the key not forgotten by the watermark). Never by whether an eviction ran
            // since, so batching changes nothing. One probe of the table per row.
            Store::Any(keys) => match keys.entry(hash) {
                Entry::Occupied(e) if *e.get() >= t && *e.get() >= watermark => Seen::Before,
                // A key whose own expiry the watermark has passed is not remembered.
                _ if expiry < watermark => Seen::Passed,
                Entry::Occupied(mut e) => {
                    e.insert(expiry);
                    Seen::New
                }
                Entry::Vacant(e) => {
                    e.insert(expiry);
                    Seen::New
                }
            },
        }
    }

    fn len(&self) -> usize {
        match self {
            Store::Timed(keys) => keys.len(),
            Store::Any(keys) => keys.len(),
        }
    }

    /// Every key as (hash, first event time).
    fn iter(&self, retention: i64) -> Box<dyn Iterator<Item = (u64, i64)> + '_> {
        match self {
            Store::Timed(keys) => Box::new(keys.iter()),
            Store::Any(keys) => Box::new(
                keys.iter()
                    .map(move |(&h, &e)| (h, e.saturating_sub(retention))),
            ),
        }
    }
}

/// Keys remembered since the last delta, with their first event times, in order: fixed-size chunks rather
/// than one list, which doubling would copy and whose old copies would stay the instance's
/// memory (WASM never gives memory back); a delta's chunks, freed, are the next epoch's.
#[derive(Default)]
struct Touched {
    chunks: Vec<Vec<(u64, i64)>>,
}

/// Keys in a chunk of [`Touched`] (128 KiB). The first chunk starts small and doubles up to
/// this, so a quiet partition's instance does not hold a whole chunk for a few keys.
const TOUCHED_CHUNK: usize = 8192;

impl Touched {
    fn push(&mut self, key: (u64, i64)) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < TOUCHED_CHUNK => chunk.push(key),
            _ => {
                let size = if self.chunks.is_empty() {
                    64
                } else {
                    TOUCHED_CHUNK
                };
                let mut chunk = Vec::with_capacity(size);
                chunk.push(key);
                self.chunks.push(chunk);
            }
        }
    }

    /// Every chunk but the last is full.
    fn len(&self) -> usize {
        self.chunks.last().map_or(0, |last| {
            (self.chunks.len() - 1) * TOUCHED_CHUNK + last.len()
        })
    }

    fn iter(&self) -> impl Iterator<Item = (u64, i64)> + '_ {
        self.chunks.iter().flatten().copied()
    }
}

/// Snapshot body, state version 3: this head (postcard), then each key as 16 bytes, its hash
/// and first event time as little-endian `u64` and `i64` (no per-key encoding: a snapshot of
/// millions of keys is a copy).
#[derive(Serialize, Deserialize)]
struct StateHead {
    key: Vec<String>,
    event_time: String,
    watermark: i64,
    /// How many keys follow (a cut or padded state is refused, not read short).
    keys: u64,
}

/// Snapshot body, state version 2 (postcard; still read).
#[derive(Serialize, Deserialize)]
struct State {
    key: Vec<String>,
    event_time: String,
    watermark: i64,
    /// Key hash and its first event time.
    keys: Vec<(u64, i64)>,
}

/// A delta (state version 3: the watermark as a little-endian `i64`, the number of keys as a
/// little-endian `u64`, then the keys as in a snapshot; version 2: this, in postcard): the keys remembered since the last delta with their
/// first event times, in the order remembered (a key remembered again after its retention is
/// listed twice; applied in order, its later expiry stands). Keys forgotten since are not
/// listed: the watermark forgets them again where the delta is applied.
#[derive(Serialize, Deserialize)]
struct Delta {
    watermark: i64,
    keys: Vec<(u64, i64)>,
}

/// State version 1: keys in expiry buckets of width `retention / 8`, no config recorded.
#[derive(Deserialize)]
struct StateV1 {
    watermark: i64,
    buckets: Vec<(i64, Vec<u64>)>,
}

/// How many steps of event time a retention is split into for forgetting keys: more steps
/// forget closer to the exact time, fewer sweep the table less often.
const BUCKETS_PER_RETENTION: i64 = 8;

impl Dedup {
    /// Keys currently remembered.
    pub fn live_keys(&self) -> usize {
        self.store.len()
    }

    /// The longest the list of keys touched since the last delta may grow (a host that never
    /// asks for deltas would otherwise grow it forever).
    fn touched_limit(&self) -> usize {
        2 * self.store.len() + (1 << 16)
    }

    /// Stops keeping track of touched keys if the list outgrew its limit.
    fn check_touched(&mut self) {
        let limit = self.touched_limit();
        if self.touched.as_ref().is_some_and(|t| t.len() > limit) {
            self.touched = None;
        }
    }

    /// Forgets the keys whose expiry the watermark passed, a bucket width at a time: once the
    /// watermark enters a new bucket, one sweep drops every key that expired before it. (A
    /// table sweep every `retention / 8` of event time costs less per row than keeping each key
    /// in a list by expiry, and takes no memory.)
    fn evict(&mut self) {
        let keys = match &mut self.store {
            Store::Timed(keys) => return keys.forget_before(self.watermark),
            Store::Any(keys) => keys,
        };
        let first_live = self.watermark.div_euclid(self.bucket_width);
        if first_live <= self.swept_to {
            return;
        }
        self.swept_to = first_live;
        let end = first_live.saturating_mul(self.bucket_width);
        keys.retain(|e| *e >= end);
    }

    /// Refuses state written for other key or event-time columns.
    fn same_columns(&self, key: &[String], event_time: &str) -> Result<()> {
        if key != self.key_names || event_time != self.event_time_name {
            return Err(Error::bad_input(format!(
                "dedup state was written for key {key:?} with event time `{event_time}`; this step has key {:?} with event time `{}`: the keys it remembers mean something else now (add `state: reset` to start the step empty)",
                self.key_names, self.event_time_name
            )));
        }
        Ok(())
    }

    /// Remembers `hash` as first seen at `first` (event time, ms).
    fn remember(&mut self, hash: u64, first: i64) {
        let expiry = first.saturating_add(self.retention);
        if expiry < self.watermark {
            return;
        }
        match &mut self.store {
            Store::Timed(keys) => {
                keys.remember(hash, first);
            }
            Store::Any(keys) => keys.insert(hash, expiry),
        }
    }

    /// Remembers restored keys (hash, first event time), freezing generations as they fill.
    fn remember_all(&mut self, keys: Vec<(u64, i64)>) {
        for (n, (hash, first)) in keys.into_iter().enumerate() {
            self.remember(hash, first);
            if n % 65_536 == 65_535
                && let Store::Timed(keys) = &mut self.store
            {
                keys.settle();
            }
        }
        if let Store::Timed(keys) = &mut self.store {
            keys.settle();
        }
    }

    /// Keeps every key in one table of hash → expiry, whatever the key columns: how a step
    /// whose key has no event-time column keeps them. For the model test, and for state of
    /// version 1, whose keys' own event times are lost.
    fn keep_keys_in_one_table(&mut self) {
        if let Store::Timed(keys) = &self.store {
            let mut any = Keys::default();
            any.reserve(keys.len());
            for (hash, first) in keys.iter() {
                any.insert(hash, first.saturating_add(self.retention));
            }
            self.store = Store::Any(any);
            self.swept_to = i64::MIN;
        }
    }
}

impl Transform for Dedup {
    type Config = Config;
    const NAME: &'static str = "dedup";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    /// 3: first event times with the key and event-time columns, keys in fixed 16 bytes (2:
    /// the same in postcard; 1: expiry buckets only).
    const STATE_VERSION: u32 = 3;

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
        let store = if key_columns.contains(&event_time) {
            Store::Timed(Generations::new(retention))
        } else {
            Store::Any(Keys::default())
        };
        let dedup = Dedup {
            key_names: config.key,
            event_time_name: config.event_time,
            key_columns,
            event_time,
            retention,
            bucket_width: (retention / BUCKETS_PER_RETENTION).max(1),
            store,
            swept_to: i64::MIN,
            watermark: i64::MIN,
            touched: None,
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
        let (watermark, retention) = (self.watermark, self.retention);
        for (row, hash) in hashes.into_iter().enumerate() {
            if times.is_null(row) {
                keep.push(false);
                output.reject(row, "event time is null");
                continue;
            }
            let t = times.value(row);
            match self.store.see(hash, t, retention, watermark) {
                Seen::Before => keep.push(false),
                Seen::Passed => keep.push(true),
                Seen::New => {
                    keep.push(true);
                    if let Some(touched) = &mut self.touched {
                        touched.push((hash, t));
                    }
                }
            }
        }
        if let Store::Timed(keys) = &mut self.store {
            keys.settle();
        }
        self.check_touched();
        if keep.iter().all(|k| *k) {
            output.push(batch);
        } else {
            output.push(filter_record_batch(&batch, &BooleanArray::from(keep))?);
        }
        Ok(output)
    }

    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output> {
        self.watermark = self.watermark.max(ts_ms);
        self.evict();
        Ok(Output::empty())
    }

    fn snapshot_delta(&mut self) -> Result<Option<Vec<u8>>> {
        let Some(touched) = self.touched.replace(Touched::default()) else {
            return Ok(None);
        };
        // In the order remembered: applied in that order, a key remembered twice ends with its
        // later expiry, as here. Keys the watermark has forgotten since are left out.
        let mut out = Vec::with_capacity(16 + KEY_BYTES * touched.len() + STATE_HEADER);
        out.extend_from_slice(&self.watermark.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        let (watermark, retention) = (self.watermark, self.retention);
        let live = touched
            .iter()
            .filter(|&(_, first)| first.saturating_add(retention) >= watermark);
        put_keys(&mut out, live);
        let count = ((out.len() - 16) / KEY_BYTES) as u64;
        out[8..16].copy_from_slice(&count.to_le_bytes());
        Ok(Some(out))
    }

    fn restore_delta(&mut self, version: u32, delta: &[u8]) -> Result<()> {
        let corrupt = |e: String| Error::bad_input(format!("dedup state delta is corrupt: {e}"));
        let (watermark, keys) = match version {
            3 => {
                let (head, keys) = delta
                    .split_first_chunk::<16>()
                    .ok_or_else(|| corrupt("shorter than its head".into()))?;
                let (watermark, count) = head.split_at(8);
                let watermark = i64::from_le_bytes(watermark.try_into().unwrap_or_default());
                let count = u64::from_le_bytes(count.try_into().unwrap_or_default());
                (watermark, get_keys(keys, count).map_err(corrupt)?)
            }
            2 => {
                let delta: Delta =
                    postcard::from_bytes(delta).map_err(|e| corrupt(e.to_string()))?;
                (delta.watermark, delta.keys)
            }
            other => {
                return Err(Error::bad_input(format!(
                    "dedup reads state deltas of versions 2 and 3, got {other}"
                )));
            }
        };
        self.watermark = self.watermark.max(watermark);
        self.remember_all(keys);
        self.evict();
        self.touched = Some(Touched::default());
        Ok(())
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        let head = StateHead {
            key: self.key_names.clone(),
            event_time: self.event_time_name.clone(),
            watermark: self.watermark,
            keys: self.store.len() as u64,
        };
        let mut out = postcard::to_allocvec(&head)
            .map_err(|e| Error::internal(format!("encoding state: {e}")))?;
        out.reserve_exact(KEY_BYTES * self.store.len() + STATE_HEADER);
        put_keys(&mut out, self.store.iter(self.retention));
        Ok(out)
    }

    fn restore(&mut self, version: u32, state: &[u8]) -> Result<()> {
        let corrupt = |e: String| Error::bad_input(format!("dedup state is corrupt: {e}"));
        let (watermark, keys) = match version {
            3 => {
                let (head, keys): (StateHead, &[u8]) =
                    postcard::take_from_bytes(state).map_err(|e| corrupt(e.to_string()))?;
                self.same_columns(&head.key, &head.event_time)?;
                (head.watermark, get_keys(keys, head.keys).map_err(corrupt)?)
            }
            2 => {
                let state: State =
                    postcard::from_bytes(state).map_err(|e| corrupt(e.to_string()))?;
                self.same_columns(&state.key, &state.event_time)?;
                (state.watermark, state.keys)
            }
            // Version 1 kept only expiry buckets of `retention / 8`, and not the retention:
            // read as written with this step's retention (the end of a bucket as the expiry).
            // Keys restored from it stay in one table (their own event times are lost), for this
            // instance's life. Its snapshots then list them with those made-up first times, so a
            // new instance restoring one would file them in the wrong generation: a repeat of
            // such a key could pass within one retention of the version-1 restore (after that
            // every such key has expired).
            1 => {
                self.keep_keys_in_one_table();
                let state: StateV1 = postcard::from_bytes(state)
                    .map_err(|e| Error::bad_input(format!("dedup state is corrupt: {e}")))?;
                let keys = state
                    .buckets
                    .into_iter()
                    .flat_map(|(b, hashes)| {
                        let first = b
                            .saturating_add(1)
                            .saturating_mul(self.bucket_width)
                            .saturating_sub(1)
                            .saturating_sub(self.retention);
                        hashes.into_iter().map(move |h| (h, first))
                    })
                    .collect();
                (state.watermark, keys)
            }
            other => {
                return Err(Error::bad_input(format!(
                    "dedup reads state versions 1 to 3, got {other}"
                )));
            }
        };
        self.watermark = watermark;
        self.swept_to = i64::MIN;
        match &mut self.store {
            Store::Timed(keys) => keys.clear(),
            Store::Any(table) => {
                table.clear();
                table.reserve(keys.len());
            }
        }
        self.remember_all(keys);
        self.touched = Some(Touched::default());
        Ok(())
    }
}

/// Bytes per key in a snapshot or delta of state version 3.
const KEY_BYTES: usize = 16;

/// Appends each key (hash, first event time), little-endian.
fn put_keys(out: &mut Vec<u8>, keys: impl Iterator<Item = (u64, i64)>) {
    for (hash, first) in keys {
        out.extend_from_slice(&hash.to_le_bytes());
        out.extend_from_slice(&first.to_le_bytes());
    }
}

/// The `count` keys (hash, first event time) [`put_keys`] wrote, which must be all of `bytes`.
fn get_keys(bytes: &[u8], count: u64) -> std::result::Result<Vec<(u64, i64)>, String> {
    let expected = usize::try_from(count)
        .ok()
        .and_then(|n| n.checked_mul(KEY_BYTES));
    if expected != Some(bytes.len()) {
        return Err(format!(
            "{count} keys of {KEY_BYTES} bytes announced, {} bytes of keys found",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(KEY_BYTES)
        .map(|k| {
            let (hash, first) = k.split_at(8);
            (
                u64::from_le_bytes(hash.try_into().unwrap_or_default()),
                i64::from_le_bytes(first.try_into().unwrap_or_default()),
            )
        })
        .collect())
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

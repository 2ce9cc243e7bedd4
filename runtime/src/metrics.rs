//! What a run measured: where the time went, stage by stage, and how long records took from
//! their Kafka append to the last plugin and to a committed table version. `flowgate run
//! --report FILE` writes it as JSON; the benchmark reads it.

use std::time::Duration;

use serde_json::{Value, json};

/// Values below this are exact; above, each power of two is split into this many buckets
/// (relative error under 1/64).
const LINEAR: u64 = 64;
const SUB_BITS: u32 = 6;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * LINEAR as usize;

/// A histogram of durations in microseconds with fixed memory (~30 KB) and < 1.6% error, cheap
/// enough to record every record.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let shift = exp - SUB_BITS;
    let mantissa = (v >> shift) & (LINEAR - 1);
    (shift as usize + 1) * LINEAR as usize + mantissa as usize
}

/// The middle of bucket `i`'s range.
fn value_of(i: usize) -> u64 {
    let (block, mantissa) = (i as u64 / LINEAR, i as u64 % LINEAR);
    if block == 0 {
        return mantissa;
    }
    let shift = block - 1;
    let low = (LINEAR + mantissa) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Histogram {
    /// Records `n` observations of `micros`.
    pub fn record_n(&mut self, micros: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.counts[bucket(micros)] += n;
        self.total += n;
        self.max = self.max.max(micros);
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0–1), in microseconds; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        if rank >= self.total {
            return Some(self.max);
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(value_of(i).min(self.max));
            }
        }
        Some(self.max)
    }

    /// Adds another histogram's observations.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    fn to_json(&self) -> Value {
        let ms = |q: f64| self.quantile(q).map(|us| us as f64 / 1000.0);
        json!({
            "count": self.total,
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "p999_ms": ms(0.999),
            "max_ms": (self.total > 0).then(|| self.max as f64 / 1000.0),
        })
    }
}

/// Time spent in one stage of the run loop, summed over partitions.
#[derive(Debug, Clone, Default)]
pub struct StageTime {
    /// `poll`, `decode`, `step <name>`, `sink <name> write`, `sink <name> encode`, `commit`, ...
    pub stage: String,
    /// Wall time spent in it.
    pub time: Duration,
    /// For a step: the host's side of the WASM boundary, included in `time`.
    pub host_boundary: Option<Duration>,
    /// For a step: true if it ran natively.
    pub native: Option<bool>,
}

/// The run report as JSON.
pub fn report_json(pipeline: &str, summary: &crate::engine::RunSummary) -> Value {
    let per_million = |d: Duration| {
        if summary.records == 0 {
            None
        } else {
            Some(d.as_secs_f64() * 1e6 / summary.records as f64)
        }
    };
    let stages: Vec<Value> = summary
        .stages
        .iter()
        .map(|s| {
            json!({
                "stage": s.stage,
                "seconds": s.time.as_secs_f64(),
                "seconds_per_million_records": per_million(s.time),
                "host_boundary_seconds": s.host_boundary.map(|d| d.as_secs_f64()),
                "native": s.native,
            })
        })
        .collect();
    json!({
        "pipeline": pipeline,
        "records": summary.records,
        "rows_out": summary.rows_out,
        "rejected": summary.rejected,
        "undecodable": summary.undecodable,
        "checkpoints": summary.checkpoints,
        "wall_seconds": summary.wall.as_secs_f64(),
        "first_record_seconds": summary.first_record.map(|d| d.as_secs_f64()),
        "stages": stages,
        "latency": {
            "append_to_last_plugin": summary.latency_to_output.to_json(),
            "append_to_commit": summary.latency_to_commit.to_json(),
        },
        "swaps": summary.swaps.iter().map(swap_json).collect::<Vec<_>>(),
    })
}

/// A live swap, applied or refused (epoch `null`: refused before it reached a barrier).
pub fn swap_json(s: &crate::engine::SwapRecord) -> Value {
    json!({
        "epoch": (s.epoch > 0).then_some(s.epoch),
        "changes": s.changes,
        "applied": s.refused.is_none(),
        "refused": s.refused,
        "pause_ms": s.pause.as_secs_f64() * 1e3,
        "commit_wait_ms": s.commit_wait.as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_bucket_error() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record_n(v, 1);
        }
        for (q, exact) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = h.quantile(q).unwrap() as f64;
            assert!(
                (got - exact).abs() / exact < 0.016,
                "q{q}: got {got}, exact {exact}"
            );
        }
        assert_eq!(h.quantile(1.0), Some(100_000));
        assert_eq!(h.count(), 100_000);
    }

    #[test]
    fn small_values_are_exact_and_weights_count() {
        let mut h = Histogram::default();
        h.record_n(3, 98);
        h.record_n(40, 2);
        assert_eq!(h.quantile(0.5), Some(3));
        assert_eq!(h.quantile(0.98), Some(3));
        assert_eq!(h.quantile(0.99), Some(40));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn buckets_cover_the_whole_range() {
        for v in [0, 63, 64, 127, 128, 1 << 20, u64::MAX] {
            let i = bucket(v);
            assert!(i < BUCKETS, "{v} → bucket {i}");
            let mid = value_of(i) as f64;
            assert!(
                v == 0 || (mid - v as f64).abs() / (v as f64) < 0.016,
                "{v} vs {mid}"
            );
        }
    }
}

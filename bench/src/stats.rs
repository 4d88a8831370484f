//! Latency histograms (HdrHistogram, microsecond resolution) and their summary
//! in the JSON the scenarios print.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Highest latency recorded exactly: one hour, in microseconds. Longer values
/// are clamped, which no bounded scenario reaches.
const HIGHEST_US: u64 = 3_600_000_000;

#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Latencies {
        // 3 significant figures: 0.1 % error at any magnitude.
        Latencies(Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(HIGHEST_US)
            .clamp(1, HIGHEST_US);
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    fn ms(&self, quantile: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        round3(self.0.value_at_quantile(quantile) as f64 / 1000.0)
    }

    pub fn p50_ms(&self) -> f64 {
        self.ms(0.50)
    }

    pub fn p99_ms(&self) -> f64 {
        self.ms(0.99)
    }

    pub fn max_ms(&self) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            round3(self.0.max() as f64 / 1000.0)
        }
    }

    /// `{"count", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms"}`.
    pub fn summary(&self) -> Value {
        json!({
            "count": self.count(),
            "p50_ms": self.ms(0.50),
            "p90_ms": self.ms(0.90),
            "p99_ms": self.ms(0.99),
            "p999_ms": self.ms(0.999),
            "max_ms": self.max_ms(),
            "mean_ms": if self.0.is_empty() { 0.0 } else { round3(self.0.mean() / 1000.0) },
        })
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Prints one scenario result: a single JSON line on stdout.
pub fn emit(mut value: Value, label: Option<&str>) {
    if let (Some(label), Value::Object(map)) = (label, &mut value) {
        map.insert("label".into(), Value::from(label));
    }
    println!("{value}");
}

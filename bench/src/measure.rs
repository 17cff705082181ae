//! What a run costs the process (CPU, peak memory) and how results are summarised.

use std::time::{Duration, Instant};

use serde::Serialize;

/// CPU seconds (user + system, every thread) this process used so far.
pub(crate) fn cpu_seconds() -> f64 {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // After the name, field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / 100.0
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory now, in MiB.
pub(crate) fn rss_mib() -> f64 {
    status_kib("VmRSS:").unwrap_or(0) as f64 / 1024.0
}

/// Peak resident memory since the last [`reset_peak_rss`], in MiB.
pub(crate) fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:").unwrap_or(0) as f64 / 1024.0
}

/// Starts measuring the peak resident memory afresh (Linux: `clear_refs` value 5).
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU and peak memory over one measured stretch.
pub(crate) struct Meter {
    cpu: f64,
    started: Instant,
}

impl Meter {
    pub(crate) fn start() -> Self {
        reset_peak_rss();
        Meter {
            cpu: cpu_seconds(),
            started: Instant::now(),
        }
    }

    pub(crate) fn cpu(&self) -> f64 {
        cpu_seconds() - self.cpu
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// One side's throughput run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Throughput {
    pub(crate) messages: u64,
    pub(crate) seconds: f64,
    pub(crate) messages_per_second: f64,
    pub(crate) cpu_seconds_per_million: f64,
    pub(crate) peak_rss_mib: f64,
}

impl Throughput {
    pub(crate) fn new(messages: u64, seconds: f64, cpu: f64) -> Self {
        Throughput {
            messages,
            seconds,
            messages_per_second: messages as f64 / seconds.max(1e-9),
            cpu_seconds_per_million: cpu * 1e6 / messages.max(1) as f64,
            peak_rss_mib: peak_rss_mib(),
        }
    }
}

/// One side's latency run at a fixed offered rate.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Latency {
    pub(crate) rate: f64,
    pub(crate) messages: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

impl Latency {
    pub(crate) fn from_micros(rate: f64, mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            if samples.is_empty() {
                return f64::NAN;
            }
            let i = ((samples.len() - 1) as f64 * q).round() as usize;
            samples[i] as f64 / 1000.0
        };
        Latency {
            rate,
            messages: samples.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
        }
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

//! The standard `process_*` metrics, read from `/proc/self` at scrape time (Linux): CPU
//! time, resident memory, open and allowed descriptors, threads, and the start time (the
//! wall clock when the metrics were made, which is at daemon start; no boot-time lookup).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

pub(super) struct ProcessMetrics {
    cpu: SampledCounter,
    resident: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
}

impl ProcessMetrics {
    pub(super) fn register(r: &mut Registry) -> Self {
        let me = Self {
            cpu: SampledCounter::default(),
            resident: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            threads: Gauge::default(),
        };
        r.register_with_unit("process_cpu", "User and system CPU time spent", Unit::Seconds, me.cpu.clone());
        r.register_with_unit("process_resident_memory", "Resident memory size", Unit::Bytes, me.resident.clone());
        r.register("process_open_fds", "Open file descriptors", me.open_fds.clone());
        r.register("process_max_fds", "The soft limit of open file descriptors", me.max_fds.clone());
        r.register("process_threads", "Threads of the process", me.threads.clone());
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        r.register_with_unit(
            "process_start_time",
            "When the process started, Unix time",
            Unit::Seconds,
            ConstGauge(started),
        );
        me
    }

    pub(super) fn sample(&self) {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some(secs) = cpu_seconds(&stat)
        {
            self.cpu.set(secs);
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(kb) = status_field(&status, "VmRSS:") {
                self.resident.set(kb.saturating_mul(1024));
            }
            if let Some(n) = status_field(&status, "Threads:") {
                self.threads.set(n);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(i64::try_from(dir.count()).unwrap_or(i64::MAX));
        }
        // `None`: unlimited.
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        self.max_fds.set(soft.map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    }
}

/// A gauge fixed at registration.
#[derive(Debug)]
struct ConstGauge(f64);

impl EncodeMetric for ConstGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// A counter the kernel keeps (CPU time): set whole from `/proc` at each scrape, exposed
/// as a counter (`process_cpu_seconds_total`).
#[derive(Clone, Debug, Default)]
struct SampledCounter(Arc<AtomicU64>);

impl SampledCounter {
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
}

impl EncodeMetric for SampledCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&f64::from_bits(self.0.load(Ordering::Relaxed)), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// utime + stime (fields 14 and 15 of /proc/self/stat, after the parenthesised command).
fn cpu_seconds(stat: &str) -> Option<f64> {
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Why 100: the kernel reports these in USER_HZ, which is 100 on every Linux ABI.
    Some((utime + stime) as f64 / 100.0)
}

fn status_field(status: &str, name: &str) -> Option<i64> {
    status.lines().find_map(|l| l.strip_prefix(name)).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_with_spaces_and_parentheses() {
        let stat = "42 (my (odd) cmd) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 1000 10";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(status_field("Name:\tx\nVmRSS:\t  1234 kB\nThreads:\t7\n", "VmRSS:"), Some(1234));
    }
}

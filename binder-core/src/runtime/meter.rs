//! What each input binding counts and times (feature `metrics`), through the `metrics` facade:
//! to bindery's Prometheus recorder when `/metrics` is served, or to whatever recorder the
//! application installed. Without the feature every call here is empty and costs nothing.
//!
//! Every series has the labels `binding`, `destination` and `group` (empty when anonymous):
//! - `bindery_messages_received_total`: messages taken from the broker;
//! - `bindery_messages_handled_total`: handler calls that succeeded;
//! - `bindery_messages_failed_total`: handler calls that failed (each attempt);
//! - `bindery_messages_retried_total`: failed calls tried again after their back-off;
//! - `bindery_messages_dead_lettered_total`: messages the dead-letter destination confirmed;
//! - `bindery_messages_dropped_total`: messages that failed for good with no dead-letter
//!   destination;
//! - `bindery_messages_sent_total`: outputs the broker confirmed;
//! - `bindery_handler_duration_seconds`: histogram of handler calls;
//! - `bindery_processing_duration_seconds`: histogram from receipt to acknowledgement;
//! - `bindery_messages_in_flight`: messages received and not yet settled;
//! - `bindery_consumer_lag`: messages waiting for the group, as the binder tells it, measured
//!   at each scrape (NaN when it could not tell).

#[cfg(feature = "metrics")]
use std::sync::Arc;
#[cfg(feature = "metrics")]
use std::time::Instant;

/// One input binding's meters; empty (and free) without the feature.
#[derive(Clone, Default)]
pub(crate) struct Meter {
    #[cfg(feature = "metrics")]
    meters: Option<Arc<Meters>>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Meter")
    }
}

#[cfg(feature = "metrics")]
struct Meters {
    received: metrics::Counter,
    handled: metrics::Counter,
    failed: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    dropped: metrics::Counter,
    sent: metrics::Counter,
    handler_seconds: metrics::Histogram,
    processing_seconds: metrics::Histogram,
    in_flight: metrics::Gauge,
}

/// When something began, for a meter that times it; empty without the feature.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stamp {
    #[cfg(feature = "metrics")]
    at: Option<Instant>,
}

#[cfg(feature = "metrics")]
impl Stamp {
    fn seconds(self) -> Option<f64> {
        self.at.map(|at| at.elapsed().as_secs_f64())
    }
}

impl Meter {
    /// The meters of the input binding `binding` on `destination` for `group`, registered
    /// with the recorder installed now (none: nothing is recorded).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(binding: &str, destination: &str, group: Option<&str>) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = [
                ("binding", binding.to_owned()),
                ("destination", destination.to_owned()),
                ("group", group.unwrap_or_default().to_owned()),
            ];
            let meters = Meters {
                received: metrics::counter!("bindery_messages_received_total", &labels),
                handled: metrics::counter!("bindery_messages_handled_total", &labels),
                failed: metrics::counter!("bindery_messages_failed_total", &labels),
                retried: metrics::counter!("bindery_messages_retried_total", &labels),
                dead_lettered: metrics::counter!("bindery_messages_dead_lettered_total", &labels),
                dropped: metrics::counter!("bindery_messages_dropped_total", &labels),
                sent: metrics::counter!("bindery_messages_sent_total", &labels),
                handler_seconds: metrics::histogram!("bindery_handler_duration_seconds", &labels),
                processing_seconds: metrics::histogram!(
                    "bindery_processing_duration_seconds",
                    &labels
                ),
                in_flight: metrics::gauge!("bindery_messages_in_flight", &labels),
            };
            Meter {
                meters: Some(Arc::new(meters)),
            }
        }
        #[cfg(not(feature = "metrics"))]
        Meter {}
    }

    /// Now, when something times with it.
    #[inline]
    pub(crate) fn stamp(&self) -> Stamp {
        #[cfg(feature = "metrics")]
        {
            Stamp {
                at: self.meters.as_ref().map(|_| Instant::now()),
            }
        }
        #[cfg(not(feature = "metrics"))]
        Stamp {}
    }

    /// A message was received; it is in flight until the mark is dropped, whichever way it
    /// leaves the binding (settled, handed back, or dropped by a stop that gave up).
    #[inline]
    pub(crate) fn received(&self) -> InFlightMark {
        #[cfg(feature = "metrics")]
        {
            if let Some(meters) = &self.meters {
                meters.received.increment(1);
                meters.in_flight.increment(1.0);
            }
            InFlightMark {
                meters: self.meters.clone(),
            }
        }
        #[cfg(not(feature = "metrics"))]
        InFlightMark {}
    }

    /// A handler call that began at `called` returned, successfully or not.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn returned(&self, called: Stamp, succeeded: bool) {
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.meters {
            if let Some(seconds) = called.seconds() {
                meters.handler_seconds.record(seconds);
            }
            match succeeded {
                true => meters.handled.increment(1),
                false => meters.failed.increment(1),
            }
        }
    }

    #[inline]
    pub(crate) fn retried(&self) {
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.meters {
            meters.retried.increment(1);
        }
    }

    #[inline]
    pub(crate) fn dead_lettered(&self) {
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.meters {
            meters.dead_lettered.increment(1);
        }
    }

    #[inline]
    pub(crate) fn dropped(&self) {
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.meters {
            meters.dropped.increment(1);
        }
    }

    /// `count` outputs were confirmed.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn sent(&self, count: usize) {
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.meters {
            meters.sent.increment(count as u64);
        }
    }

    /// A message received at `received` was acknowledged.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn done(&self, received: Stamp) {
        #[cfg(feature = "metrics")]
        if let (Some(meters), Some(seconds)) = (&self.meters, received.seconds()) {
            meters.processing_seconds.record(seconds);
        }
    }
}

/// Counts its message in `bindery_messages_in_flight` while it lives.
#[derive(Default)]
pub(crate) struct InFlightMark {
    #[cfg(feature = "metrics")]
    meters: Option<Arc<Meters>>,
}

#[cfg(feature = "metrics")]
impl Drop for InFlightMark {
    fn drop(&mut self) {
        if let Some(meters) = &self.meters {
            meters.in_flight.decrement(1.0);
        }
    }
}

/// Sets the consumer lag of an input binding: NaN when its binder could not tell this time,
/// so an old figure never stands for a backlog that may have grown.
#[cfg(feature = "metrics")]
pub(crate) fn record_lag(binding: &super::BindingInfo, lag: Option<u64>) {
    let labels = [
        ("binding", binding.name.clone()),
        ("destination", binding.destination.clone()),
        ("group", binding.group.clone().unwrap_or_default()),
    ];
    metrics::gauge!("bindery_consumer_lag", &labels).set(lag.map_or(f64::NAN, |lag| lag as f64));
}

/// bindery's Prometheus recorder, installed as the process's `metrics` recorder the first
/// time an application serves `/metrics`; every later application in the process shares it.
#[cfg(feature = "metrics")]
pub(crate) fn prometheus() -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static INSTALLED: std::sync::OnceLock<
        Result<metrics_exporter_prometheus::PrometheusHandle, String>,
    > = std::sync::OnceLock::new();
    /// Seconds, from half a millisecond to a minute.
    const BUCKETS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ];
    INSTALLED
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|_| {
                "the application installed a `metrics` recorder of its own, and bindery's metrics go to it".to_owned()
            })?;
            Ok(handle)
        })
        .clone()
}

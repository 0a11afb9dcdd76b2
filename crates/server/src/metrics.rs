//! `GET /metrics`: what the server is doing, in the OpenMetrics text format Prometheus scrapes (through
//! the Prometheus project's own client, `prometheus-client`).
//!
//! Requests, their latency and what they were charged by provider, model, tier and outcome (one count
//! per ledger row); refusals for lack of capacity by tier and reason; each provider's queue by class
//! (`interactive`: the default tier; `background`: flex and batch), with how long jobs waited; and the
//! local engine's step times. Money is counted in whole nano-dollars (the ledger's unit), never as a
//! float.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use domain::Tier;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use providers::schedule::{Priority, Queue, RefusalReason};
use rust_decimal::Decimal;

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    provider: String,
    model: String,
    tier: String,
    /// `succeeded`, `failed` or `refused`.
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpendLabels {
    provider: String,
    model: String,
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    provider: String,
    tier: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    provider: String,
    /// `interactive` or `background`.
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, from 10 ms to about 23 minutes.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 18))
}

/// The server's metrics. Cheap to clone (shared).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Histograms<TierLabels>,
    spend: Family<SpendLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    waiting: Family<QueueLabels, Gauge>,
    running: Family<QueueLabels, Gauge>,
    waits: Histograms<QueueLabels>,
    steps: Histograms<ModelLabels>,
    /// Each provider's queue, read at every scrape.
    queues: Mutex<Vec<(String, Queue)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("imagegate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Image requests by provider, model, tier and how they ended (one per ledger row)",
            requests.clone(),
        );
        let latency: Histograms<TierLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from admission to the ledger row, by tier",
            latency.clone(),
        );
        let spend = Family::<SpendLabels, Counter>::default();
        registry.register(
            "charged_nanodollars",
            "What requests were charged, in nano-USD (1e-9 USD), by provider, model and tier",
            spend.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "capacity_refusals",
            "Background requests (flex, batch) refused for lack of capacity (429 resource_unavailable, not charged)",
            refusals.clone(),
        );
        let waiting = Family::<QueueLabels, Gauge>::default();
        registry.register("queue_waiting", "Requests waiting for their turn, by provider and class", waiting.clone());
        let running = Family::<QueueLabels, Gauge>::default();
        registry.register("queue_running", "Requests running, by provider and class", running.clone());
        let waits: Histograms<QueueLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register("queue_wait_seconds", "How long requests waited for their turn", waits.clone());
        let steps: Histograms<ModelLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register("engine_step_seconds", "Denoising step times of the local engine, by model", steps.clone());
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                latency,
                spend,
                refusals,
                waiting,
                running,
                waits,
                steps,
                queues: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Reads `queue` (of provider `provider`) at every scrape, and observes its waits.
    pub fn watch_queue(&self, provider: &str, queue: &Queue) {
        let waits = self.inner.waits.clone();
        let name = provider.to_owned();
        queue.observe_waits(Arc::new(move |priority, waited| {
            waits
                .get_or_create(&QueueLabels { provider: name.clone(), class: priority.as_str().to_owned() })
                .observe(waited.as_secs_f64());
        }));
        self.inner.queues.lock().unwrap_or_else(PoisonError::into_inner).push((provider.to_owned(), queue.clone()));
    }

    /// One ledger row: a request that ended `status` after `elapsed`, charged `charged` USD.
    pub fn request(&self, provider: &str, model: &str, tier: Tier, status: &str, elapsed: Duration, charged: Decimal) {
        let tier = tier.as_str().to_owned();
        let labels = RequestLabels {
            provider: provider.to_owned(),
            model: model.to_owned(),
            tier: tier.clone(),
            status: status.to_owned(),
        };
        self.inner.requests.get_or_create(&labels).inc();
        self.inner.latency.get_or_create(&TierLabels { tier: tier.clone() }).observe(elapsed.as_secs_f64());
        let nanos = (charged * Decimal::from(1_000_000_000u64)).round();
        if let Ok(nanos) = u64::try_from(nanos)
            && nanos > 0
        {
            let labels = SpendLabels { provider: provider.to_owned(), model: model.to_owned(), tier };
            self.inner.spend.get_or_create(&labels).inc_by(nanos);
        }
    }

    /// A background request refused for lack of capacity.
    pub fn refused(&self, provider: &str, tier: Tier, reason: RefusalReason) {
        let labels = RefusalLabels {
            provider: provider.to_owned(),
            tier: tier.as_str().to_owned(),
            reason: reason.as_str().to_owned(),
        };
        self.inner.refusals.get_or_create(&labels).inc();
    }

    /// A denoising step of `model` took `took`.
    pub fn step(&self, model: &str, took: Duration) {
        self.inner.steps.get_or_create(&ModelLabels { model: model.to_owned() }).observe(took.as_secs_f64());
    }

    /// The exposition, with every queue read now.
    pub fn render(&self) -> String {
        let queues = self.inner.queues.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for (provider, queue) in &queues {
            let s = queue.snapshot();
            for (priority, waiting, running) in [
                (Priority::Interactive, s.waiting_interactive, s.running_interactive),
                (Priority::Background, s.waiting_background, s.running_background),
            ] {
                let labels = QueueLabels { provider: provider.clone(), class: priority.as_str().to_owned() };
                self.inner.waiting.get_or_create(&labels).set(i64::try_from(waiting).unwrap_or(i64::MAX));
                self.inner.running.get_or_create(&labels).set(i64::try_from(running).unwrap_or(i64::MAX));
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

//! One admitted image job, run apart from its HTTP connection, and billed for what it delivered or
//! incurred.
//!
//! [`execute`] does the accounting that must happen before any provider runs (model list, rate limit,
//! idempotency, the worst case held), then hands the job to a task of its own and waits for its answer.
//! A client that goes away therefore stops nothing it would still be billed for:
//! - the job's provider is told ([`CancellationToken`]): the local engine stops at the next step and
//!   reports the compute time it used; an upstream carries on, since it bills what it started, and its
//!   answer is read to the end (within [`ABANDONED_DRAIN_LIMIT`]) to learn that bill;
//! - the request is then charged what was incurred (the upstream's usage, the compute time), or, when
//!   that can never be known (the upstream did not finish in time), what is left of its hold; its ledger
//!   row says `client_disconnected` and where the cost came from.
//!
//! A stream is charged image by image as its completed events are produced ([`accounts::Ticket::charge`]),
//! each event showing its own cost; the events add up to the ledger's charge. A client that stops
//! reading for [`CLIENT_STALL_LIMIT`] counts as gone. The ledger row is written before the response ends
//! (the last byte of a stream, or the JSON response), so a client that has its answer finds it recorded.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::ApiError;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use domain::{ImageJob, ImageOptions, ImageResult, ModelFamily, Resolved, ServiceTier, StreamEvent, Tier};
use futures_util::StreamExt;
use ledger::{CostSource, RequestStatus};
use pricing::Cost;
use providers::schedule::{Place, Priority, Refusal, RefusalReason};
use providers::{CancellationToken, EventStream, ProviderError, ProviderOutput};
use rust_decimal::Decimal;
use tokio::sync::{mpsc, oneshot};

use crate::accounts::{self, Admit, Caller, End, RequestInfo, Ticket};
use crate::billing::{self, StreamBill};
use crate::routing::Route;
use crate::{AppState, HttpError};

/// The cost of a billed response, in USD, as a decimal.
pub const COST_HEADER: &str = "x-imagegate-cost-usd";

/// `MODEL@PROVIDER` that ran a billed response, after aliases and replacements.
pub const SERVED_BY_HEADER: &str = "x-imagegate-served-by";

/// The service tier a billed response ran and was billed at.
pub const SERVICE_TIER_HEADER: &str = "x-imagegate-service-tier";

/// How long a job whose client went away is still read, to learn what its upstream billed; beyond it,
/// what is left of its hold is charged (the bill cannot be known).
pub const ABANDONED_DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// A stream client that takes no event for this long is treated as gone.
pub const CLIENT_STALL_LIMIT: Duration = Duration::from_secs(300);

/// Who asked for a job, for its accounting.
pub struct Who {
    pub caller: Option<Caller>,
    /// The model name as the client gave it (what key model lists name).
    pub model: String,
    /// The request's content, to tell an idempotent retry from a reused key; only computed when the
    /// request has an `Idempotency-Key` to check it against.
    pub fingerprint: Option<String>,
    /// Where the response's images are stored and linked (`response_format=url`), if they are.
    pub links: Option<crate::links::Links>,
    /// The tier it runs at when the server decides it (a batch's line); `None`: the request's
    /// `service_tier`.
    pub tier: Option<Tier>,
}

/// The tier a request runs at: what it asked for; with `auto` or none, its key's setting (the default
/// tier unless the key says `flex`).
pub fn tier_of(options: &ImageOptions, caller: Option<&Caller>) -> Tier {
    match options.service_tier {
        Some(ServiceTier::Flex) => Tier::Flex,
        Some(ServiceTier::Default) => Tier::Default,
        Some(ServiceTier::Auto) | None => match caller.and_then(|c| c.0.service_tier.as_deref()) {
            Some("flex") => Tier::Flex,
            _ => Tier::Default,
        },
    }
}

/// The priority of a tier's work in its provider's queue.
pub fn priority(tier: Tier) -> Priority {
    if tier.is_background() { Priority::Background } else { Priority::Interactive }
}

/// Background work its provider cannot take in time: OpenAI's flex answer (429 "Resource
/// Unavailable"), with when to retry. Nothing was held or charged for it.
pub fn resource_unavailable(provider: &str, tier: Tier, refusal: &Refusal) -> ApiError {
    let retry = refusal.retry_after.as_secs().max(1);
    let why = match refusal.reason {
        RefusalReason::QueueFull => {
            format!("the {tier} queue of provider '{provider}' is full ({} requests waiting)", refusal.waiting)
        }
        RefusalReason::WaitTooLong => format!(
            "the expected wait on provider '{provider}' ({} s) is longer than its {tier} tier allows",
            refusal.expected_wait.as_secs()
        ),
    };
    let mut e = ApiError::new(
        429,
        "requests",
        None,
        Some("resource_unavailable"),
        format!(
            "Resource Unavailable: {why}. Nothing was charged. Retry in about {retry} s, or send the request with service_tier 'default'."
        ),
    );
    e.retry_after = Some(retry);
    e
}

/// Admits, holds, runs and bills `job`, and answers with its response: JSON, or server-sent events
/// when streaming. Every billed response carries its cost: the `x-imagegate-cost-usd` header and the
/// `imagegate` body extension; a stream carries it in each completed event.
pub async fn execute(
    state: &AppState,
    mut route: Route,
    job: ImageJob,
    headers: &HeaderMap,
    who: Who,
) -> Result<Response, HttpError> {
    let request_id = request_id(headers).to_owned();
    let tier = who.tier.unwrap_or_else(|| tier_of(job.options(), who.caller.as_ref()));
    route.tier = tier;
    if let Some(fallback) = route.fallback.as_mut() {
        fallback.tier = tier;
    }
    let job = Arc::new(job);
    // The prompt's tokens, counted once, off the async runtime.
    let text_tokens = {
        let job = Arc::clone(&job);
        tokio::task::spawn_blocking(move || billing::count_prompt_tokens(&job))
            .await
            .map_err(|_| HttpError(ApiError::internal(&request_id)))?
    };
    let options = job.options().clone();
    let provider = route.provider.name().to_owned();
    let place;
    // Before any provider runs: the key's model list, rate limit, idempotency, and the worst case held.
    let ticket = match &state.ledger {
        Some(ledger) => {
            let info = RequestInfo {
                request_id: request_id.clone(),
                operation: job.kind().operation(),
                model: route.upstream_model.clone(),
                requested_model: who.model.clone(),
                provider: provider.clone(),
                n: u32::from(options.n.max(1)),
                billing_basis: billing_basis(state, &route.upstream_model),
                tier,
            };
            match accounts::admit(
                ledger,
                &state.metrics,
                who.caller.as_ref(),
                headers,
                info,
                who.fingerprint.as_deref(),
            )
            .await?
            {
                Admit::Replay(stored) => {
                    let mut response = json_response(stored.body.into_bytes());
                    response.headers_mut().insert(accounts::REPLAYED_HEADER, HeaderValue::from_static("true"));
                    if let Some(value) = stored.cost_usd.and_then(|c| HeaderValue::from_str(&c).ok()) {
                        response.headers_mut().insert(COST_HEADER, value);
                    }
                    if let Some(value) = stored.request_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
                        response.headers_mut().insert(accounts::REPLAY_OF_HEADER, value);
                    }
                    return Ok(response);
                }
                Admit::Go(admission) => {
                    // Its place in the provider's queue before anything is held: background work that
                    // cannot be served in time is refused now, with nothing held or charged.
                    place = match take_place(state, &route) {
                        Ok(p) => p,
                        Err(e) => return Err(HttpError(admission.refused(e).await)),
                    };
                    let ttl = state.reservation_ttl_ms;
                    let mut worst = billing::worst_case(state, &route, &job, text_tokens, ttl);
                    // A route that may fall back to a replacement holds the dearer of the two.
                    if let (Ok(w), Some(fallback)) = (&worst, &route.fallback)
                        && let Ok(f) = billing::worst_case(state, fallback, &job, text_tokens, ttl)
                        && f.total > w.total
                    {
                        worst = Ok(f);
                    }
                    Some(admission.reserve(worst).await?)
                }
            }
        }
        None => {
            place = take_place(state, &route).map_err(HttpError)?;
            None
        }
    };
    let run = Run {
        state: state.clone(),
        place: Some(place),
        route,
        job,
        options,
        ticket,
        text_tokens,
        request_id: request_id.clone(),
        abandoned: CancellationToken::new(),
        links: who.links,
    };
    let (reply, answer) = oneshot::channel();
    tokio::spawn(run.go(reply));
    match answer.await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(HttpError(e)),
        // The job's task ended without answering (it panicked): its ticket released the hold.
        Err(_) => Err(HttpError(ApiError::internal(&request_id))),
    }
}

type Reply = oneshot::Sender<Result<Response, ApiError>>;

/// A place in `route`'s provider queue at its tier's priority, or the refusal (counted in the metrics).
fn take_place(state: &AppState, route: &Route) -> Result<Place, ApiError> {
    route.provider.queue().place(priority(route.tier)).map_err(|refusal| {
        state.metrics.refused(route.provider.name(), route.tier, refusal.reason);
        resource_unavailable(route.provider.name(), route.tier, &refusal)
    })
}

/// A job on its own task.
struct Run {
    state: AppState,
    /// The job's place in its provider's queue, taken before its hold (used by the first attempt).
    place: Option<Place>,
    route: Route,
    job: Arc<ImageJob>,
    options: ImageOptions,
    ticket: Option<Ticket>,
    text_tokens: u64,
    request_id: String,
    /// Cancelled when the client went away.
    abandoned: CancellationToken,
    links: Option<crate::links::Links>,
}

/// How a stream's images were billed.
struct Tally {
    costs: Vec<Cost>,
    source: CostSource,
    images: u32,
    quality: Option<String>,
    size: Option<String>,
    /// The provider's error, if the stream ended with one.
    failed: Option<ApiError>,
}

impl Run {
    async fn go(mut self, mut reply: Reply) {
        let mut output = self.attempt(&mut reply).await;
        // The provider has no such model (one it shut down): its replacement runs instead, or the
        // client is told of the shutdown.
        if let Err(ProviderError::Upstream { status: 404, body, .. }) = &output
            && body.code.as_deref() == Some("model_not_found")
        {
            // A client already gone gets no replacement run for it.
            let fallback = self.route.fallback.take().filter(|_| !self.abandoned.is_cancelled());
            if let Some(fallback) = fallback {
                tracing::warn!(
                    request_id = %self.request_id,
                    model = %self.route.upstream_model,
                    provider = %self.route.provider.name(),
                    served_by = %fallback.served_by(),
                    "the provider has no such model: its replacement serves the request"
                );
                self.route = *fallback;
                self.place = None;
                let basis = billing_basis(&self.state, &self.route.upstream_model);
                if let Some(t) = self.ticket.as_mut() {
                    t.served_by(&self.route.upstream_model, self.route.provider.name(), basis);
                }
                output = self.attempt(&mut reply).await;
            } else if let Some(gone) = self.state.catalog.shut_down_refusal(&self.route.upstream_model) {
                output = Err(ProviderError::Api(gone));
            }
        }
        match output {
            Err(e) => self.failed(e, reply).await,
            Ok(ProviderOutput::Complete(result)) => self.complete(result, reply).await,
            Ok(ProviderOutput::Stream(events)) => self.stream(events, reply).await,
        }
    }

    /// Runs the provider once. While it works, the client is watched: one that goes away abandons the
    /// job, which still runs to its end here (the local engine stops early, an upstream does not).
    async fn attempt(&mut self, reply: &mut Reply) -> Result<ProviderOutput, ProviderError> {
        let provider = Arc::clone(&self.route.provider);
        let place = match self.place.take() {
            Some(place) => place,
            None => take_place(&self.state, &self.route).map_err(ProviderError::Api)?,
        };
        let run = provider.run(&self.route.upstream_model, &self.job, place, &self.abandoned);
        tokio::pin!(run);
        tokio::select! {
            output = &mut run => output,
            () = reply.closed() => {
                self.abandoned.cancel();
                match tokio::time::timeout(ABANDONED_DRAIN_LIMIT, run).await {
                    Ok(output) => output,
                    Err(_) => Err(ProviderError::Timeout(ABANDONED_DRAIN_LIMIT)),
                }
            }
        }
    }

    fn family(&self) -> ModelFamily {
        self.route.family
    }

    /// The provider failed, or stopped because the client went away.
    async fn failed(mut self, e: ProviderError, reply: Reply) {
        let gone = self.abandoned.is_cancelled();
        let Some(ticket) = self.ticket.take() else {
            let _ = reply.send(Err(provider_error(e, self.route.provider.name(), &self.request_id)));
            return;
        };
        let (cost, source) = match &e {
            // Never started (the client left while it waited for its turn): nothing was incurred.
            ProviderError::Cancelled { compute_ms: 0 } => (None, CostSource::None),
            // The local engine stopped early: the compute time it used is what it incurred.
            ProviderError::Cancelled { compute_ms } => self.compute_used(*compute_ms, &ticket),
            // Abandoned, and the upstream never said whether it finished: what it billed cannot be
            // known, so the hold is charged.
            ProviderError::Timeout(_) if gone => {
                let worst = billing::worst_case_charge(
                    ticket.worst_case(),
                    ticket.remaining(),
                    "the client went away and the upstream did not answer in time",
                );
                (Some(worst), CostSource::WorstCase)
            }
            _ => (None, CostSource::None),
        };
        let error = provider_error(e, self.route.provider.name(), &self.request_id);
        let code = if gone { "client_disconnected".to_owned() } else { error_code(&error) };
        let end = End {
            status: RequestStatus::Failed,
            error_code: Some(&code),
            cost: cost.as_ref(),
            cost_source: source,
            images: 0,
            quality: None,
            size: None,
            response: None,
        };
        ticket.finish(end).await;
        let _ = reply.send(Err(error));
    }

    /// A priced cost capped at what the ticket still holds; an unpricable one charges the hold.
    /// What a local job that stopped early incurred: the compute time it used, priced.
    fn compute_used(&self, compute_ms: u64, ticket: &Ticket) -> (Option<Cost>, CostSource) {
        let resolved = Resolved::default().fill_from(&self.options, self.family());
        let text_tokens = self.text_tokens;
        let priced =
            billing::bill(&self.state, &self.route, &self.job, &resolved, 0, None, Some(compute_ms), text_tokens);
        self.priced(priced, ticket, "the compute time used could not be priced")
    }

    fn priced(
        &self,
        priced: Result<Cost, pricing::PriceError>,
        ticket: &Ticket,
        why: &str,
    ) -> (Option<Cost>, CostSource) {
        match priced {
            Ok(c) => {
                let (c, source) = billing::cap(c, ticket.remaining());
                (Some(c), source)
            }
            Err(e) => {
                // Never a gift: what ran is charged at the worst case held for it.
                tracing::error!(request_id = %self.request_id, model = %self.route.upstream_model, error = %e, "could not price a served request; charging its worst case");
                (Some(billing::worst_case_charge(ticket.worst_case(), ticket.remaining(), why)), CostSource::WorstCase)
            }
        }
    }

    async fn complete(mut self, mut result: ImageResult, reply: Reply) {
        // The bill (and the ledger row) fills what the provider did not report from the request, as
        // `fill_from` documents; the response shows only what the provider reported: a setting it
        // left out is left out, never invented.
        let billed = result.resolved.fill_from(&self.options, self.family());
        if result.created == 0 {
            result.created = now();
        }
        let images = result.images.len() as u64;
        let priced = billing::bill(
            &self.state,
            &self.route,
            &self.job,
            &billed,
            images,
            result.usage,
            result.compute_ms,
            self.text_tokens,
        );
        let ticket = self.ticket.take();
        let (cost, source) = match &ticket {
            Some(t) => self.priced(priced, t, "the result could not be priced"),
            None => match priced {
                Ok(c) => (Some(c), CostSource::Priced),
                Err(e) => {
                    tracing::error!(request_id = %self.request_id, error = %e, "could not price a served request");
                    (None, CostSource::None)
                }
            },
        };
        // A provider that reports no usage gets imagegate's count in the response, marked as counted
        // in the cost extension (`usage_source`).
        if result.usage.is_none()
            && let Some(c) = &cost
        {
            result.usage = c.usage;
        }
        if let Some(links) = &self.links {
            let format = billed.output_format.unwrap_or(domain::OutputFormat::Png);
            crate::links::store(&self.state, links, &mut result, format, &self.request_id).await;
        }
        let extension = cost.as_ref().map(|c| billing::cost_json(&self.route, c));
        let body = api::images_response_json(&result, self.family(), extension.as_ref());
        let outcome = match ticket {
            Some(t) => {
                let r = &billed;
                let gone = self.abandoned.is_cancelled() || reply.is_closed();
                let end = End {
                    status: RequestStatus::Succeeded,
                    error_code: gone.then_some("client_disconnected"),
                    cost: cost.as_ref(),
                    cost_source: source,
                    images: u32::try_from(images).unwrap_or(u32::MAX),
                    quality: r.quality.map(|q| q.to_string()),
                    size: r.size.map(|s| s.to_string()),
                    response: Some(&body),
                };
                t.finish(end).await
            }
            None => accounts::Outcome::default(),
        };
        let mut response = json_response(body);
        if let Some(c) = &cost
            && let Ok(value) = HeaderValue::from_str(&c.total_string())
        {
            response.headers_mut().insert(COST_HEADER, value);
        }
        self.served_by_header(&mut response);
        if outcome.over_soft_limit {
            response
                .headers_mut()
                .insert(accounts::BUDGET_WARNING_HEADER, HeaderValue::from_static("soft budget exceeded"));
        }
        let _ = reply.send(Ok(response));
    }

    /// Says what ran: `x-imagegate-served-by`, and `x-imagegate-service-tier` (the tier it ran and is
    /// billed at).
    fn served_by_header(&self, response: &mut Response) {
        if let Ok(value) = HeaderValue::from_str(&self.route.served_by()) {
            response.headers_mut().insert(SERVED_BY_HEADER, value);
        }
        response.headers_mut().insert(SERVICE_TIER_HEADER, HeaderValue::from_static(self.route.tier.as_str()));
    }

    async fn stream(mut self, mut events: EventStream, reply: Reply) {
        let (tx, rx) = mpsc::channel::<Event>(1);
        let body = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<Event, Infallible>);
        let mut response = Sse::new(body).into_response();
        self.served_by_header(&mut response);
        if reply.send(Ok(response)).is_err() {
            self.abandoned.cancel();
        }
        let kind = self.job.kind();
        let n = u32::from(self.options.n.max(1));
        let mut bill = StreamBill::default();
        let mut tally =
            Tally { costs: Vec::new(), source: CostSource::None, images: 0, quality: None, size: None, failed: None };
        let mut cancelled_compute = None;
        let mut unknown = false;
        let mut drain_until = None;
        loop {
            if self.abandoned.is_cancelled() && drain_until.is_none() {
                drain_until = Some(tokio::time::Instant::now() + ABANDONED_DRAIN_LIMIT);
            }
            let next = match drain_until {
                // A client that goes away is noticed at once, not at the next event.
                None => tokio::select! {
                    next = events.next() => next,
                    () = tx.closed() => {
                        self.abandoned.cancel();
                        continue;
                    }
                },
                Some(deadline) => match tokio::time::timeout_at(deadline, events.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        unknown = true;
                        break;
                    }
                },
            };
            let Some(item) = next else {
                // The provider's stream ended before its images: say so, rather than end in silence.
                if tally.images < n && !self.abandoned.is_cancelled() {
                    let error = ApiError::new(
                        502,
                        "server_error",
                        None,
                        Some("upstream_stream_incomplete"),
                        format!(
                            "The provider '{}' ended the stream after {} of {n} images.",
                            self.route.provider.name(),
                            tally.images
                        ),
                    );
                    self.send(&tx, Event::default().event("error").data(api::stream_error_json(&error.body))).await;
                    tally.failed = Some(error);
                }
                break;
            };
            let event = match item {
                Ok(event) => resolve_event(event, &self.options),
                Err(ProviderError::Cancelled { compute_ms }) => {
                    cancelled_compute = Some(compute_ms);
                    break;
                }
                Err(e) => {
                    // An abandoned stream whose upstream went silent: its bill cannot be known.
                    unknown = self.abandoned.is_cancelled() && matches!(e, ProviderError::Timeout(_));
                    let error = provider_error(e, self.route.provider.name(), &self.request_id);
                    if !self.abandoned.is_cancelled() {
                        let data = api::stream_error_json(&error.body);
                        self.send(&tx, Event::default().event("error").data(data)).await;
                    }
                    tally.failed = Some(error);
                    break;
                }
            };
            let mut event = event;
            let extension = match &mut event {
                StreamEvent::Completed { resolved, usage, compute_ms, .. } => {
                    let billed = resolved.fill_from(&self.options, self.family());
                    let priced =
                        bill.next(&self.state, &self.route, &self.job, &billed, *usage, *compute_ms, self.text_tokens);
                    let (cost, source) = match &self.ticket {
                        Some(t) => {
                            let share = t.worst_case().total / Decimal::from(n);
                            match priced {
                                Ok(c) => {
                                    let (c, source) = billing::cap(c, t.remaining());
                                    (Some(c), source)
                                }
                                Err(e) => {
                                    tracing::error!(request_id = %self.request_id, error = %e, "could not price a streamed image; charging its share of the worst case");
                                    let c = billing::worst_case_charge(
                                        t.worst_case(),
                                        share.min(t.remaining()),
                                        "the image could not be priced",
                                    );
                                    (Some(c), CostSource::WorstCase)
                                }
                            }
                        }
                        None => (priced.ok(), CostSource::Priced),
                    };
                    // As in a JSON response: imagegate's count when the provider reports none.
                    if usage.is_none() {
                        *usage = cost.as_ref().and_then(|c| c.usage);
                    }
                    if let (Some(t), Some(c)) = (self.ticket.as_mut(), &cost) {
                        t.charge(c.total, 1).await;
                    }
                    tally.images += 1;
                    tally.quality = billed.quality.map(|q| q.to_string());
                    tally.size = billed.size.map(|s| s.to_string());
                    tally.source = worse(tally.source, source);
                    let extension = cost.as_ref().map(|c| billing::cost_json(&self.route, c));
                    tally.costs.extend(cost);
                    extension
                }
                StreamEvent::Partial { .. } => None,
            };
            if !self.abandoned.is_cancelled() {
                let (name, data) = api::stream_event_json(kind, &event, extension.as_ref());
                self.send(&tx, Event::default().event(name).data(data)).await;
            }
        }
        self.finish_stream(tally, n, cancelled_compute, unknown).await;
        // The ledger row is written: now the client sees the stream end.
        drop(tx);
    }

    /// Hands an event to the client; a client that is gone or stalled abandons the job.
    async fn send(&self, tx: &mpsc::Sender<Event>, event: Event) {
        match tokio::time::timeout(CLIENT_STALL_LIMIT, tx.send(event)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => self.abandoned.cancel(),
        }
    }

    async fn finish_stream(mut self, mut tally: Tally, n: u32, cancelled_compute: Option<u64>, unknown: bool) {
        let Some(ticket) = self.ticket.take() else { return };
        let gone = self.abandoned.is_cancelled();
        // What the provider incurred beyond the images it delivered.
        if let Some(compute_ms) = cancelled_compute {
            let (cost, source) = self.compute_used(compute_ms, &ticket);
            tally.source = worse(tally.source, source);
            tally.costs.extend(cost);
        }
        if unknown && tally.images < n {
            let charged: Decimal = tally.costs.iter().map(|c| c.total).sum();
            let left = (ticket.worst_case().total - charged).max(Decimal::ZERO);
            let why = "the client went away and the upstream did not finish in time";
            tally.costs.push(billing::worst_case_charge(ticket.worst_case(), left, why));
            tally.source = worse(tally.source, CostSource::WorstCase);
        }
        let total = billing::sum(&tally.costs);
        let status = if tally.images >= n && tally.failed.is_none() && cancelled_compute.is_none() {
            RequestStatus::Succeeded
        } else {
            RequestStatus::Failed
        };
        let code = match (&tally.failed, gone) {
            (_, true) => Some("client_disconnected".to_owned()),
            (Some(error), false) => Some(error_code(error)),
            (None, false) => None,
        };
        let end = End {
            status,
            error_code: code.as_deref(),
            cost: total.as_ref(),
            cost_source: tally.source,
            images: tally.images,
            quality: tally.quality,
            size: tally.size,
            response: None,
        };
        ticket.finish(end).await;
    }
}

/// The less reassuring of two cost sources, for a row made of several charges.
fn worse(a: CostSource, b: CostSource) -> CostSource {
    let rank = |s: CostSource| match s {
        CostSource::None => 0,
        CostSource::Priced => 1,
        CostSource::Capped => 2,
        CostSource::WorstCase => 3,
    };
    if rank(b) > rank(a) { b } else { a }
}

fn error_code(error: &ApiError) -> String {
    error.body.code.clone().unwrap_or_else(|| error.body.kind.clone())
}

/// A provider's event as the client sees it: settings it did not report are what the request asked
/// (`auto` stays `auto`), never guessed; the bill fills them its own way (`fill_from`).
fn resolve_event(event: StreamEvent, options: &ImageOptions) -> StreamEvent {
    match event {
        StreamEvent::Partial { b64_json, partial_image_index, created_at, resolved } => StreamEvent::Partial {
            b64_json,
            partial_image_index,
            created_at: if created_at == 0 { now() } else { created_at },
            resolved: resolved.or_as_asked(options),
        },
        StreamEvent::Completed { b64_json, created_at, resolved, usage, compute_ms } => StreamEvent::Completed {
            b64_json,
            created_at: if created_at == 0 { now() } else { created_at },
            resolved: resolved.or_as_asked(options),
            usage,
            compute_ms,
        },
    }
}

/// What a client sees of a provider failure. Upstream errors pass through with their status and
/// envelope, except credential failures: those are this server's configuration, not the client's key.
pub fn provider_error(e: ProviderError, provider: &str, request_id: &str) -> ApiError {
    match e {
        ProviderError::Upstream { status: status @ (401 | 403), body, .. } => {
            tracing::error!(provider, status, message = %body.message, "the upstream rejected this server's credentials");
            ApiError::new(
                502,
                "server_error",
                None,
                Some("upstream_auth_failed"),
                format!(
                    "The upstream provider '{provider}' rejected this server's credentials (HTTP {status}); the server's operator must fix its API key."
                ),
            )
        }
        ProviderError::Upstream { status, body, retry_after } => ApiError { status, body, retry_after },
        ProviderError::Api(e) => e,
        ProviderError::Timeout(d) => {
            ApiError::upstream_unavailable(504, provider, &format!("did not answer within {} s", d.as_secs()))
        }
        ProviderError::Connection(detail) => {
            tracing::warn!(provider, %detail, request_id, "upstream connection failed");
            ApiError::upstream_unavailable(502, provider, "could not be reached, or the connection broke")
        }
        ProviderError::InvalidResponse(detail) => ApiError::new(
            502,
            "server_error",
            None,
            Some("upstream_invalid_response"),
            format!("The upstream provider '{provider}' sent a malformed response: {detail}"),
        ),
        ProviderError::Cancelled { .. } => ApiError::new(
            499,
            "invalid_request_error",
            None,
            Some("cancelled"),
            "The request was cancelled because its client went away.".to_owned(),
        ),
    }
}

/// How `model` is billed (`tokens`, `per_image`, ...), for its ledger row; `unpriced` without a price.
fn billing_basis(state: &AppState, model: &str) -> &'static str {
    state.prices.model(model).map_or("unpriced", |p| p.billing_basis.as_str())
}

pub fn request_id(headers: &HeaderMap) -> &str {
    headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("unknown")
}

pub fn json_response(body: Vec<u8>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

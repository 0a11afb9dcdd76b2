//! A provider's capacity, shared between interactive work (the default tier) and background work
//! (flex and batch) so that background work only ever uses what interactive work leaves.
//!
//! Every job takes a [`Place`] in its provider's [`Queue`] before anything is held against a budget:
//! background work that would wait too long is refused there at once ([`Refusal`]), with nothing
//! reserved or charged. A place becomes a [`Permit`] when the job may run ([`Place::ready`]):
//! - interactive work runs as soon as fewer than `capacity` jobs run (or at once, on a provider that
//!   orders and preempts its own work: the local engine runs interactive work between the steps of a
//!   background job);
//! - background work runs, first come first served, only when fewer than `capacity` jobs run and no
//!   interactive job waits.
//!
//! The queue also measures how long jobs hold their permit, to tell a refused client when to retry and
//! to refuse background work whose expected wait is beyond its limit.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How urgent a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// The default tier: runs before any waiting background work.
    Interactive,
    /// Flex and batch: runs when interactive work leaves room, and may be refused.
    Background,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Background => "background",
        }
    }
}

/// The limits of one provider's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Jobs that run at once.
    pub capacity: usize,
    /// Background jobs that may wait; one more that cannot start at once is refused.
    pub background_queue: usize,
    /// A background job whose expected wait is longer is refused.
    pub max_background_wait: Duration,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits { capacity: 16, background_queue: 64, max_background_wait: Duration::from_secs(600) }
    }
}

/// Why background work was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// `background_queue` jobs already wait.
    QueueFull,
    /// The expected wait is beyond `max_background_wait`.
    WaitTooLong,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::QueueFull => "queue_full",
            RefusalReason::WaitTooLong => "wait_too_long",
        }
    }
}

/// Background work refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    /// Background jobs waiting when it was refused.
    pub waiting: usize,
    /// The expected wait it was refused for (or would have had).
    pub expected_wait: Duration,
    /// When to try again: the expected wait, at least a second.
    pub retry_after: Duration,
}

/// What a queue holds now, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub waiting_interactive: usize,
    pub waiting_background: usize,
    pub running_interactive: usize,
    pub running_background: usize,
}

/// One provider's queue. Cheap to clone (shared).
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

/// Told how long each job waited for its turn.
pub type WaitObserver = Arc<dyn Fn(Priority, Duration) + Send + Sync>;

struct Shared {
    limits: QueueLimits,
    on_start: std::sync::OnceLock<WaitObserver>,
    /// Interactive work is not held back by `capacity`: the provider orders it itself.
    interactive_unbounded: bool,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    waiting_interactive: usize,
    /// Background places in arrival order.
    waiting_background: VecDeque<u64>,
    running_interactive: usize,
    running_background: usize,
    next_id: u64,
    /// Mean time a permit is held, exponentially weighted; `None` before the first job.
    mean_run: Option<Duration>,
}

impl State {
    fn running(&self) -> usize {
        self.running_interactive + self.running_background
    }
}

impl Queue {
    /// A queue running `limits.capacity` jobs at once.
    pub fn new(limits: QueueLimits) -> Queue {
        Queue::build(limits, false)
    }

    /// A queue for a provider that orders interactive work itself and runs it between the steps of a
    /// background job: interactive work is never held here; background work runs one job at a time
    /// (`limits.capacity`), only when no interactive job is queued or running.
    pub fn preemptive(limits: QueueLimits) -> Queue {
        Queue::build(limits, true)
    }

    fn build(limits: QueueLimits, interactive_unbounded: bool) -> Queue {
        let limits = QueueLimits { capacity: limits.capacity.max(1), ..limits };
        Queue {
            shared: Arc::new(Shared {
                limits,
                interactive_unbounded,
                on_start: std::sync::OnceLock::new(),
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    /// Tells `observer` how long every job waited for its turn from now on (the first observer set
    /// stays; later ones are ignored).
    pub fn observe_waits(&self, observer: WaitObserver) {
        let _ = self.shared.on_start.set(observer);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a handful of counters, each update complete: a panic elsewhere cannot leave
        // it half-written.
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a job of `priority`, or for background work that cannot be served in time, the
    /// refusal. Dropping the place (or its permit) gives it back.
    pub fn place(&self, priority: Priority) -> Result<Place, Refusal> {
        let mut s = self.state();
        let id = s.next_id;
        s.next_id += 1;
        match priority {
            Priority::Interactive => s.waiting_interactive += 1,
            Priority::Background => {
                let limits = self.shared.limits;
                let waiting = s.waiting_background.len();
                let expected_wait = self.expected_wait(&s);
                // A job that can start at once never waits in the queue.
                let must_wait = s.running() >= limits.capacity || s.waiting_interactive > 0 || waiting > 0;
                let reason = if must_wait && waiting >= limits.background_queue {
                    Some(RefusalReason::QueueFull)
                } else if expected_wait > limits.max_background_wait {
                    Some(RefusalReason::WaitTooLong)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let retry_after = expected_wait.max(Duration::from_secs(1));
                    return Err(Refusal { reason, waiting, expected_wait, retry_after });
                }
                s.waiting_background.push_back(id);
            }
        }
        Ok(Place { queue: self.clone(), priority, id, taken: false })
    }

    /// How long a background job placed now would wait: the jobs ahead of it (running, and every job
    /// waiting), in rounds of `capacity`, at the mean run time.
    fn expected_wait(&self, s: &State) -> Duration {
        let Some(mean) = s.mean_run else { return Duration::ZERO };
        let ahead = s.running() + s.waiting_interactive + s.waiting_background.len();
        let capacity = self.shared.limits.capacity;
        let rounds = if ahead < capacity { 0 } else { (ahead - capacity + 1).div_ceil(capacity) };
        mean.saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        let s = self.state();
        QueueSnapshot {
            waiting_interactive: s.waiting_interactive,
            waiting_background: s.waiting_background.len(),
            running_interactive: s.running_interactive,
            running_background: s.running_background,
        }
    }

    /// Whether the place `id` of `priority` may run now (and if so, it runs).
    fn try_start(&self, priority: Priority, id: u64) -> bool {
        let mut s = self.state();
        let capacity = self.shared.limits.capacity;
        let go = match priority {
            Priority::Interactive => self.shared.interactive_unbounded || s.running() < capacity,
            Priority::Background => {
                s.running() < capacity && s.waiting_interactive == 0 && s.waiting_background.front() == Some(&id)
            }
        };
        if !go {
            return false;
        }
        match priority {
            Priority::Interactive => {
                s.waiting_interactive -= 1;
                s.running_interactive += 1;
            }
            Priority::Background => {
                s.waiting_background.pop_front();
                s.running_background += 1;
            }
        }
        true
    }

    fn leave_waiting(&self, priority: Priority, id: u64) {
        let mut s = self.state();
        match priority {
            Priority::Interactive => s.waiting_interactive = s.waiting_interactive.saturating_sub(1),
            Priority::Background => s.waiting_background.retain(|w| *w != id),
        }
        drop(s);
        self.shared.changed.notify_waiters();
    }

    fn finish(&self, priority: Priority, held: Duration) {
        let mut s = self.state();
        match priority {
            Priority::Interactive => s.running_interactive = s.running_interactive.saturating_sub(1),
            Priority::Background => s.running_background = s.running_background.saturating_sub(1),
        }
        // A quarter of each new run: quick to follow a change of model or load, steady enough.
        s.mean_run = Some(match s.mean_run {
            None => held,
            Some(mean) => (mean * 3 + held) / 4,
        });
        drop(s);
        self.shared.changed.notify_waiters();
    }
}

/// A job's place in its provider's queue, not yet running.
pub struct Place {
    queue: Queue,
    priority: Priority,
    id: u64,
    taken: bool,
}

impl Place {
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Waits for the job's turn. Cancel-safe: a dropped wait gives the place back.
    pub async fn ready(mut self) -> Permit {
        let waited = Instant::now();
        loop {
            let changed = self.queue.shared.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so that no change between the two is missed.
            changed.as_mut().enable();
            if self.queue.try_start(self.priority, self.id) {
                self.taken = true;
                let waited = waited.elapsed();
                if let Some(observe) = self.queue.shared.on_start.get() {
                    observe(self.priority, waited);
                }
                return Permit { queue: self.queue.clone(), priority: self.priority, started: Instant::now() };
            }
            changed.await;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.taken {
            self.queue.leave_waiting(self.priority, self.id);
        }
    }
}

/// A running job's share of its provider's capacity, given back when dropped.
pub struct Permit {
    queue: Queue,
    priority: Priority,
    started: Instant,
}

impl Permit {
    pub fn priority(&self) -> Priority {
        self.priority
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.queue.finish(self.priority, self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(capacity: usize, background_queue: usize) -> QueueLimits {
        QueueLimits { capacity, background_queue, max_background_wait: Duration::from_secs(60) }
    }

    #[tokio::test]
    async fn waiting_interactive_work_runs_before_waiting_background_work() {
        let q = Queue::new(limits(1, 4));
        let first = q.place(Priority::Interactive).unwrap().ready().await;
        let background = q.place(Priority::Background).unwrap();
        let interactive = q.place(Priority::Interactive).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t1 = tx.clone();
        let b = tokio::spawn(async move {
            let p = background.ready().await;
            t1.send("background").unwrap();
            p
        });
        let i = tokio::spawn(async move {
            let p = interactive.ready().await;
            tx.send("interactive").unwrap();
            p
        });
        tokio::task::yield_now().await;
        drop(first);
        assert_eq!(rx.recv().await, Some("interactive"));
        drop(i.await.unwrap());
        assert_eq!(rx.recv().await, Some("background"));
        assert_eq!(b.await.unwrap().priority(), Priority::Background);
        assert_eq!(q.snapshot(), QueueSnapshot::default());
    }

    #[tokio::test]
    async fn background_work_is_refused_when_its_queue_is_full_and_a_dropped_place_frees_it() {
        let q = Queue::new(limits(1, 2));
        let _running = q.place(Priority::Background).unwrap().ready().await;
        let a = q.place(Priority::Background).unwrap();
        let _b = q.place(Priority::Background).unwrap();
        let refused = q.place(Priority::Background).err().unwrap();
        assert_eq!((refused.reason, refused.waiting), (RefusalReason::QueueFull, 2));
        assert!(refused.retry_after >= Duration::from_secs(1));
        // Interactive work is never refused here.
        let _i = q.place(Priority::Interactive).unwrap();
        drop(a);
        assert!(q.place(Priority::Background).is_ok());
        assert_eq!(q.snapshot().waiting_background, 1);
    }

    #[tokio::test]
    async fn background_work_expected_to_wait_too_long_is_refused() {
        let q =
            Queue::new(QueueLimits { capacity: 1, background_queue: 10, max_background_wait: Duration::from_secs(5) });
        {
            let _p = q.place(Priority::Interactive).unwrap().ready().await;
        }
        // Pretend jobs take 4 s: one running and one waiting put a new job 8 s away.
        q.state().mean_run = Some(Duration::from_secs(4));
        let _running = q.place(Priority::Interactive).unwrap().ready().await;
        let _waiting = q.place(Priority::Background).unwrap();
        let refused = q.place(Priority::Background).err().unwrap();
        assert_eq!(refused.reason, RefusalReason::WaitTooLong);
        assert_eq!(refused.expected_wait, Duration::from_secs(8));
    }

    #[tokio::test]
    async fn a_preemptive_queue_never_holds_interactive_work_and_runs_one_background_job_when_idle() {
        let q = Queue::preemptive(limits(1, 4));
        let _bg = q.place(Priority::Background).unwrap().ready().await;
        // Interactive work starts at once, beside the running background job.
        let _i = q.place(Priority::Interactive).unwrap().ready().await;
        let waiting = q.place(Priority::Background).unwrap();
        let next = tokio::spawn(waiting.ready());
        tokio::task::yield_now().await;
        assert!(!next.is_finished());
        assert_eq!(q.snapshot().running_interactive, 1);
        drop(_bg);
        drop(_i);
        assert_eq!(next.await.unwrap().priority(), Priority::Background);
    }
}

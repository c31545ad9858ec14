//! What any one caller can take of the daemon, bounded before any work is done for it:
//! connections per local uid (workload socket) and per source address (TLS listener), each
//! listener's total within the descriptor limit (with a reserve kept for the admin socket,
//! health checks and the ledger), and issuance admission — a bounded number running, a
//! bounded wait beyond that, a per-caller share of it, and per-caller token buckets (per
//! uid, per source address, per id-token issuer and subject, per identity). Everything over a
//! bound is refused at once with a retry hint, never queued without limit.
//!
//! Decides nothing about who gets what (policy does); refuses early what is over a bound,
//! and says so to the caller (`Limited`), the metrics and the ledger (in aggregate, through
//! `issue::refusals`).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// `[limits]`: every bound, with defaults a single node serves well under (SPIRE limits
/// signing to 500 requests a second per caller; these are the same order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Open connections one local uid may hold on the workload socket.
    pub connections_per_uid: usize,
    /// Open connections one source address may hold on the TLS listener.
    pub connections_per_address: usize,
    /// Open connections per listener in all (lowered at start to fit the descriptor limit).
    pub max_connections: usize,
    /// A connection must have sent its first request head within this.
    pub header_timeout: Duration,
    /// A workload-socket connection that sends nothing for this long is closed (the server
    /// pings every `idle_timeout / 4`, which live HTTP/2 clients answer).
    pub idle_timeout: Duration,
    /// A TLS request body must have arrived whole within this.
    pub body_timeout: Duration,
    /// Issuances running at once, daemon-wide (default 8 per CPU: issuance is CPU-bound
    /// beyond the ledger's commit waits, so more only lengthens everyone's latency).
    pub max_in_flight: usize,
    /// Issuances waiting for a running slot; beyond this, RESOURCE_EXHAUSTED at once.
    pub max_queued: usize,
    /// The longest a request waits for a running slot.
    pub queue_timeout: Duration,
    /// Issuances one caller (uid, source address) may have running or waiting at once.
    pub in_flight_per_caller: usize,
    /// Requests a second per local uid, per source address, per id-token issuer and
    /// subject, and per identity (a token bucket each), and the burst above that rate.
    pub rate_per_caller: NonZeroU32,
    pub burst_per_caller: NonZeroU32,
    /// Repeated refusals of one caller within this window are one ledger event with a count.
    pub refusal_window: Duration,
    /// Distinct refusals of one caller recorded in full per window; the rest are counted.
    pub refusals_in_full: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            connections_per_uid: 64,
            connections_per_address: 64,
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            body_timeout: Duration::from_secs(10),
            max_in_flight: 8 * std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            max_queued: 256,
            queue_timeout: Duration::from_secs(1),
            in_flight_per_caller: 64,
            rate_per_caller: NonZeroU32::new(500).unwrap_or(NonZeroU32::MIN),
            burst_per_caller: NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN),
            refusal_window: Duration::from_secs(60),
            refusals_in_full: 32,
        }
    }
}

/// Who a bound counts against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CallerKey {
    /// A local process, by the uid the kernel gave for its connection.
    Uid(u32),
    /// A remote client before its id-token is verified, by source address.
    Address(IpAddr),
    /// The holder of a verified id-token: its issuer and subject.
    Subject { issuer: String, subject: String },
    /// An identity (SPIFFE ID) the inventory gave the caller.
    Identity(String),
}

impl CallerKey {
    /// The source address of a `host:port` remote (the port is not the caller).
    pub fn address(remote: &str) -> Option<Self> {
        remote.parse::<std::net::SocketAddr>().ok().map(|a| Self::Address(a.ip()))
    }
}

impl fmt::Display for CallerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Address(ip) => write!(f, "address {ip}"),
            Self::Subject { issuer, subject } => write!(f, "subject {subject} of {issuer}"),
            Self::Identity(id) => write!(f, "identity {id}"),
        }
    }
}

/// Which bound refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// The caller's token bucket is empty.
    Rate,
    /// The caller has `in_flight_per_caller` requests running or waiting.
    CallerBusy,
    /// The daemon has `max_in_flight` running and `max_queued` waiting, or the wait ran out.
    Busy,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::CallerBusy => "caller_busy",
            Self::Busy => "busy",
        }
    }
}

/// A request refused by a bound, with when to try again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}; retry after {} ms", self.explain(), self.retry_after.as_millis())]
pub struct Limited {
    pub kind: LimitKind,
    pub retry_after: Duration,
}

impl Limited {
    fn explain(&self) -> &'static str {
        match self.kind {
            LimitKind::Rate => "too many requests from this caller",
            LimitKind::CallerBusy => "too many requests from this caller at once",
            LimitKind::Busy => "the daemon is at capacity",
        }
    }
}

/// Open connections on one listener, per caller and in all.
pub struct Connections {
    per_caller: usize,
    total: usize,
    open: Mutex<HashMap<CallerKey, usize>>,
    open_total: AtomicUsize,
}

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionRefused {
    /// The caller holds `per_caller` connections already.
    Caller,
    /// The listener holds `total`.
    Listener,
}

impl ConnectionRefused {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "per_caller",
            Self::Listener => "total",
        }
    }
}

/// One admitted connection; dropping it (with the connection) frees its place.
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    key: CallerKey,
}

impl fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSlot").field("key", &self.key).finish()
    }
}

impl Connections {
    pub fn new(per_caller: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_caller: per_caller.max(1),
            total: total.max(1),
            open: Mutex::new(HashMap::new()),
            open_total: AtomicUsize::new(0),
        })
    }

    /// A place for one more connection of `key`, or why not.
    pub fn admit(self: &Arc<Self>, key: CallerKey) -> Result<ConnectionSlot, ConnectionRefused> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if self.open_total.load(Ordering::Relaxed) >= self.total {
            return Err(ConnectionRefused::Listener);
        }
        let held = open.entry(key.clone()).or_insert(0);
        if *held >= self.per_caller {
            return Err(ConnectionRefused::Caller);
        }
        *held += 1;
        self.open_total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionSlot { connections: Arc::clone(self), key })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open_total.load(Ordering::Relaxed)
    }

    /// Connections `key` holds now.
    pub fn held_by(&self, key: &CallerKey) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(key).copied().unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = open.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.key);
            }
        }
        self.connections.open_total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Issuance admission: token buckets per caller, a per-caller share of the requests running
/// or waiting, and a bounded wait for one of `max_in_flight` running slots. Freed slots go
/// to the waiting callers in turn (round robin), not first come first served, so a caller
/// with many requests waiting delays another caller by at most one slot's turn.
pub struct Admission {
    max_running: usize,
    max_queued: usize,
    queue_timeout: Duration,
    per_caller: usize,
    queue: Mutex<Queue>,
    buckets: DefaultKeyedRateLimiter<CallerKey>,
    clock: DefaultClock,
}

#[derive(Default)]
struct Queue {
    running: usize,
    waiting: usize,
    /// Requests running or waiting, per caller.
    held: HashMap<CallerKey, usize>,
    /// Each caller's waiters, oldest first: (id, wake-up).
    waiters: HashMap<CallerKey, std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>>,
    /// Callers with waiters, in the order their turn comes.
    turn: std::collections::VecDeque<CallerKey>,
    next_id: u64,
}

impl Queue {
    fn unhold(&mut self, key: &CallerKey) {
        if let Some(held) = self.held.get_mut(key) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(key);
            }
        }
    }

    /// Takes waiter `id` of `key` out of the queue, giving back its place; `false` if it is
    /// no longer there (a slot was handed to it, or its drop already took it out).
    fn remove_waiter(&mut self, key: &CallerKey, id: u64) -> bool {
        let Some(queue) = self.waiters.get_mut(key) else { return false };
        let Some(at) = queue.iter().position(|(i, _)| *i == id) else { return false };
        queue.remove(at);
        if queue.is_empty() {
            self.waiters.remove(key);
            self.turn.retain(|k| k != key);
        }
        self.waiting -= 1;
        self.unhold(key);
        true
    }

    /// Gives a free slot to the next caller in turn that waits. The slot is the waiter's
    /// from here on: if its request is gone by now, its `Waiter` guard gives the slot back.
    fn hand_over(&mut self) {
        while let Some(key) = self.turn.pop_front() {
            let Some(queue) = self.waiters.get_mut(&key) else { continue };
            let Some((_, wake)) = queue.pop_front() else {
                self.waiters.remove(&key);
                continue;
            };
            if queue.is_empty() {
                self.waiters.remove(&key);
            } else {
                self.turn.push_back(key);
            }
            self.waiting -= 1;
            self.running += 1;
            let _ = wake.send(());
            return;
        }
    }
}

/// An admitted request: holds its running slot and its caller's share until dropped.
pub struct Admitted<'a> {
    admission: &'a Admission,
    key: CallerKey,
}

/// A request waiting for a running slot (see `Admission::admit`).
struct Waiter<'a> {
    admission: &'a Admission,
    key: CallerKey,
    id: u64,
    /// Turned into an `Admitted`, or out of the queue: nothing left to give back.
    settled: bool,
}

impl<'a> Waiter<'a> {
    /// Its slot was handed over: the `Admitted` holds it from now on.
    fn admitted(mut self) -> Admitted<'a> {
        self.settled = true;
        Admitted { admission: self.admission, key: self.key.clone() }
    }

    /// The wait ran out: out of the queue (`true`), or `false` if a slot was handed over
    /// in that instant (it is this request's).
    fn leave_queue(&mut self) -> bool {
        let mut q = self.admission.lock();
        if q.remove_waiter(&self.key, self.id) {
            self.settled = true;
            true
        } else {
            false
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut q = self.admission.lock();
        if !q.remove_waiter(&self.key, self.id) {
            // Handed a slot it never took: give it to the next in turn.
            q.running -= 1;
            q.unhold(&self.key);
            q.hand_over();
        }
    }
}

impl fmt::Debug for Admitted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted").field("key", &self.key).finish()
    }
}

impl Admission {
    pub fn new(config: &LimitsConfig) -> Self {
        let quota = Quota::per_second(config.rate_per_caller).allow_burst(config.burst_per_caller);
        Self {
            max_running: config.max_in_flight.max(1),
            max_queued: config.max_queued,
            queue_timeout: config.queue_timeout,
            per_caller: config.in_flight_per_caller.max(1),
            queue: Mutex::new(Queue::default()),
            buckets: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one token of `key`'s bucket.
    pub fn check_rate(&self, key: &CallerKey) -> Result<(), Limited> {
        self.buckets.check_key(key).map_err(|not_until| Limited {
            kind: LimitKind::Rate,
            retry_after: not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits one request of `key`: its bucket, its share, then a running slot — at once
    /// if one is free and nobody waits, else in turn among the waiting callers, waiting at
    /// most `queue_timeout` and only while fewer than `max_queued` wait.
    pub async fn admit(&self, key: CallerKey) -> Result<Admitted<'_>, Limited> {
        self.check_rate(&key)?;
        let busy = Limited { kind: LimitKind::Busy, retry_after: self.queue_timeout.max(Duration::from_millis(100)) };
        let (id, woken) = {
            let mut q = self.lock();
            if q.held.get(&key).copied().unwrap_or(0) >= self.per_caller {
                return Err(Limited { kind: LimitKind::CallerBusy, retry_after: Duration::from_millis(100) });
            }
            if q.running < self.max_running && q.waiting == 0 {
                q.running += 1;
                *q.held.entry(key.clone()).or_insert(0) += 1;
                return Ok(Admitted { admission: self, key });
            }
            if q.waiting >= self.max_queued {
                return Err(busy);
            }
            let (wake, woken) = tokio::sync::oneshot::channel();
            let id = q.next_id;
            q.next_id += 1;
            let queue = q.waiters.entry(key.clone()).or_default();
            let first = queue.is_empty();
            queue.push_back((id, wake));
            if first {
                q.turn.push_back(key.clone());
            }
            q.waiting += 1;
            *q.held.entry(key.clone()).or_insert(0) += 1;
            (id, woken)
        };
        // Why a guard: the request may be dropped at any await (its client went away); the
        // guard gives back its place in the queue, or the slot handed to it, either way.
        let waiter = Waiter { admission: self, key, id, settled: false };
        // Why `&mut woken`: the receiver must outlive the wait. Were it dropped when the wait
        // runs out, a slot handed over in that instant would fail to send and be taken back,
        // and the check below could not tell that from a grant.
        let mut woken = woken;
        if let Ok(Ok(())) = tokio::time::timeout(self.queue_timeout, &mut woken).await {
            return Ok(waiter.admitted());
        }
        let mut waiter = waiter;
        if waiter.leave_queue() { Err(busy) } else { Ok(waiter.admitted()) }
    }

    /// Requests running now.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Forgets buckets that are full again (bounded memory under many callers); called
    /// periodically.
    pub fn forget_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut q = self.admission.lock();
        q.running -= 1;
        q.unhold(&self.key);
        q.hand_over();
    }
}

/// Raises the soft descriptor limit to the hard one; returns the limit in force.
pub fn raise_descriptor_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (soft, hard) = (limit.current.unwrap_or(u64::MAX), limit.maximum);
    if let Some(hard) = hard
        && soft < hard
    {
        let raised = rustix::process::Rlimit { current: Some(hard), maximum: Some(hard) };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return hard;
        }
    } else if hard.is_none() && soft < 1 << 20 {
        let raised = rustix::process::Rlimit { current: Some(1 << 20), maximum: None };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return 1 << 20;
        }
    }
    soft
}

/// Descriptors kept free of client connections: the admin socket, the telemetry listener,
/// the ledger, policy and key files, the PostgreSQL pool.
pub const DESCRIPTOR_RESERVE: u64 = 256;

/// Each listener's connection total, so that both together stay below `limit` minus the
/// reserve.
pub fn connections_within(limit: u64, configured: usize) -> usize {
    let usable = limit.saturating_sub(DESCRIPTOR_RESERVE) / 2;
    configured.min(usize::try_from(usable).unwrap_or(usize::MAX)).max(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LimitsConfig {
        LimitsConfig {
            max_in_flight: 2,
            max_queued: 1,
            queue_timeout: Duration::from_millis(200),
            in_flight_per_caller: 2,
            rate_per_caller: NonZeroU32::new(1000).unwrap(),
            burst_per_caller: NonZeroU32::new(3).unwrap(),
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn connections_are_bounded_per_caller_and_in_all_and_freed_on_drop() {
        let c = Connections::new(2, 3);
        let a = CallerKey::Uid(1000);
        let b = CallerKey::Uid(1001);
        let a1 = c.admit(a.clone()).unwrap();
        let _a2 = c.admit(a.clone()).unwrap();
        assert_eq!(c.admit(a.clone()).unwrap_err(), ConnectionRefused::Caller);
        let _b1 = c.admit(b.clone()).unwrap();
        assert_eq!(c.admit(b.clone()).unwrap_err(), ConnectionRefused::Listener, "3 open in all");
        drop(a1);
        assert_eq!(c.held_by(&a), 1);
        assert!(c.admit(b).is_ok(), "a freed place is taken again");
    }

    #[tokio::test]
    async fn a_caller_gets_its_share_and_no_more_while_another_is_still_admitted() {
        let admission = Admission::new(&LimitsConfig { max_in_flight: 8, ..config() });
        let noisy = CallerKey::Uid(65534);
        let _n1 = admission.admit(noisy.clone()).await.unwrap();
        let _n2 = admission.admit(noisy.clone()).await.unwrap();
        let third = admission.admit(noisy.clone()).await.err().unwrap();
        assert_eq!(third.kind, LimitKind::CallerBusy);
        assert!(admission.admit(CallerKey::Uid(1000)).await.is_ok(), "another caller is not held up");
    }

    #[tokio::test]
    async fn beyond_the_running_slots_and_the_queue_the_answer_is_busy_at_once() {
        let admission = Arc::new(Admission::new(&LimitsConfig { in_flight_per_caller: 8, ..config() }));
        let _r1 = admission.admit(CallerKey::Uid(1)).await.unwrap();
        let _r2 = admission.admit(CallerKey::Uid(2)).await.unwrap();
        // One may wait (max_queued 1): it times out as busy after queue_timeout.
        let waited = admission.admit(CallerKey::Uid(3)).await.err().unwrap();
        assert_eq!(waited.kind, LimitKind::Busy);
        // While one waits, the next is refused without waiting.
        let waiter = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move { admission.admit(CallerKey::Uid(4)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = admission.admit(CallerKey::Uid(5)).await.err().unwrap();
        assert_eq!(refused.kind, LimitKind::Busy);
        assert_eq!(waiter.await.unwrap().unwrap_err().kind, LimitKind::Busy);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_waiting_request() {
        let admission = Arc::new(Admission::new(&LimitsConfig {
            max_in_flight: 1,
            queue_timeout: Duration::from_secs(30),
            ..config()
        }));
        let first = admission.admit(CallerKey::Uid(1)).await.unwrap();
        let waiter = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move { admission.admit(CallerKey::Uid(2)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn freed_slots_go_to_the_waiting_callers_in_turn_not_to_the_one_with_the_most_waiting() {
        let admission = Arc::new(Admission::new(&LimitsConfig {
            max_in_flight: 1,
            max_queued: 16,
            in_flight_per_caller: 8,
            queue_timeout: Duration::from_secs(30),
            ..config()
        }));
        let (noisy, quiet) = (CallerKey::Uid(65534), CallerKey::Uid(1000));
        let first = admission.admit(noisy.clone()).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        let spawn = |key: CallerKey, name: &'static str| {
            let (admission, order) = (Arc::clone(&admission), Arc::clone(&order));
            tokio::spawn(async move {
                let admitted = admission.admit(key).await.unwrap();
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(admitted);
            })
        };
        for name in ["noisy-1", "noisy-2", "noisy-3"] {
            waiters.push(spawn(noisy.clone(), name));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        waiters.push(spawn(quiet.clone(), "quiet"));
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(first);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["noisy-1", "quiet", "noisy-2", "noisy-3"]);
        assert_eq!(admission.running(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_frees_its_place() {
        let admission =
            Arc::new(Admission::new(&LimitsConfig { max_in_flight: 1, in_flight_per_caller: 2, ..config() }));
        let key = CallerKey::Uid(7);
        let held = admission.admit(key.clone()).await.unwrap();
        let dropped = {
            let admission = Arc::clone(&admission);
            let key = key.clone();
            tokio::spawn(async move { admission.admit(key).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        dropped.abort();
        let _ = dropped.await;
        // The dropped waiter gave its place back at once; the running one still holds its own.
        {
            let q = admission.lock();
            assert_eq!((q.held.get(&key), q.waiting), (Some(&1), 0));
        }
        drop(held);
        // The slot went to nobody (the waiter is gone) and both places of the share are free.
        let q = admission.lock();
        assert_eq!((q.running, q.held.get(&key), q.waiting), (0, None, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn under_churn_timeouts_and_cancellations_every_place_is_given_back() {
        let admission = Arc::new(Admission::new(&LimitsConfig {
            max_in_flight: 3,
            max_queued: 8,
            in_flight_per_caller: 4,
            queue_timeout: Duration::from_millis(3),
            ..config()
        }));
        let mut tasks = Vec::new();
        for i in 0..400u32 {
            let admission = Arc::clone(&admission);
            let task = tokio::spawn(async move {
                if let Ok(admitted) = admission.admit(CallerKey::Uid(i % 5)).await {
                    tokio::time::sleep(Duration::from_micros(u64::from(i % 7) * 300)).await;
                    drop(admitted);
                }
            });
            if i % 9 == 0 {
                task.abort();
            }
            tasks.push(task);
        }
        for task in tasks {
            let _ = task.await;
        }
        let q = admission.lock();
        assert_eq!((q.running, q.waiting, q.held.len(), q.turn.len(), q.waiters.len()), (0, 0, 0, 0, 0));
    }

    #[test]
    fn an_empty_bucket_refuses_with_a_retry_hint_and_other_callers_keep_theirs() {
        let admission = Admission::new(&LimitsConfig {
            rate_per_caller: NonZeroU32::new(1).unwrap(),
            burst_per_caller: NonZeroU32::new(2).unwrap(),
            ..config()
        });
        let key = CallerKey::Subject { issuer: "https://ci".into(), subject: "repo:a".into() };
        admission.check_rate(&key).unwrap();
        admission.check_rate(&key).unwrap();
        let limited = admission.check_rate(&key).unwrap_err();
        assert_eq!(limited.kind, LimitKind::Rate);
        assert!(limited.retry_after > Duration::ZERO && limited.retry_after <= Duration::from_secs(1));
        assert!(admission.check_rate(&CallerKey::Uid(1000)).is_ok());
    }

    #[test]
    fn connection_totals_leave_the_reserve_free() {
        assert_eq!(connections_within(1024, 4096), (1024 - 256) / 2);
        assert_eq!(connections_within(1 << 20, 4096), 4096);
        assert_eq!(CallerKey::address("127.0.0.1:5000"), Some(CallerKey::Address("127.0.0.1".parse().unwrap())));
        assert_eq!(CallerKey::address("[::1]:5000"), Some(CallerKey::Address("::1".parse().unwrap())));
    }
}

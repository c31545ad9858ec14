//! Bounded ledger growth under refusal floods. The first refusal of its kind from a caller
//! in a window is a `decision` event in full, written before the reply like any other;
//! the same refusal again within the window, a distinct refusal beyond
//! `limits.refusals_in_full`, and a request a limit refused are counted here and written as
//! one `refusals` event per caller per window (when the window ends, and at shutdown). So a
//! caller's flood grows the ledger by at most `refusals_in_full` decisions and one
//! aggregate a window, and every refusal is still counted.
//!
//! What is given up, and why it is bounded: a counted refusal's reply leaves before its
//! count is durable; a crash loses the counts of the window in progress (never a decision
//! in full, never an issuance, and nothing was issued to a refused request). Break-glass
//! refusals are always written in full.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use crate::clock::{Clock, unix_millis};
use crate::ledger::event::{self, Event, RefusalRepeats};
use crate::ledger::{EventId, Ledger};
use crate::limits::{CallerKey, LimitKind};

/// What to do with a refusal about to be recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Record it in full, then call `recorded` (or `forget` if that failed).
    Record,
    /// Counted: the caller's recorded refusal it repeats, if that is known yet.
    Counted(Option<EventId>),
}

#[derive(Default)]
struct Window {
    since: Option<SystemTime>,
    /// Fingerprint → (the decision recorded in full, once written; repeats since).
    full: HashMap<u64, (Option<EventId>, u64)>,
    unrecorded: u64,
    limited: BTreeMap<&'static str, u64>,
}

impl Window {
    fn is_empty(&self) -> bool {
        self.unrecorded == 0 && self.limited.is_empty() && self.full.values().all(|(_, n)| *n == 0)
    }
}

pub struct RefusalLog {
    window: Duration,
    in_full: usize,
    callers: Mutex<HashMap<CallerKey, Window>>,
}

impl RefusalLog {
    pub fn new(window: Duration, in_full: usize) -> Self {
        Self {
            window: window.max(Duration::from_secs(1)),
            in_full: in_full.max(1),
            callers: Mutex::new(HashMap::new()),
        }
    }

    /// The caller a decision's refusal counts against, if it is one that may be counted.
    pub fn key(decision: &event::Decision) -> Option<CallerKey> {
        if decision.break_glass || decision.outcome != event::Verdict::Deny {
            return None;
        }
        let caller = &decision.caller;
        if let Some(uid) = caller.uid {
            return Some(CallerKey::Uid(uid));
        }
        if let Some(p) = &caller.oidc
            && let (Some(issuer), Some(subject)) = (&p.issuer, &p.subject)
        {
            return Some(CallerKey::Subject { issuer: issuer.clone(), subject: subject.clone() });
        }
        caller.remote.as_deref().and_then(CallerKey::address)
    }

    /// What makes two refusals of one caller the same: what was asked, for whom, through
    /// which API, and why it was refused (not the pid or port, which a flood varies).
    pub fn fingerprint(decision: &event::Decision) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&decision.action, &decision.identity, &decision.api, &decision.reason, &decision.rules).hash(&mut h);
        decision.caller.claimed_issuer.hash(&mut h);
        h.finish()
    }

    pub fn on_refusal(&self, key: &CallerKey, fingerprint: u64, now: SystemTime) -> Verdict {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        let window = callers.entry(key.clone()).or_default();
        window.since.get_or_insert(now);
        if let Some((first, repeats)) = window.full.get_mut(&fingerprint) {
            *repeats += 1;
            return Verdict::Counted(*first);
        }
        if window.full.len() < self.in_full {
            window.full.insert(fingerprint, (None, 0));
            return Verdict::Record;
        }
        window.unrecorded += 1;
        Verdict::Counted(None)
    }

    /// The refusal `on_refusal` said to record is durable as `id`.
    pub fn recorded(&self, key: &CallerKey, fingerprint: u64, id: EventId) {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((first, _)) = callers.get_mut(key).and_then(|w| w.full.get_mut(&fingerprint)) {
            *first = Some(id);
        }
    }

    /// The refusal `on_refusal` said to record could not be written: the next one is
    /// recorded in full instead.
    pub fn forget(&self, key: &CallerKey, fingerprint: u64) {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = callers.get_mut(key)
            && w.full.get(&fingerprint).is_some_and(|(first, _)| first.is_none())
        {
            w.full.remove(&fingerprint);
        }
    }

    /// A request a limit refused before anything was decided.
    pub fn on_limited(&self, key: &CallerKey, kind: LimitKind, now: SystemTime) {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        let window = callers.entry(key.clone()).or_default();
        window.since.get_or_insert(now);
        *window.limited.entry(kind.as_str()).or_insert(0) += 1;
    }

    /// The aggregates of every window that has ended (all of them with `all`), taken out.
    pub fn take_due(&self, now: SystemTime, all: bool) -> Vec<event::Refusals> {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        let due: Vec<CallerKey> = callers
            .iter()
            .filter(|(_, w)| all || w.since.is_some_and(|s| now.duration_since(s).unwrap_or_default() >= self.window))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in due {
            let Some(w) = callers.remove(&key) else { continue };
            if w.is_empty() {
                continue;
            }
            let mut repeats: Vec<RefusalRepeats> = w
                .full
                .values()
                .filter(|(_, n)| *n > 0)
                .map(|(first, n)| RefusalRepeats { decision: first.unwrap_or(0), count: *n })
                .collect();
            repeats.sort_by_key(|r| r.decision);
            out.push(event::Refusals {
                caller: key.to_string(),
                uid: match key {
                    CallerKey::Uid(uid) => Some(uid),
                    _ => None,
                },
                since_ms: w.since.map(unix_millis).unwrap_or_default(),
                until_ms: unix_millis(now),
                repeats,
                unrecorded: w.unrecorded,
                limited: w.limited.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            });
        }
        out
    }

    /// Callers with a window open (bounded by the callers seen within one window).
    pub fn open_windows(&self) -> usize {
        self.callers.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Writes each ended window's aggregate, every `window / 4`, until `stop` (the daemon
    /// writes the open ones once its listeners have drained). A write that fails is logged;
    /// its counts are lost, never a decision in full.
    pub async fn run(
        self: Arc<Self>,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        on_tick: impl Fn() + Send + 'static,
    ) {
        let mut tick = tokio::time::interval((self.window / 4).max(Duration::from_millis(250)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            on_tick();
            for aggregate in self.take_due(clock.now(), false) {
                let (caller, counted) = (aggregate.caller.clone(), counted(&aggregate));
                if let Err(e) = ledger.record(clock.now(), Event::Refusals(aggregate)).await {
                    tracing::error!(%caller, counted, error = %e, "counted refusals could not be recorded");
                }
            }
        }
    }
}

/// How many refusals an aggregate counts.
pub fn counted(r: &event::Refusals) -> u64 {
    r.repeats.iter().map(|x| x.count).sum::<u64>() + r.unrecorded + r.limited.values().sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn the_first_refusal_is_recorded_its_repeats_and_the_overflow_counted_once_a_window() {
        let log = RefusalLog::new(Duration::from_secs(60), 2);
        let key = CallerKey::Uid(65534);
        assert_eq!(log.on_refusal(&key, 1, at(0)), Verdict::Record);
        log.recorded(&key, 1, 41);
        for _ in 0..1999 {
            assert_eq!(log.on_refusal(&key, 1, at(1)), Verdict::Counted(Some(41)));
        }
        assert_eq!(log.on_refusal(&key, 2, at(2)), Verdict::Record);
        log.recorded(&key, 2, 42);
        assert_eq!(log.on_refusal(&key, 3, at(3)), Verdict::Counted(None), "beyond 2 distinct: counted only");
        log.on_limited(&key, LimitKind::Rate, at(4));
        assert!(log.take_due(at(30), false).is_empty(), "the window is still open");
        let due = log.take_due(at(60), false);
        assert_eq!(due.len(), 1);
        let r = &due[0];
        assert_eq!(r.caller, "uid 65534");
        assert_eq!(r.repeats, vec![RefusalRepeats { decision: 41, count: 1999 }]);
        assert_eq!((r.unrecorded, r.limited.get("rate").copied()), (1, Some(1)));
        assert_eq!(counted(r), 2001);
        assert_eq!(log.open_windows(), 0);
        // A new window records the refusal in full again.
        assert_eq!(log.on_refusal(&key, 1, at(61)), Verdict::Record);
    }

    #[test]
    fn a_refusal_whose_record_failed_is_recorded_in_full_next_time() {
        let log = RefusalLog::new(Duration::from_secs(60), 8);
        let key = CallerKey::Uid(1000);
        assert_eq!(log.on_refusal(&key, 7, at(0)), Verdict::Record);
        log.forget(&key, 7);
        assert_eq!(log.on_refusal(&key, 7, at(1)), Verdict::Record);
    }

    #[test]
    fn callers_are_counted_apart_and_quiet_windows_write_nothing() {
        let log = RefusalLog::new(Duration::from_secs(60), 8);
        let (a, b) = (CallerKey::Uid(1), CallerKey::Address("192.0.2.7".parse().unwrap()));
        assert_eq!(log.on_refusal(&a, 1, at(0)), Verdict::Record);
        log.recorded(&a, 1, 5);
        assert_eq!(log.on_refusal(&b, 1, at(0)), Verdict::Record);
        log.recorded(&b, 1, 6);
        assert_eq!(log.on_refusal(&b, 1, at(1)), Verdict::Counted(Some(6)));
        let due = log.take_due(at(1), true);
        assert_eq!(due.len(), 1, "a's window had no repeat: nothing to add");
        assert_eq!(due[0].caller, "address 192.0.2.7");
    }

    #[test]
    fn break_glass_and_allows_are_never_counted_and_pids_do_not_make_refusals_distinct() {
        let mut d = event::Decision {
            action: "issue_x509".into(),
            outcome: event::Verdict::Deny,
            reason: "no inventory entry matches this caller".into(),
            caller: event::Caller::local(65534, 65534, Some(100)),
            ..event::Decision::default()
        };
        let first = RefusalLog::fingerprint(&d);
        assert_eq!(RefusalLog::key(&d), Some(CallerKey::Uid(65534)));
        d.caller.pid = Some(101);
        assert_eq!(RefusalLog::fingerprint(&d), first);
        d.break_glass = true;
        assert_eq!(RefusalLog::key(&d), None);
        d.break_glass = false;
        d.outcome = event::Verdict::Allow;
        assert_eq!(RefusalLog::key(&d), None);
    }
}

//! Replay: decide recorded requests again under another release and say what would
//! change. Every decision event that reached the inventory carries its `request` (the
//! attestation kind, selectors, resources, lifetime, id-token claims, break-glass flag),
//! so the candidate's inventory and rules see exactly what the live ones saw, at the
//! time they saw it. Pure: reads events, writes nothing. Also used by shadow mode, which
//! decides live requests with a candidate beside the active release.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use super::release::Release;
use super::{AwsRole, Combined, Decision, DecisionRequest, RequestContext, Resource};
use crate::identity::{InventoryEntry, Lookup, OidcClaims, Selector, Selectors, Ttl, WorkloadId};
use crate::ledger::StoredEvent;
use crate::ledger::event::{self, Event, EventKind, ResourceRecord};

/// A request as a decision event recorded it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub seq: i64,
    pub at: SystemTime,
    pub attestation: String,
    pub selectors: Selectors,
    pub resources: Vec<Resource>,
    pub ttl: Ttl,
    pub wanted: Option<WorkloadId>,
    pub context: RequestContext,
    /// `mayfly dev` made the identity for an unregistered token subject.
    pub dev_identity: Option<String>,
    pub outcome: Outcome,
}

pub use crate::ledger::event::{Change, Outcome};

/// One request whose decision changes.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    pub seq: i64,
    pub at_unix: i64,
    pub change: Change,
    pub action: String,
    pub resource: String,
    pub before: Outcome,
    pub after: Outcome,
    /// The same request refused again by the same caller within its window, counted in a
    /// `refusals` event rather than recorded again (`issue::refusals`).
    pub repeats: u64,
}

impl Difference {
    /// How many requests this difference stands for: the recorded one and its repeats.
    pub fn requests(&self) -> u64 {
        1 + self.repeats
    }

    /// Whose request it is: the identity either release resolved it to.
    pub fn identity(&self) -> String {
        self.after.identity.clone().or_else(|| self.before.identity.clone()).unwrap_or_else(|| "(no identity)".into())
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub candidate: String,
    pub since_unix: i64,
    #[serde(skip)]
    since_ms: i64,
    /// Decision events in the window.
    pub decisions: usize,
    pub replayed: usize,
    /// Refused before the inventory (attestation, an invalid token) or recorded before
    /// decisions carried their request: nothing to decide again.
    pub not_replayable: usize,
    /// Repeats of recorded refusals, counted in `refusals` events (each decided like the
    /// decision it repeats).
    pub repeats: u64,
    pub differences: Vec<Difference>,
}

impl Report {
    /// Requests (repeats included) the candidate would give more.
    pub fn escalations(&self) -> u64 {
        self.differences.iter().filter(|d| d.change.is_escalation()).map(Difference::requests).sum()
    }

    /// Requests (repeats included) whose decision changes as `change` says.
    pub fn requests_with(&self, change: Change) -> u64 {
        self.differences.iter().filter(|d| d.change == change).map(Difference::requests).sum()
    }

    /// Differences grouped by change, identity, request and the rules that now decide,
    /// with how many requests each group holds.
    pub fn grouped(&self) -> BTreeMap<(Change, String, String, Vec<String>), Vec<&Difference>> {
        let mut groups: BTreeMap<_, Vec<&Difference>> = BTreeMap::new();
        for d in &self.differences {
            let rules = if d.after.rules.is_empty() { d.before.rules.clone() } else { d.after.rules.clone() };
            groups.entry((d.change, d.identity(), format!("{} {}", d.action, d.resource), rules)).or_default().push(d);
        }
        groups
    }
}

/// The decision events' requests, in order; `Err` for a decision with no usable request.
pub fn recorded(events: &[StoredEvent]) -> Vec<Result<Recorded, String>> {
    events.iter().filter(|e| e.kind == EventKind::Decision.as_str()).map(parse).collect()
}

fn parse(e: &StoredEvent) -> Result<Recorded, String> {
    match e.event().map_err(|e| e.to_string())? {
        Event::Decision(d) => from_decision(&d, e.seq, e.at()),
        _ => Err("not a decision".into()),
    }
}

/// A decision (recorded, or the one being written) as a request to decide again.
pub fn from_decision(d: &event::Decision, seq: i64, at: SystemTime) -> Result<Recorded, String> {
    let req = d.request.as_ref().ok_or("no request recorded")?;
    let selectors = req
        .selectors
        .iter()
        .map(|s| Selector::parse(s).map_err(|e| e.to_string()))
        .collect::<Result<Selectors, String>>()?;
    if req.resources.is_empty() {
        return Err("no resources".into());
    }
    let resources = req
        .resources
        .iter()
        .map(|r| match r {
            ResourceRecord::X509 => Ok(Resource::X509),
            ResourceRecord::Wit => Ok(Resource::Wit),
            ResourceRecord::Jwt { audience } => Ok(Resource::Jwt { audience: audience.clone() }),
            ResourceRecord::Aws { role } => AwsRole::parse(role).map(|role| Resource::Aws { role }),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let ttl = Ttl::from_secs(req.requested_ttl_secs).map_err(|e| e.to_string())?;
    let oidc: Option<OidcClaims> = match &req.oidc {
        Some(claims) => Some(serde_json::from_value(Value::Object(claims.clone())).map_err(|e| format!("oidc: {e}"))?),
        None => None,
    };
    let wanted = req.spiffe_id.as_deref().map(WorkloadId::parse).transpose().map_err(|e| e.to_string())?;
    let dev_identity = if req.dev_identity { d.identity.clone() } else { None };
    let outcome = Outcome {
        allowed: d.is_allow(),
        identity: d.identity.clone(),
        granted_ttl_secs: d.granted_ttl_secs,
        rules: d.rules.clone(),
        reason: d.reason.clone(),
    };
    Ok(Recorded {
        seq,
        at,
        attestation: if req.attestation.is_empty() { "unix".into() } else { req.attestation.clone() },
        selectors,
        resources,
        ttl,
        wanted,
        context: RequestContext {
            purpose: req.purpose.clone(),
            target: None,
            break_glass: req.break_glass,
            ticket: req.ticket.clone(),
            oidc,
        },
        dev_identity,
        outcome,
    })
}

/// Decides a request under `release` the way issuance does: the inventory first (a
/// dev-made identity is kept as it was), then every resource; allowed only if each is.
pub fn decide(release: &Release, r: &Recorded) -> Outcome {
    let dev_entry;
    let entry = match (
        &r.dev_identity,
        release.inventory.lookup(&r.selectors, r.wanted.as_ref(), crate::clock::utc_date(r.at)),
    ) {
        (_, Lookup::Found(entry)) => entry,
        (Some(id), Lookup::NoMatch) => {
            let Ok(id) = WorkloadId::parse(id) else {
                return denied(None, "the recorded dev identity is not a SPIFFE ID");
            };
            dev_entry = InventoryEntry {
                id,
                owner: "mayfly dev (--oidc-issuer)".into(),
                purpose: "quick tries of the token exchange".into(),
                environment: "dev".into(),
                tier: "experimental".into(),
                expires: crate::clock::utc_date(r.at),
                selectors: r.selectors.clone(),
                known_as: Default::default(),
            };
            &dev_entry
        }
        (_, Lookup::NoMatch) => return denied(None, "no inventory entry matches this caller"),
        (_, Lookup::Expired(e)) => {
            return denied(Some(e.id.to_string()), &format!("the inventory entry `{}` expired on {}", e.id, e.expires));
        }
        (_, Lookup::Ambiguous(ids)) => {
            return denied(None, &format!("the caller matches several identities ({})", ids.len()));
        }
        (_, Lookup::NameReused { entry, pinned, presented }) => {
            return denied(None, &Lookup::name_reused_reason(entry, pinned, presented.as_ref()));
        }
    };
    let decisions: Vec<Decision> = r
        .resources
        .iter()
        .map(|resource| {
            let req = DecisionRequest {
                workload: entry,
                attestation: &r.attestation,
                selectors: &r.selectors,
                resource,
                requested_ttl: r.ttl,
                context: &r.context,
                reserved_audiences: &[],
            };
            release.engine.decide(&req, r.at)
        })
        .collect();
    let c = Combined::of(&decisions);
    Outcome {
        allowed: c.allowed,
        identity: Some(entry.id.to_string()),
        granted_ttl_secs: c.granted_ttl_secs,
        rules: c.rules,
        reason: c.explain,
    }
}

fn denied(identity: Option<String>, reason: &str) -> Outcome {
    Outcome { allowed: false, identity, granted_ttl_secs: None, rules: vec![], reason: reason.to_owned() }
}

/// How `after` differs from `before`, if it does.
pub fn compare(before: &Outcome, after: &Outcome) -> Option<Change> {
    match (before.allowed, after.allowed) {
        (false, true) => Some(Change::NewlyAllowed),
        (true, false) => Some(Change::NewlyDenied),
        (true, true) => match (before.granted_ttl_secs, after.granted_ttl_secs) {
            (Some(b), Some(a)) if a > b => Some(Change::LongerLifetime),
            (Some(b), Some(a)) if a < b => Some(Change::ShorterLifetime),
            _ => None,
        },
        (false, false) => None,
    }
}

/// Describes a request's resources for a report line.
pub fn describe(resources: &[Resource]) -> (String, String) {
    let action = resources.first().map(|r| format!("issue_{}", r.kind().as_str())).unwrap_or_default();
    (action, resources.iter().map(Resource::describe).collect::<Vec<_>>().join(", "))
}

/// Replays every replayable decision at or after `since` under `candidate`.
pub fn replay(candidate: &Release, events: &[StoredEvent], since: SystemTime) -> Report {
    let mut report = Report::start(candidate, since);
    report.feed(candidate, events);
    report
}

/// Milliseconds since the epoch, as the ledger stamps events.
pub fn epoch_ms(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX)
}

impl Report {
    pub fn start(candidate: &Release, since: SystemTime) -> Self {
        Report {
            candidate: candidate.version().to_owned(),
            since_unix: crate::clock::unix_secs(since),
            since_ms: epoch_ms(since),
            ..Report::default()
        }
    }

    /// Replays the decisions among `events` inside the window (a page at a time is fine).
    /// A `refusals` event adds its repeats to the differences of the decisions they repeat
    /// (written after them, so already fed).
    pub fn feed(&mut self, candidate: &Release, events: &[StoredEvent]) {
        let since_ms = self.since_ms;
        for e in events.iter().filter(|e| e.at_ms >= since_ms) {
            if e.kind == EventKind::Decision.as_str() {
                self.decisions += 1;
                self.replay_one(candidate, e);
            } else if e.kind == EventKind::Refusals.as_str()
                && let Ok(Event::Refusals(r)) = e.event()
            {
                for repeat in r.repeats {
                    self.repeats += repeat.count;
                    if let Some(d) = self.differences.iter_mut().find(|d| d.seq == repeat.decision) {
                        d.repeats += repeat.count;
                    }
                }
            }
        }
    }

    fn replay_one(&mut self, candidate: &Release, e: &StoredEvent) {
        let Ok(r) = parse(e) else {
            self.not_replayable += 1;
            return;
        };
        self.replayed += 1;
        let after = decide(candidate, &r);
        if let Some(change) = compare(&r.outcome, &after) {
            let (action, resource) = describe(&r.resources);
            self.differences.push(Difference {
                seq: r.seq,
                at_unix: crate::clock::unix_secs(r.at),
                change,
                action,
                resource,
                before: r.outcome,
                after,
                repeats: 0,
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::TrustDomain;
    use crate::policy::shipped_files_with;

    /// The careless permit of the issue: any repository of the organisation may assume
    /// the production deploy role (from main; the guardrail still wants a push to main).
    pub(crate) const CARELESS: &str = r#"
        @id("ci-any-acme-repo-deploys")
        @max_ttl("30m")
        permit (principal, action == Mayfly::Action::"issue_aws", resource == Mayfly::AwsRole::"arn:aws:iam::111122223333:role/acme-app-deploy")
        when { principal.attestation == "oidc" && context has oidc && context.oidc has repository_owner && context.oidc.repository_owner == "acme" };
    "#;

    /// A pure tightening: a new guardrail.
    pub(crate) const TIGHTER: &str = r#"
        @id("forbid-jwt-on-pull-request-target")
        @reason("pull_request_target runs untrusted code with secrets")
        forbid (principal, action == Mayfly::Action::"issue_jwt", resource)
        when { context has oidc && context.oidc has event_name && context.oidc.event_name == "pull_request_target" };
    "#;

    const INVENTORY_EXTRA: &str = r#"
        [[workload]]
        id = "spiffe://mayfly.local/ci/acme/tools"
        owner = "tools@example.org"
        purpose = "acme/tools pipelines"
        environment = "ci"
        tier = "standard"
        expires = 2030-01-01
        selectors = ["oidc:iss:https://token.actions.githubusercontent.com", "oidc:repository:acme/tools"]
    "#;

    pub(crate) fn release(extra_rules: Option<&str>) -> Release {
        let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/inventory.toml")).unwrap();
        let inventory = format!("{shipped}\n{INVENTORY_EXTRA}");
        let files = shipped_files_with(&[
            ("inventory.toml", Some(inventory.as_str())),
            ("issuance/candidate.cedar", extra_rules),
        ]);
        Release::build(&files, &TrustDomain::parse("mayfly.local").unwrap(), None, None, "test".into()).unwrap()
    }

    fn ci(repository: &str, event_name: &str) -> OidcClaims {
        OidcClaims {
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: format!("repo:{repository}:ref:refs/heads/main"),
            repository: Some(repository.into()),
            repository_owner: Some("acme".into()),
            // The shipped inventory pins acme/app on its immutable ids.
            repository_id: (repository == "acme/app").then(|| "892735111".into()),
            repository_owner_id: Some("1342004".into()),
            git_ref: Some("refs/heads/main".into()),
            event_name: Some(event_name.into()),
            ..OidcClaims::default()
        }
    }

    fn deploy() -> ResourceRecord {
        ResourceRecord::Aws { role: "arn:aws:iam::111122223333:role/acme-app-deploy".into() }
    }

    fn cache() -> ResourceRecord {
        ResourceRecord::Jwt { audience: "https://artifacts.example.org".into() }
    }

    /// A decision event as issuance writes it, decided by `live`.
    fn event(live: &Release, seq: i64, claims: OidcClaims, resource: ResourceRecord, ttl: u64) -> StoredEvent {
        let request = event::RequestRecord {
            attestation: "oidc".into(),
            selectors: claims.selectors().iter().map(ToString::to_string).collect(),
            resources: vec![resource],
            requested_ttl_secs: ttl,
            oidc: Some(claims.fields().into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect()),
            ..event::RequestRecord::default()
        };
        let mut decision = event::Decision { request: Some(request), ..event::Decision::default() };
        let at_ms = 1_800_000_000_000 + seq;
        let recorded =
            from_decision(&decision, seq, SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms.unsigned_abs()))
                .unwrap();
        let outcome = decide(live, &recorded);
        decision.outcome = if outcome.allowed { event::Verdict::Allow } else { event::Verdict::Deny };
        decision.identity = outcome.identity;
        decision.granted_ttl_secs = outcome.granted_ttl_secs;
        decision.rules = outcome.rules;
        decision.reason = outcome.reason;
        stored(seq, at_ms, Event::Decision(decision))
    }

    fn stored(seq: i64, at_ms: i64, e: Event) -> StoredEvent {
        let (kind, body) = (e.kind().as_str().to_owned(), e.body().unwrap());
        StoredEvent {
            chain: String::new(),
            pos: seq,
            seq,
            at_ms,
            kind,
            body,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    fn traffic(live: &Release) -> Vec<StoredEvent> {
        let refused = event::Decision { reason: "attestation failed".into(), ..event::Decision::default() };
        vec![
            event(live, 1, ci("acme/tools", "push"), deploy(), 1800),
            event(live, 2, ci("acme/tools", "push"), deploy(), 1800),
            event(live, 3, ci("acme/app", "push"), deploy(), 1800),
            event(live, 4, ci("acme/app", "pull_request_target"), cache(), 300),
            event(live, 5, ci("acme/app", "push"), cache(), 300),
            stored(6, 1_800_000_000_006, Event::Decision(refused)),
        ]
    }

    #[test]
    fn a_careless_permit_shows_as_newly_allowed_requests_by_identity_and_rule() {
        let current = release(None);
        let events = traffic(&current);
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let report = replay(&release(Some(CARELESS)), &events, since);
        assert_eq!((report.decisions, report.replayed, report.not_replayable), (6, 5, 1));
        assert_eq!(report.escalations(), 2, "{report:?}");
        let groups = report.grouped();
        let ((change, identity, request, rules), diffs) = groups.iter().next().unwrap();
        assert_eq!(*change, Change::NewlyAllowed);
        assert_eq!(identity, "spiffe://mayfly.local/ci/acme/tools");
        assert_eq!(request, "issue_aws role arn:aws:iam::111122223333:role/acme-app-deploy");
        assert_eq!(rules, &vec!["ci-any-acme-repo-deploys".to_owned()]);
        assert_eq!(diffs.len(), 2);
        assert!(diffs[0].before.reason.contains("no rule permits"), "{}", diffs[0].before.reason);
    }

    #[test]
    fn repeats_counted_in_a_refusals_event_weigh_the_decision_they_repeat() {
        let current = release(None);
        let mut events = traffic(&current);
        // acme/tools' first refusal (seq 1) was repeated 5 times within its window.
        let counted = event::Refusals {
            caller: "subject repo:acme/tools of https://token.actions.githubusercontent.com".into(),
            repeats: vec![event::RefusalRepeats { decision: 1, count: 5 }],
            ..event::Refusals::default()
        };
        events.push(stored(7, 1_800_000_000_007, Event::Refusals(counted)));
        let report = replay(&release(Some(CARELESS)), &events, SystemTime::UNIX_EPOCH);
        assert_eq!((report.decisions, report.repeats), (6, 5));
        assert_eq!(report.escalations(), 7, "2 recorded + 5 counted: {report:?}");
        let d = report.differences.iter().find(|d| d.seq == 1).unwrap();
        assert_eq!(d.requests(), 6);
        assert_eq!(report.requests_with(Change::NewlyAllowed), 7);
    }

    #[test]
    fn a_pure_tightening_escalates_nothing_and_names_who_it_would_break() {
        let current = release(None);
        let report = replay(&release(Some(TIGHTER)), &traffic(&current), SystemTime::UNIX_EPOCH);
        assert_eq!(report.escalations(), 0, "{report:?}");
        assert_eq!(report.differences.len(), 1);
        let d = &report.differences[0];
        assert_eq!((d.change, d.seq), (Change::NewlyDenied, 4));
        assert_eq!(d.after.rules, vec!["forbid-jwt-on-pull-request-target".to_owned()]);
        // The same release again changes nothing.
        assert!(replay(&current, &traffic(&current), SystemTime::UNIX_EPOCH).differences.is_empty());
    }

    #[test]
    fn only_the_window_is_replayed_and_lifetimes_count() {
        let current = release(None);
        let events = traffic(&current);
        let later = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_004);
        assert_eq!(replay(&current, &events, later).decisions, 3);
        let longer = crate::policy::shipped_files_with(&[])
            .get("issuance/ci.cedar")
            .unwrap()
            .replace("@max_ttl(\"30m\")", "@max_ttl(\"2h\")");
        let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/inventory.toml")).unwrap();
        let inventory = format!("{shipped}\n{INVENTORY_EXTRA}");
        let files = shipped_files_with(&[
            ("inventory.toml", Some(inventory.as_str())),
            ("issuance/ci.cedar", Some(longer.as_str())),
        ]);
        let wider =
            Release::build(&files, &TrustDomain::parse("mayfly.local").unwrap(), None, None, "t".into()).unwrap();
        let mut events = events;
        events[2] = event(&current, 3, ci("acme/app", "push"), deploy(), 3600);
        let report = replay(&wider, &events, SystemTime::UNIX_EPOCH);
        let d = report.differences.iter().find(|d| d.seq == 3).unwrap();
        assert_eq!(
            (d.change, d.before.granted_ttl_secs, d.after.granted_ttl_secs),
            (Change::LongerLifetime, Some(1800), Some(3600))
        );
        assert_eq!(report.escalations(), 1);
    }
}

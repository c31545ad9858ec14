//! Replay: decide recorded requests again under another release and say what would
//! change. Every decision event that reached the inventory carries its `request` (the
//! attestation kind, selectors, resources, lifetime, id-token claims, break-glass flag),
//! so the candidate's inventory and rules see exactly what the live ones saw, at the
//! time they saw it. Pure: reads events, writes nothing. Also used by shadow mode, which
//! decides live requests with a candidate beside the active release.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

use super::release::Release;
use super::{AwsRole, Decision, DecisionRequest, RequestContext, Resource, Verdict};
use crate::identity::{InventoryEntry, Lookup, OidcClaims, Selector, Selectors, Ttl, WorkloadId};
use crate::ledger::StoredEvent;

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

/// A decision's result, recorded or recomputed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub allowed: bool,
    pub identity: Option<String>,
    pub granted_ttl_secs: Option<u64>,
    pub rules: Vec<String>,
    pub reason: String,
}

/// What a replayed (or shadowed) request would do differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Denied before, allowed now: possible privilege escalation.
    NewlyAllowed,
    /// Allowed before, for a longer lifetime now.
    LongerLifetime,
    /// Allowed before, denied now: would break someone.
    NewlyDenied,
    /// Allowed before, for a shorter lifetime now.
    ShorterLifetime,
}

impl Change {
    pub fn is_escalation(self) -> bool {
        matches!(self, Change::NewlyAllowed | Change::LongerLifetime)
    }

    pub fn title(self) -> &'static str {
        match self {
            Change::NewlyAllowed => "NEWLY ALLOWED (possible privilege escalation)",
            Change::LongerLifetime => "LONGER LIFETIME (more than was granted)",
            Change::NewlyDenied => "NEWLY DENIED (would break someone)",
            Change::ShorterLifetime => "SHORTER LIFETIME",
        }
    }
}

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
}

impl Difference {
    /// Whose request it is: the identity either release resolved it to.
    pub fn identity(&self) -> String {
        self.after.identity.clone().or_else(|| self.before.identity.clone()).unwrap_or_else(|| "(no identity)".into())
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub candidate: String,
    pub since_unix: i64,
    /// Decision events in the window.
    pub decisions: usize,
    pub replayed: usize,
    /// Refused before the inventory (attestation, an invalid token) or recorded before
    /// decisions carried their request: nothing to decide again.
    pub not_replayable: usize,
    pub differences: Vec<Difference>,
}

impl Report {
    pub fn escalations(&self) -> usize {
        self.differences.iter().filter(|d| d.change.is_escalation()).count()
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
    events.iter().filter(|e| e.kind == "decision").map(parse).collect()
}

fn parse(e: &StoredEvent) -> Result<Recorded, String> {
    let body: Value = serde_json::from_str(&e.body).map_err(|e| e.to_string())?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(e.at_ms.max(0).unsigned_abs());
    from_body(&body, e.seq, at)
}

/// A decision event's body (or the one being written) as a request to decide again.
pub fn from_body(body: &Value, seq: i64, at: SystemTime) -> Result<Recorded, String> {
    let req = body.get("request").filter(|r| !r.is_null()).ok_or("no request recorded")?;
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let selectors = req
        .get("selectors")
        .and_then(Value::as_array)
        .ok_or("no selectors")?
        .iter()
        .map(|s| Selector::parse(s.as_str().unwrap_or_default()).map_err(|e| e.to_string()))
        .collect::<Result<Selectors, String>>()?;
    let resources = req
        .get("resources")
        .and_then(Value::as_array)
        .ok_or("no resources")?
        .iter()
        .map(|r| match r.get("kind").and_then(Value::as_str) {
            Some("x509") => Ok(Resource::X509),
            Some("jwt") => Ok(Resource::Jwt { audience: text(r, "audience").unwrap_or_default() }),
            Some("aws") => AwsRole::parse(&text(r, "role").unwrap_or_default()).map(|role| Resource::Aws { role }),
            other => Err(format!("unknown resource kind {other:?}")),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let ttl = Ttl::from_secs(req.get("requested_ttl_secs").and_then(Value::as_u64).unwrap_or(0)).map_err(|e| e.to_string())?;
    let oidc: Option<OidcClaims> = match req.get("oidc") {
        Some(v) if !v.is_null() => Some(serde_json::from_value(v.clone()).map_err(|e| format!("oidc: {e}"))?),
        _ => None,
    };
    let wanted = text(req, "spiffe_id").map(|s| WorkloadId::parse(&s)).transpose().map_err(|e| e.to_string())?;
    let dev_identity = if req.get("dev_identity").and_then(Value::as_bool) == Some(true) { text(body, "identity") } else { None };
    let allowed = body.get("outcome").and_then(Value::as_str) == Some("allow");
    let outcome = Outcome {
        allowed,
        identity: text(body, "identity"),
        granted_ttl_secs: body.get("granted_ttl_secs").and_then(Value::as_u64),
        rules: body.get("rules").and_then(Value::as_array).map(|r| r.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default(),
        reason: text(body, "reason").unwrap_or_default(),
    };
    Ok(Recorded {
        seq,
        at,
        attestation: text(req, "attestation").unwrap_or_else(|| "unix".into()),
        selectors,
        resources,
        ttl,
        wanted,
        context: RequestContext {
            purpose: text(req, "purpose"),
            target: None,
            break_glass: req.get("break_glass").and_then(Value::as_bool).unwrap_or(false),
            ticket: text(req, "ticket"),
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
    let entry = match (&r.dev_identity, release.inventory.lookup(&r.selectors, r.wanted.as_ref(), crate::clock::utc_date(r.at))) {
        (_, Lookup::Found(entry)) => entry,
        (Some(id), Lookup::NoMatch) => {
            let Ok(id) = WorkloadId::parse(id) else { return denied(None, "the recorded dev identity is not a SPIFFE ID") };
            dev_entry = InventoryEntry {
                id,
                owner: "mayfly dev (--oidc-issuer)".into(),
                purpose: "quick tries of the token exchange".into(),
                environment: "dev".into(),
                tier: "experimental".into(),
                expires: crate::clock::utc_date(r.at),
                selectors: r.selectors.clone(),
            };
            &dev_entry
        }
        (_, Lookup::NoMatch) => return denied(None, "no inventory entry matches this caller"),
        (_, Lookup::Expired(e)) => return denied(Some(e.id.to_string()), &format!("the inventory entry `{}` expired on {}", e.id, e.expires)),
        (_, Lookup::Ambiguous(ids)) => return denied(None, &format!("the caller matches several identities ({})", ids.len())),
    };
    let decisions: Vec<Decision> = r
        .resources
        .iter()
        .map(|resource| {
            let req = DecisionRequest { workload: entry, attestation: &r.attestation, selectors: &r.selectors, resource, requested_ttl: r.ttl, context: &r.context };
            release.engine.decide(&req, r.at)
        })
        .collect();
    let allowed = !decisions.is_empty() && decisions.iter().all(Decision::is_allow);
    let mut rules: Vec<String> = decisions.iter().filter(|d| d.is_allow() == allowed).flat_map(|d| d.rules.iter().cloned()).collect();
    rules.sort();
    rules.dedup();
    let granted = decisions
        .iter()
        .filter_map(|d| match &d.verdict {
            Verdict::Allow(g) => Some(g.ttl().as_secs()),
            Verdict::Deny => None,
        })
        .min()
        .filter(|_| allowed);
    let reason = decisions.iter().filter(|d| d.is_allow() == allowed).map(Decision::explain).collect::<Vec<_>>().join("; ");
    Outcome { allowed, identity: Some(entry.id.to_string()), granted_ttl_secs: granted, rules, reason }
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
    let since_ms = i64::try_from(since.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX);
    let window: Vec<StoredEvent> = events.iter().filter(|e| e.kind == "decision" && e.at_ms >= since_ms).cloned().collect();
    let mut report = Report {
        candidate: candidate.version().to_owned(),
        since_unix: crate::clock::unix_secs(since),
        decisions: window.len(),
        ..Report::default()
    };
    for r in recorded(&window) {
        let Ok(r) = r else {
            report.not_replayable += 1;
            continue;
        };
        report.replayed += 1;
        let after = decide(candidate, &r);
        if let Some(change) = compare(&r.outcome, &after) {
            let (action, resource) = describe(&r.resources);
            report.differences.push(Difference {
                seq: r.seq,
                at_unix: crate::clock::unix_secs(r.at),
                change,
                action,
                resource,
                before: r.outcome.clone(),
                after,
            });
        }
    }
    report
}

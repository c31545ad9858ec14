//! Ledger events as SIEM records: OCSF 1.3.0 events or CloudEvents 1.0, one JSON object
//! each. Owns the class mapping (README: "Exporting to a SIEM") and the scrub that keeps
//! anything token- or key-shaped out of an export even if a future event carried it (the
//! ledger holds no secrets by construction; this is the second fence). Pure: reading and
//! following the ledger is the CLI's.

use serde_json::{Map, Value, json};

use super::StoredEvent;
use super::event::{Event, Stage, Verdict};

/// The OCSF schema version the records follow.
pub const OCSF_VERSION: &str = "1.3.0";
/// `datacontenttype` of every CloudEvent.
pub const CONTENT_TYPE: &str = "application/json";
/// The prefix of every CloudEvents `type`: `org.mayfly.ledger.<kind>`.
pub const TYPE_PREFIX: &str = "org.mayfly.ledger.";

/// What a record says about where it comes from.
#[derive(Clone, Debug)]
pub struct Origin {
    /// CloudEvents `source` (a URI reference), e.g. `urn:mayfly:<host>`.
    pub source: String,
    /// The host the exporter runs on (OCSF `src_endpoint.hostname`, `device`).
    pub host: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// OCSF 1.3.0 events (class per kind: README "Exporting to a SIEM").
    Ocsf,
    /// CloudEvents 1.0, structured mode, `type` org.mayfly.ledger.<kind>.
    Cloudevents,
}

/// One event as a record of `format`.
pub fn record(format: Format, origin: &Origin, e: &StoredEvent) -> Value {
    match format {
        Format::Ocsf => ocsf(origin, e),
        Format::Cloudevents => cloud_event(origin, e),
    }
}

/// The event's body, parsed and scrubbed (an undecodable body becomes `{}` plus a note).
fn body(e: &StoredEvent) -> Value {
    match serde_json::from_str::<Value>(&e.body) {
        Ok(v) => scrub(v),
        Err(_) => json!({ "undecodable_body": true }),
    }
}

/// Removes every field whose name says token, secret, password or private key, and every
/// string that looks like a JWT or a PEM block, at any depth.
pub fn scrub(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter().filter(|(k, v)| !secret_name(k) && !secret_shaped(v)).map(|(k, v)| (k, scrub(v))).collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().filter(|v| !secret_shaped(v)).map(scrub).collect()),
        other => other,
    }
}

fn secret_name(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    // Why not every `*key*`: `access_key_id` and `key_id` name keys, they are not keys.
    let ids = k.ends_with("_id") || k.ends_with("_ids") || k == "kid" || k.ends_with("_jkt") || k.ends_with("_jti");
    let secret_word = ["token", "secret", "password", "passwd", "private", "jwk", "pem"].iter().any(|w| k.contains(w));
    let a_key = k == "key" || k.ends_with("_key") || k.starts_with("key_");
    (secret_word || a_key) && !ids
}

fn secret_shaped(v: &Value) -> bool {
    let Value::String(s) = v else { return false };
    let jwt = s.starts_with("eyJ") && s.split('.').count() >= 3;
    jwt || s.contains("-----BEGIN")
}

fn rfc3339(at_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

// --- CloudEvents 1.0 ---------------------------------------------------------------------

fn cloud_event(origin: &Origin, e: &StoredEvent) -> Value {
    let mut ce = json!({
        "specversion": "1.0",
        // Why the hash: unique per event across chains and daemons (source + id must be).
        "id": e.hash,
        "source": origin.source,
        "type": format!("{TYPE_PREFIX}{}", e.kind),
        "time": rfc3339(e.at_ms),
        "datacontenttype": CONTENT_TYPE,
        "mayflyseq": e.seq,
        "data": body(e),
    });
    if !e.chain.is_empty() {
        ce["mayflychain"] = Value::String(e.chain.clone());
    }
    if let Some(subject) = subject(e) {
        ce["subject"] = Value::String(subject);
    }
    ce
}

/// The identity an event is about, when it names one.
fn subject(e: &StoredEvent) -> Option<String> {
    match e.event().ok()? {
        Event::Decision(d) => d.identity,
        Event::Issued(i) => Some(i.credential.identity),
        Event::Used(u) => Some(u.identity),
        Event::Expired(x) => Some(x.identity),
        Event::Revoked(r) => Some(r.target),
        Event::Locked(l) => Some(l.lock.target),
        Event::Unlocked(u) => Some(u.target),
        Event::BreakGlass(b) => b.identity,
        _ => None,
    }
    .filter(|s| !s.is_empty())
}

// --- OCSF 1.3.0 --------------------------------------------------------------------------

/// Where an event lands in OCSF.
struct Class {
    class_uid: u32,
    class_name: &'static str,
    activity_id: u32,
    activity_name: String,
    /// 0 unknown, 1 success, 2 failure, 99 other.
    status_id: u32,
    /// 1 informational, 2 low, 3 medium, 4 high.
    severity_id: u32,
    message: String,
}

const AUTHENTICATION: (u32, &str) = (3002, "Authentication");
const AUTHORIZE_SESSION: (u32, &str) = (3003, "Authorize Session");
const ENTITY_MANAGEMENT: (u32, &str) = (3004, "Entity Management");
const ACCOUNT_CHANGE: (u32, &str) = (3001, "Account Change");
const API_ACTIVITY: (u32, &str) = (6003, "API Activity");

fn class(e: &StoredEvent, event: Option<&Event>) -> Class {
    let c = |(class_uid, class_name): (u32, &'static str),
             activity_id,
             activity_name: &str,
             status_id,
             severity_id,
             message: String| Class {
        class_uid,
        class_name,
        activity_id,
        activity_name: activity_name.to_owned(),
        status_id,
        severity_id,
        message,
    };
    let elevated = |break_glass: bool, normal: u32| if break_glass { 4 } else { normal };
    match event {
        Some(Event::Decision(d)) => {
            let allowed = d.outcome == Verdict::Allow;
            let what = d.resource.clone().unwrap_or_else(|| d.action.clone());
            c(
                AUTHORIZE_SESSION,
                1,
                "Assign Privileges",
                if allowed { 1 } else { 2 },
                elevated(d.break_glass, if allowed { 1 } else { 2 }),
                format!("{} {what}: {}", if allowed { "allowed" } else { "denied" }, d.reason),
            )
        }
        Some(Event::Issued(i)) => c(
            AUTHENTICATION,
            3,
            "Authentication Ticket",
            1,
            elevated(i.details.break_glass, 1),
            format!("{} credential issued to {}", i.credential.kind, i.credential.identity),
        ),
        Some(Event::Used(u)) => c(
            AUTHENTICATION,
            99,
            "Credential Validation",
            if u.refused.is_some() { 2 } else { 1 },
            elevated(u.break_glass, 1),
            format!("{} {} of {}", u.kind, u.use_kind, u.identity),
        ),
        Some(Event::Expired(x)) => {
            c(ENTITY_MANAGEMENT, 4, "Delete", 1, elevated(x.break_glass, 1), format!("{} credential expired", x.kind))
        }
        Some(Event::Revoked(r)) => c(
            ENTITY_MANAGEMENT,
            4,
            "Delete",
            1,
            3,
            format!("revoked {} credentials of {}: {}", r.credentials.len(), r.target, r.reason),
        ),
        Some(Event::Locked(l)) => {
            c(ACCOUNT_CHANGE, 9, "Lock", 1, 3, format!("locked {}: {}", l.lock.target, l.lock.reason))
        }
        Some(Event::Unlocked(u)) => {
            c(ACCOUNT_CHANGE, 2, "Enable", 1, 2, format!("unlocked {}: {}", u.target, u.reason))
        }
        Some(Event::BreakGlass(b)) => {
            let status = match b.stage {
                Stage::Approved => 1,
                Stage::Denied | Stage::ApprovalRefused | Stage::Refused => 2,
                Stage::Pending | Stage::Reviewed => 99,
            };
            let stage = serde_json::to_value(b.stage).ok().and_then(|v| v.as_str().map(str::to_owned));
            let stage = stage.unwrap_or_default();
            c(AUTHORIZE_SESSION, 99, &format!("Break-glass {stage}"), status, 4, format!("break-glass {stage}"))
        }
        other => {
            let (activity_id, activity_name, status_id, severity_id) = match other {
                Some(Event::PolicyRejected(_) | Event::CaRejected(_) | Event::JwtKeyRejected(_)) => (3, "Update", 2, 3),
                Some(
                    Event::PolicyActivated(_)
                    | Event::PolicyRolledBack(_)
                    | Event::PolicyShadow(_)
                    | Event::CaRotated(_)
                    | Event::JwtKeyRotated(_)
                    | Event::ConfigReloaded(_),
                ) => (3, "Update", 1, 1),
                Some(Event::PolicyCheck(_)) => (2, "Read", 1, 1),
                Some(Event::AwsDenyRemoved(_)) => (4, "Delete", 1, 1),
                Some(Event::DaemonStarted(_) | Event::DaemonStopped(_)) => (99, "Other", 1, 1),
                Some(Event::Admin(_) | Event::PolicyShadowDiff(_)) => (99, "Other", 1, 1),
                _ => (0, "Unknown", 0, 1),
            };
            c(API_ACTIVITY, activity_id, activity_name, status_id, severity_id, format!("{} event", e.kind))
        }
    }
}

fn severity_name(id: u32) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        _ => "Unknown",
    }
}

fn status_name(id: u32) -> &'static str {
    match id {
        1 => "Success",
        2 => "Failure",
        99 => "Other",
        _ => "Unknown",
    }
}

fn ocsf(origin: &Origin, e: &StoredEvent) -> Value {
    let event = e.event().ok();
    let k = class(e, event.as_ref());
    let category_uid = k.class_uid / 1000;
    let mut r = Map::new();
    r.insert("class_uid".into(), json!(k.class_uid));
    r.insert("class_name".into(), json!(k.class_name));
    r.insert("category_uid".into(), json!(category_uid));
    r.insert(
        "category_name".into(),
        json!(if category_uid == 3 { "Identity & Access Management" } else { "Application Activity" }),
    );
    r.insert("activity_id".into(), json!(k.activity_id));
    r.insert("activity_name".into(), json!(k.activity_name));
    r.insert("type_uid".into(), json!(u64::from(k.class_uid) * 100 + u64::from(k.activity_id)));
    r.insert("type_name".into(), json!(format!("{}: {}", k.class_name, k.activity_name)));
    r.insert("time".into(), json!(e.at_ms));
    r.insert("time_dt".into(), json!(rfc3339(e.at_ms)));
    r.insert("severity_id".into(), json!(k.severity_id));
    r.insert("severity".into(), json!(severity_name(k.severity_id)));
    r.insert("status_id".into(), json!(k.status_id));
    r.insert("status".into(), json!(status_name(k.status_id)));
    r.insert("message".into(), json!(k.message));
    r.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "product": { "name": "mayfly", "vendor_name": "mayfly", "version": env!("CARGO_PKG_VERSION") },
            "uid": e.hash,
            "sequence": e.seq,
            "log_name": if e.chain.is_empty() { "ledger".to_owned() } else { format!("ledger/{}", e.chain) },
            "event_code": e.kind,
        }),
    );
    let subject = subject(e);
    let user = json!({ "name": subject.clone().unwrap_or_else(|| "unattested caller".to_owned()), "type_id": 99, "type": "Workload" });
    match k.class_uid {
        3002 => {
            r.insert("user".into(), user);
            r.insert("service".into(), json!({ "name": "mayfly" }));
            if let Some(Event::Issued(i)) = &event {
                r.insert(
                    "status_detail".into(),
                    json!(format!("credential {} serial {}", i.credential.id, i.credential.serial)),
                );
            }
        }
        3003 => {
            r.insert("user".into(), user);
            let privileges = match &event {
                Some(Event::Decision(d)) => {
                    vec![format!("{} {}", d.action, d.resource.clone().unwrap_or_default()).trim().to_owned()]
                }
                _ => vec!["break_glass".to_owned()],
            };
            r.insert("privileges".into(), json!(privileges));
            if let Some(Event::Decision(d)) = &event {
                r.insert("status_detail".into(), json!(d.reason));
            }
        }
        3004 => {
            let entity = match &event {
                Some(Event::Expired(x)) => json!({ "uid": x.credential_id, "name": x.identity, "type": "credential" }),
                _ => json!({ "name": subject.clone().unwrap_or_default(), "type": "credential" }),
            };
            r.insert("entity".into(), entity);
        }
        3001 => {
            r.insert("user".into(), user);
        }
        _ => {
            r.insert("actor".into(), json!({ "app_name": "mayfly" }));
            r.insert("api".into(), json!({ "operation": e.kind, "service": { "name": "mayfly" } }));
            r.insert("src_endpoint".into(), json!({ "hostname": origin.host }));
        }
    }
    r.insert("device".into(), json!({ "hostname": origin.host, "type_id": 1 }));
    // Why `unmapped`: OCSF's place for source fields no attribute holds; the ledger row
    // keeps what an auditor needs to find the event again (seq, hashes) and its body.
    r.insert(
        "unmapped".into(),
        json!({ "kind": e.kind, "seq": e.seq, "chain": e.chain, "prev_hash": e.prev_hash, "hash": e.hash, "event": body(e) }),
    );
    Value::Object(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_fields_and_secret_shaped_values_never_leave() {
        let dirty = json!({
            "identity": "spiffe://mayfly.local/a",
            "access_key_id": "ASIAEXAMPLE",
            "secret_access_key": "s3cr3t",
            "session_token": "tok",
            "private_key": "k",
            "key": "k",
            "kid": "abc",
            "cnf_jkt": "thumb",
            "nested": [{"token": "t", "ok": 1}, "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "-----BEGIN PRIVATE KEY-----x"],
            "note": "eyJhbGciOiJFUzI1NiJ9.eyJ4IjoxfQ.sig",
        });
        let clean = scrub(dirty);
        let text = clean.to_string();
        for gone in ["s3cr3t", "\"tok\"", "private_key", "\"key\"", "eyJ", "BEGIN", "\"token\""] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        for kept in ["ASIAEXAMPLE", "\"kid\"", "thumb", "\"ok\":1", "spiffe://mayfly.local/a"] {
            assert!(text.contains(kept), "{kept} missing from {text}");
        }
    }
}

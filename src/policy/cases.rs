//! Policy test cases (`policies/tests/*.toml`): a request as attestation would present it →
//! the expected decision, optionally the deciding rule ids and the granted TTL. Pure: the
//! caller reads the files; `run` decides each case with the given engine and inventory.

use std::time::SystemTime;

use serde::Deserialize;

use super::{CredentialKind, DecisionRequest, Engine, Verdict};
use crate::identity::{Inventory, Selector, Selectors, Ttl};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    #[serde(rename = "case", default)]
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// A SPIFFE ID registered in inventory.toml.
    pub identity: String,
    /// `issue_x509`.
    pub action: String,
    /// Requested lifetime, e.g. "30m".
    pub ttl: String,
    /// Attested selectors the request carries (default: none).
    #[serde(default)]
    pub selectors: Vec<String>,
    /// Decision time, RFC 3339 (default: now).
    pub now: Option<toml::value::Datetime>,
    /// "allow" or "deny".
    pub expect: String,
    /// The deciding rule ids, in any order (checked only when given).
    pub rules: Option<Vec<String>>,
    /// The lifetime the grant must carry (checked only when given; allow only).
    pub granted_ttl: Option<String>,
}

/// One case's result: `None` when it passed, otherwise what went wrong.
pub struct Outcome {
    pub name: String,
    pub failure: Option<String>,
}

pub fn run(engine: &Engine, inventory: &Inventory, file: &CaseFile, default_now: SystemTime) -> Vec<Outcome> {
    file.cases
        .iter()
        .map(|case| Outcome { name: case.name.clone(), failure: check(engine, inventory, case, default_now).err() })
        .collect()
}

fn check(engine: &Engine, inventory: &Inventory, case: &Case, default_now: SystemTime) -> Result<(), String> {
    let workload = inventory
        .entries()
        .iter()
        .find(|e| e.id.as_str() == case.identity)
        .ok_or_else(|| format!("identity `{}` is not in inventory.toml", case.identity))?;
    let kind = match case.action.as_str() {
        "issue_x509" => CredentialKind::X509,
        other => return Err(format!("unknown action `{other}` (known: issue_x509)")),
    };
    let requested_ttl = Ttl::parse(&case.ttl).map_err(|e| format!("ttl: {e}"))?;
    let selectors = case
        .selectors
        .iter()
        .map(|s| Selector::parse(s))
        .collect::<Result<Selectors, _>>()
        .map_err(|e| e.to_string())?;
    let now = match &case.now {
        Some(dt) => time::OffsetDateTime::parse(&dt.to_string(), &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("now `{dt}`: {e} (use RFC 3339, e.g. 2026-11-23T12:00:00Z)"))?
            .into(),
        None => default_now,
    };
    let decision = engine.decide(&DecisionRequest { workload, selectors: &selectors, kind, requested_ttl }, now);
    let decided = if decision.is_allow() { "allow" } else { "deny" };
    if decided != case.expect {
        return Err(format!("expected {}, decided {decided}: {}", case.expect, decision.explain()));
    }
    if let Some(expected) = &case.rules {
        let (mut want, mut got) = (expected.clone(), decision.rules.clone());
        want.sort();
        got.sort();
        if want != got {
            return Err(format!("expected deciding rules {want:?}, got {got:?}: {}", decision.explain()));
        }
    }
    if let Some(ttl) = &case.granted_ttl {
        let want = Ttl::parse(ttl).map_err(|e| format!("granted_ttl: {e}"))?;
        match &decision.verdict {
            Verdict::Allow(grant) if grant.ttl() == want => {}
            Verdict::Allow(grant) => return Err(format!("expected granted ttl {want}, got {}", grant.ttl())),
            Verdict::Deny => return Err("granted_ttl given for a denied request".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::identity::TrustDomain;

    fn shipped() -> (Engine, Inventory, String) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let engine = Engine::load(&dir).unwrap();
        let td = TrustDomain::parse("mayfly.local").unwrap();
        let inventory = Inventory::parse(&std::fs::read_to_string(dir.join("inventory.toml")).unwrap(), &td).unwrap();
        (engine, inventory, std::fs::read_to_string(dir.join("tests/local.toml")).unwrap())
    }

    #[test]
    fn shipped_cases_pass() {
        let (engine, inventory, text) = shipped();
        let file: CaseFile = toml::from_str(&text).unwrap();
        let outcomes = run(&engine, &inventory, &file, SystemTime::now());
        assert!(outcomes.len() >= 4);
        for o in outcomes {
            assert!(o.failure.is_none(), "{}: {:?}", o.name, o.failure);
        }
    }

    #[test]
    fn a_wrong_expectation_fails_with_what_was_decided_and_why() {
        let (engine, inventory, text) = shipped();
        let file: CaseFile = toml::from_str(&text.replacen("expect = \"deny\"", "expect = \"allow\"", 1)).unwrap();
        let failures: Vec<String> =
            run(&engine, &inventory, &file, SystemTime::now()).into_iter().filter_map(|o| o.failure).collect();
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("expected allow, decided deny") && failures[0].contains("forbid-ttl-over-12h"));

        let wrong_rule = text.replacen("rules = [\"local-workloads-x509\"]", "rules = [\"other\"]", 1);
        let file: CaseFile = toml::from_str(&wrong_rule).unwrap();
        let failures: Vec<String> =
            run(&engine, &inventory, &file, SystemTime::now()).into_iter().filter_map(|o| o.failure).collect();
        assert!(failures[0].contains("expected deciding rules"), "{failures:?}");

        let unknown = text.replacen("spiffe://mayfly.local/dev/quickstart", "spiffe://mayfly.local/nobody", 1);
        let file: CaseFile = toml::from_str(&unknown).unwrap();
        let failures: Vec<String> =
            run(&engine, &inventory, &file, SystemTime::now()).into_iter().filter_map(|o| o.failure).collect();
        assert!(failures[0].contains("not in inventory.toml"));
    }
}

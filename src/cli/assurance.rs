//! `mayfly policy replay | diff --prove | promote-check | shadow`: the checks a release
//! pipeline runs before a candidate policy release is promoted, and shadow mode on a
//! running daemon. Exit codes: 0 nothing escalates; 1 an escalation (or a failed test, a
//! bad release); 2 the check could not be run (no solver, unreadable input).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::api::pb::{PolicyShadowRequest, RecordPolicyCheckRequest};
use crate::clock::{rfc3339, unix_secs};
use crate::identity::{TrustDomain, Ttl};
use crate::ledger::event::{Event, EventKind, ShadowState};
use crate::ledger::{EventFilter, read_typed};
use crate::policy::bundle::{Bundle, PolicyFiles, PublicKey};
use crate::policy::prove::{self, ProofReport, ProveError};
use crate::policy::release::Release;
use crate::policy::replay::{self, Report};

#[derive(clap::Args)]
pub struct Source {
    /// Trust domain inventory ids must belong to.
    #[arg(long, default_value = crate::config::DEV_TRUST_DOMAIN)]
    trust_domain: String,
    /// Verify bundle files' signatures with these public keys (PEM; repeatable). Without
    /// one a bundle is read unverified, and the report says so.
    #[arg(long)]
    key: Vec<PathBuf>,
}

#[derive(clap::Args)]
pub struct LedgerArgs {
    #[command(flatten)]
    at: super::LedgerAt,
    /// How far back to replay recorded requests (e.g. 24h, 7d).
    #[arg(long, default_value = "24h")]
    since: String,
}

impl LedgerArgs {
    pub fn new(at: super::LedgerAt, since: String) -> Self {
        Self { at, since }
    }
}

/// A release to check: a policies/ directory or a bundle file.
pub struct Loaded {
    pub release: Release,
    pub files: PolicyFiles,
    /// How it was vouched for: `directory`, `unverified bundle`, `signed by <key>`.
    pub trust: String,
}

pub fn load(path: &Path, source: &Source) -> Result<Loaded, String> {
    let td = TrustDomain::parse(&source.trust_domain).map_err(|e| format!("--trust-domain: {e}"))?;
    if path.is_dir() {
        let files = PolicyFiles::read_dir(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
        let release = Release::build(&files, &td, None, None, path.display().to_string())
            .map_err(|e| format!("`{}`: {e}", path.display()))?;
        return Ok(Loaded { release, files, trust: "directory".into() });
    }
    let bytes = std::fs::read(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let bundle = Bundle::parse(&bytes).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let (signed_by, trust) = if source.key.is_empty() {
        (None, "unverified bundle (no --key)".to_owned())
    } else {
        let keys =
            source.key.iter().map(|k| PublicKey::load(k)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
        let id = bundle.verify(&keys).map_err(|e| format!("`{}`: {e}", path.display()))?;
        (Some(id.clone()), format!("signed by {id}"))
    };
    let release =
        Release::build(&bundle.files, &td, bundle.manifest.label.clone(), signed_by, path.display().to_string())
            .map_err(|e| format!("`{}`: {e}", path.display()))?;
    Ok(Loaded { release, files: bundle.files, trust })
}

fn since(text: &str) -> Result<SystemTime, String> {
    let ttl = Ttl::parse(text).map_err(|e| format!("--since: {e}"))?;
    Ok(SystemTime::now() - ttl.as_duration())
}

async fn replay_ledger(candidate: &Release, ledger: &LedgerArgs) -> Result<Report, String> {
    let from = since(&ledger.since)?;
    let (location, reader) = ledger.at.open().await?;
    // A page at a time: a busy day is millions of decisions, and memory stays flat.
    let mut report = Report::start(candidate, from);
    let mut after = 0;
    loop {
        let filter = EventFilter {
            chain: None,
            kinds: vec![EventKind::Decision, EventKind::Refusals],
            after,
            since_ms: Some(replay::epoch_ms(from)),
            limit: Some(5000),
            last: None,
        };
        let page = reader.events(filter).await.map_err(|e| format!("ledger `{location}`: {e}"))?;
        let Some(last) = page.last() else { break };
        after = last.pos;
        report.feed(candidate, &page);
    }
    Ok(report)
}

/// The replay report as text, grouped by change, identity, request and deciding rules.
pub fn replay_text(r: &Report) -> String {
    let mut out = format!(
        "replay: candidate {} against {} recorded decisions since {} ({} replayed, {} not replayable: refused before the inventory, or recorded without their request)\n",
        r.candidate,
        r.decisions,
        rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(r.since_unix.max(0).unsigned_abs())),
        r.replayed,
        r.not_replayable
    );
    if r.repeats > 0 {
        out.push_str(&format!(
            "  and {} repeated refusal(s) counted with the decisions they repeat (refusals events)\n",
            r.repeats
        ));
    }
    let mut last = None;
    for ((change, identity, request, rules), diffs) in r.grouped() {
        if last != Some(change) {
            let count = r.requests_with(change);
            out.push_str(&format!("{}: {count} request(s)\n", change.title()));
            last = Some(change);
        }
        let d = diffs[0];
        let rules = if rules.is_empty() { "no rule".to_owned() } else { rules.join(", ") };
        let lifetimes = match (d.before.granted_ttl_secs, d.after.granted_ttl_secs) {
            (Some(b), Some(a)) if a != b => format!(" (lifetime {b}s → {a}s)"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  {identity}  {request}  ×{}  now: {}{lifetimes}; by {rules}\n",
            diffs.iter().map(|d| d.requests()).sum::<u64>(),
            if d.after.allowed { "allowed" } else { "denied" }
        ));
        out.push_str(&format!("      was: {}\n      now: {}\n", d.before.reason, d.after.reason));
    }
    let esc = r.escalations();
    out.push_str(&if esc > 0 {
        format!("result: ESCALATION: {esc} recorded request(s) would get more under the candidate\n")
    } else {
        format!("result: no escalation ({} difference(s))\n", r.differences.len())
    });
    out
}

pub fn proof_text(p: &ProofReport) -> String {
    let mut out = format!(
        "proof: candidate {} against current {}: {} request environments, {} solver queries{}\n",
        p.candidate,
        p.current,
        p.environments,
        p.queries,
        if p.critical_checked {
            ", critical requests per assurance/critical.cedar"
        } else {
            ", no assurance/critical.cedar: critical check skipped"
        }
    );
    for f in &p.findings {
        let what = match f.check {
            "escalation" => "the candidate allows a request the current release denies",
            "break_glass_escalation" => "the candidate's break-glass rules allow a request the current ones deny",
            "critical" => "a break-glass rule permits a critical request",
            "can_error" => "a rule can error (and so silently not apply)",
            "longer_max_ttl" => "a rule's lifetime ceiling went up",
            "annotation" => "an annotation loosens the rule",
            other => other,
        };
        out.push_str(&format!(
            "FINDING {}: {what}\n  environment: {}\n  granted by: {}\n",
            f.check,
            f.env,
            f.rules.join(", ")
        ));
        out.push_str(&format!("  counterexample:\n{}\n", indent(&f.counterexample, "    ")));
    }
    for i in &p.inconclusive {
        out.push_str(&format!("INCONCLUSIVE {i}\n"));
    }
    out.push_str(if p.proven() {
        "result: proven: the candidate permits nothing the current release denies\n"
    } else {
        "result: NOT PROVEN\n"
    });
    out
}

fn indent(text: &str, by: &str) -> String {
    text.lines().map(|l| format!("{by}{l}")).collect::<Vec<_>>().join("\n")
}

async fn record(admin_socket: Option<&Path>, report: &Value) -> Result<(), ExitCode> {
    let Some(socket) = admin_socket else { return Ok(()) };
    let mut client = super::admin(socket).await?;
    match client.record_policy_check(RecordPolicyCheckRequest { report: report.to_string() }).await {
        Ok(r) => {
            eprintln!("recorded as ledger event {}", r.into_inner().event_id);
            Ok(())
        }
        Err(s) => Err(super::fail(format!("the check ran but could not be recorded: {}", s.message()))),
    }
}

pub async fn replay_cmd(
    bundle: &Path,
    source: &Source,
    ledger: &LedgerArgs,
    json_out: bool,
    admin_socket: Option<&Path>,
) -> ExitCode {
    let candidate = match load(bundle, source) {
        Ok(c) => c,
        Err(why) => return super::fail(format!("candidate: {why}")),
    };
    let report = match replay_ledger(&candidate.release, ledger).await {
        Ok(r) => r,
        Err(why) => {
            eprintln!("mayfly: {why}");
            return ExitCode::from(2);
        }
    };
    let doc = json!({ "check": "replay", "candidate_trust": candidate.trust, "escalations": report.escalations(), "replay": report });
    if json_out {
        out!("{doc}");
    } else {
        super::print_text(&replay_text(&report));
    }
    if let Err(code) = record(admin_socket, &doc).await {
        return code;
    }
    if report.escalations() > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

pub async fn diff_cmd(
    prove_it: bool,
    current: &Path,
    candidate: &Path,
    source: &Source,
    json_out: bool,
    admin_socket: Option<&Path>,
) -> ExitCode {
    if !prove_it {
        return super::fail(
            "only `mayfly policy diff --prove CURRENT CANDIDATE` is served (the proof); for recorded traffic use `policy replay`",
        );
    }
    let (cur, cand) = match (load(current, source), load(candidate, source)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(why), _) => return super::fail(format!("current: {why}")),
        (_, Err(why)) => return super::fail(format!("candidate: {why}")),
    };
    let marker = match prove::critical_marker(&cand.files) {
        Ok(m) => m,
        Err(why) => return super::fail(why),
    };
    let report = match prove::prove(&cur.release.engine, &cand.release.engine, marker.as_ref()).await {
        Ok(r) => r,
        // Exit 2 (not 1): the release was not judged, either way.
        Err(e) => {
            eprintln!("mayfly: {e}");
            return ExitCode::from(2);
        }
    };
    let doc = json!({ "check": "proof", "proven": report.proven(), "proof": report });
    if json_out {
        out!("{doc}");
    } else {
        super::print_text(&proof_text(&report));
    }
    if let Err(code) = record(admin_socket, &doc).await {
        return code;
    }
    if report.proven() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Rules by id with their text, across issuance and break-glass sets.
fn rule_texts(release: &Release) -> BTreeMap<String, String> {
    let e = &release.engine;
    e.issuance_rules()
        .policies()
        .chain(e.break_glass_rules().policies())
        .map(|p| (p.id().to_string(), p.to_string()))
        .collect()
}

pub struct PromoteArgs<'a> {
    pub current: &'a Path,
    pub candidate: &'a Path,
    pub source: &'a Source,
    /// Replay only when a ledger is given (or the default data dir has one).
    pub ledger: Option<&'a LedgerArgs>,
    pub json_out: bool,
    pub admin_socket: Option<&'a Path>,
    /// A skipped proof (no cvc5) or replay (no ledger) blocks instead of passing.
    pub require_proof: bool,
    pub require_replay: bool,
}

pub async fn promote_check(a: PromoteArgs<'_>) -> ExitCode {
    let cur = match load(a.current, a.source) {
        Ok(c) => c,
        Err(why) => return super::fail(format!("current: {why}")),
    };
    let mut rows: Vec<(String, String, bool)> = Vec::new(); // check, result, blocks
    let cand = match load(a.candidate, a.source) {
        Ok(c) => {
            rows.push((
                "validate".into(),
                format!(
                    "pass: {} rules, {} inventory entries ({})",
                    c.release.engine.rule_count(),
                    c.release.inventory.entries().len(),
                    c.trust
                ),
                false,
            ));
            c
        }
        Err(why) => {
            out!(
                "# Policy promotion check\n\n| check | result |\n|---|---|\n| validate | **FAIL**: {why} |\n\n**verdict: BLOCK**"
            );
            return ExitCode::FAILURE;
        }
    };
    let tests = cand.release.test(&cand.files, SystemTime::now());
    let tests_failed = match &tests {
        Ok(n) if *n > 0 => {
            rows.push(("tests".into(), format!("pass: {n} cases"), false));
            false
        }
        Ok(_) => {
            rows.push(("tests".into(), "**FAIL**: tests/ has no cases".into(), true));
            true
        }
        Err(why) => {
            rows.push(("tests".into(), format!("**FAIL**: {why}"), true));
            true
        }
    };
    let replay_report = match a.ledger {
        Some(l) => match replay_ledger(&cand.release, l).await {
            Ok(r) => {
                let esc = r.escalations();
                let summary = format!(
                    "{}: {} decisions replayed since {}; {} newly allowed, {} longer lifetime, {} newly denied",
                    if esc > 0 { "**ESCALATION**" } else { "pass" },
                    r.replayed,
                    rfc3339(
                        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(r.since_unix.max(0).unsigned_abs())
                    ),
                    r.requests_with(replay::Change::NewlyAllowed),
                    r.requests_with(replay::Change::LongerLifetime),
                    r.requests_with(replay::Change::NewlyDenied),
                );
                rows.push(("replay".into(), summary, esc > 0));
                Some(r)
            }
            Err(why) => {
                rows.push(("replay".into(), format!("skipped: {why}"), a.require_replay));
                None
            }
        },
        None => {
            rows.push(("replay".into(), "skipped: no ledger given (--ledger or --data-dir)".into(), a.require_replay));
            None
        }
    };
    let marker = prove::critical_marker(&cand.files);
    let proof = match marker {
        Err(why) => {
            rows.push(("proof".into(), format!("**FAIL**: {why}"), true));
            None
        }
        Ok(marker) => match prove::prove(&cur.release.engine, &cand.release.engine, marker.as_ref()).await {
            Ok(p) => {
                let result = if p.proven() {
                    format!("pass: proven over {} request environments ({} queries)", p.environments, p.queries)
                } else {
                    format!("**NOT PROVEN**: {} finding(s), {} inconclusive", p.findings.len(), p.inconclusive.len())
                };
                rows.push(("proof".into(), result, !p.proven()));
                Some(p)
            }
            Err(ProveError::SolverMissing(why)) => {
                rows.push((
                    "proof".into(),
                    format!("skipped: the cvc5 solver is not available ({why}); {}", prove::INSTALL_HINT),
                    a.require_proof,
                ));
                None
            }
            Err(e) => {
                rows.push(("proof".into(), format!("**FAIL**: {e}"), true));
                None
            }
        },
    };
    let (before, after) = (rule_texts(&cur.release), rule_texts(&cand.release));
    let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed: Vec<&String> = after.keys().filter(|k| before.get(*k).is_some_and(|t| t != &after[*k])).collect();
    let blocked = rows.iter().any(|(_, _, b)| *b) || tests_failed;
    let label = |r: &Release| r.provenance.label.as_deref().map(|l| format!(" ({l})")).unwrap_or_default();
    let doc = json!({
        "check": "promote-check",
        "current": cur.release.version(),
        "candidate": cand.release.version(),
        "candidate_trust": cand.trust,
        "verdict": if blocked { "block" } else { "pass" },
        "checks": rows.iter().map(|(c, r, b)| json!({ "check": c, "result": r, "blocks": b })).collect::<Vec<_>>(),
        "rules": { "added": added, "removed": removed, "changed": changed },
        "replay": replay_report,
        "proof": proof,
        "at": unix_secs(SystemTime::now()),
    });
    if a.json_out {
        out!("{doc}");
    } else {
        let mut md = format!(
            "# Policy promotion check\n\ncurrent `{}`{} → candidate `{}`{} ({})\n\n| check | result |\n|---|---|\n",
            cur.release.version(),
            label(&cur.release),
            cand.release.version(),
            label(&cand.release),
            cand.trust
        );
        for (check, result, _) in &rows {
            md.push_str(&format!("| {check} | {} |\n", result.replace('|', "\\|")));
        }
        md.push_str("\n## What changes\n\n");
        let list = |v: &[&String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            }
        };
        md.push_str(&format!(
            "- rules added: {}\n- rules removed: {}\n- rules changed: {}\n",
            list(&added),
            list(&removed),
            list(&changed)
        ));
        if let Some(r) = &replay_report
            && !r.differences.is_empty()
        {
            md.push_str("\n### Recorded requests decided differently\n\n```\n");
            md.push_str(&replay_text(r));
            md.push_str("```\n");
        }
        if let Some(p) = &proof
            && !p.proven()
        {
            md.push_str("\n### Proof findings\n\n```\n");
            md.push_str(&proof_text(p));
            md.push_str("```\n");
        }
        md.push_str(&format!("\n**verdict: {}**\n", if blocked { "BLOCK" } else { "PASS" }));
        super::print_text(&md);
    }
    if let Err(code) = record(a.admin_socket, &doc).await {
        return code;
    }
    if blocked { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

pub async fn shadow_cmd(path: Option<&Path>, stop: bool, reason: &str, at: &super::AdminAt) -> ExitCode {
    if stop == path.is_some() {
        return super::fail("name a candidate (bundle file, or in dev a policies/ directory) or --stop");
    }
    let mut client = match at.client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The daemon opens the path itself: make it absolute so it means the same file there.
    let path = path
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string())
        .unwrap_or_default();
    match client.policy_shadow(PolicyShadowRequest { path, stop, reason: reason.to_owned() }).await {
        Ok(r) => {
            let r = r.into_inner();
            if stop {
                out!("shadow mode stopped (event {})", r.event_id);
            } else {
                out!(
                    "shadowing {} beside the active {}: live requests it decides differently become policy_shadow_diff events; nothing else changes (event {})",
                    r.candidate_version,
                    r.active_version,
                    r.event_id
                );
            }
            ExitCode::SUCCESS
        }
        Err(s) => super::fail(format!("policy shadow refused ({:?}): {}", s.code(), s.message())),
    }
}

/// `mayfly policy evidence VERSION`: from the ledger, what a release went through — the
/// checks recorded for it (replay, proof, promote-check), its shadow runs and what they
/// saw, and its activations — so an auditor sees which checks it passed before it went
/// live. Exit 1 when it was activated without a passing, proven promote-check recorded before.
pub async fn evidence(version: &str, ledger: &LedgerArgs) -> ExitCode {
    let kinds =
        [EventKind::PolicyCheck, EventKind::PolicyShadow, EventKind::PolicyShadowDiff, EventKind::PolicyActivated];
    let (location, events) = match ledger.at.open().await {
        Ok((location, reader)) => match read_typed(reader.as_ref(), EventFilter::kinds(&kinds)).await {
            Ok(events) => (location, events),
            Err(e) => return super::fail(format!("ledger `{location}`: {e}")),
        },
        Err(e) => return super::fail(e),
    };
    let matches = |v: Option<&str>| v.is_some_and(|v| v == version || v.strip_prefix("sha256:") == Some(version));
    let at = |ms: i64| rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0).unsigned_abs()));
    let uid = |o: &crate::ledger::event::Operator| o.uid.map(|u| u.to_string()).unwrap_or_default();
    let mut passed_gate_before: Option<i64> = None;
    let mut activated_without_gate = false;
    let mut shadow: BTreeMap<String, usize> = BTreeMap::new();
    let mut lines = Vec::new();
    for (row, event) in &events {
        match event {
            Event::PolicyCheck(c) => {
                let report = &c.report;
                if !matches(report.candidate()) {
                    continue;
                }
                let check = report.check.as_str();
                let field = |k: &str| report.rest.get(k);
                let verdict = match check {
                    "promote-check" => report.verdict.clone().unwrap_or_else(|| "?".into()),
                    "replay" => format!(
                        "{} escalation(s)",
                        field("escalations").and_then(serde_json::Value::as_u64).unwrap_or(0)
                    ),
                    "proof" => {
                        if field("proven").and_then(serde_json::Value::as_bool) == Some(true) {
                            "proven".into()
                        } else {
                            "not proven".into()
                        }
                    }
                    other => other.to_owned(),
                };
                // A gate counts only if it proved the release (a skipped proof is no evidence).
                let proven = field("proof")
                    .and_then(|p| p.get("findings"))
                    .is_some_and(|f| f.as_array().is_some_and(Vec::is_empty));
                let verdict = if check == "promote-check" && verdict == "pass" && !proven {
                    "pass, but the proof was skipped".to_owned()
                } else {
                    verdict
                };
                if check == "promote-check" && verdict == "pass" {
                    passed_gate_before.get_or_insert(row.seq);
                }
                lines.push(format!(
                    "{}  #{}  check {check}: {verdict} (operator uid {})",
                    at(row.at_ms),
                    row.seq,
                    uid(&c.operator)
                ));
            }
            Event::PolicyShadow(s) if matches(s.candidate.as_deref()) => {
                let state = match s.shadow {
                    ShadowState::Started => "started",
                    ShadowState::Stopped => "stopped",
                };
                lines.push(format!(
                    "{}  #{}  shadow {state} by uid {}: {}",
                    at(row.at_ms),
                    row.seq,
                    uid(&s.operator),
                    s.reason
                ));
            }
            Event::PolicyShadowDiff(d) if matches(Some(&d.candidate)) => {
                let change = serde_json::to_value(d.change).ok().and_then(|v| v.as_str().map(str::to_owned));
                *shadow.entry(change.unwrap_or_else(|| "?".into())).or_default() += 1;
            }
            Event::PolicyActivated(a) if matches(Some(&a.version)) => {
                let gated = passed_gate_before.is_some();
                activated_without_gate |= !gated;
                lines.push(format!(
                    "{}  #{}  ACTIVATED via {} (signed by {}){}",
                    at(row.at_ms),
                    row.seq,
                    a.via,
                    a.signed_by.as_deref().unwrap_or("nobody"),
                    if gated { "" } else { "  — no passing promote-check recorded before this" }
                ));
            }
            _ => {}
        }
    }
    out!("evidence for policy release {version} (ledger `{location}`)");
    for l in &lines {
        out!("  {l}");
    }
    if !shadow.is_empty() {
        let counts: Vec<String> = shadow.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out!("  shadow differences on live traffic: {}", counts.join(", "));
    }
    if lines.is_empty() && shadow.is_empty() {
        out!("  nothing recorded for this version");
    }
    if activated_without_gate { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

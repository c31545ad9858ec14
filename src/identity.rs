//! Who a workload is: `TrustDomain`, `WorkloadId` (a SPIFFE ID), `Selector`s produced by
//! attestation, `Ttl`, and the inventory that maps selectors to registered identities.
//!
//! Pure values and matching only; reading the inventory file is the caller's job
//! (`Inventory::parse` takes the text).

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use time::Date;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("`{0}` is not a valid trust domain (lowercase letters, digits, `.`, `-`, `_`)")]
    TrustDomain(String),
    #[error("`{id}` is not a valid SPIFFE ID: {why}")]
    SpiffeId { id: String, why: &'static str },
    #[error("`{0}` is not a valid selector (expected `type:key:value`)")]
    Selector(String),
    #[error("`{0}` is not a valid duration (examples: `90s`, `30m`, `1h`)")]
    Duration(String),
    #[error("ttl must be positive, got `{0}s`")]
    TtlNotPositive(i64),
    #[error("ttl `{requested}s` is over the maximum `{max}s`")]
    TtlOverMaximum { requested: u64, max: u64 },
    #[error("ttl `{requested}s` is under the minimum `{min}s` (issuance.min_ttl): no credential lives shorter")]
    TtlUnderMinimum { requested: u64, min: u64 },
    #[error("inventory: {0}")]
    Inventory(String),
}

/// A SPIFFE trust domain name, valid by construction.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if ok { Ok(Self(s.to_owned())) } else { Err(IdentityError::TrustDomain(s.to_owned())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE ID (`spiffe://trust-domain/path`), valid by construction per the SPIFFE-ID
/// standard: lowercase trust domain, a non-empty path of non-empty segments from the
/// allowed character set, no `.`/`..` segments, no query or fragment, at most 2048 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    uri: String,
    domain_len: usize,
}

impl WorkloadId {
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let err = |why| IdentityError::SpiffeId { id: s.to_owned(), why };
        if s.len() > 2048 {
            return Err(err("longer than 2048 bytes"));
        }
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| err("scheme must be `spiffe://`"))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => return Err(err("a workload ID needs a path")),
        };
        TrustDomain::parse(domain).map_err(|_| err("bad trust domain"))?;
        for segment in path[1..].split('/') {
            if segment.is_empty() {
                return Err(err("empty path segment"));
            }
            if segment == "." || segment == ".." {
                return Err(err("`.` and `..` segments are not allowed"));
            }
            if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                return Err(err("path characters must be letters, digits, `-`, `.`, `_`"));
            }
        }
        Ok(Self { uri: s.to_owned(), domain_len: domain.len() })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len().."spiffe://".len() + self.domain_len]
    }

    pub fn path(&self) -> &str {
        &self.uri["spiffe://".len() + self.domain_len..]
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain() == td.as_str()
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// The 1-based line and column of byte `offset` in `src` (for errors that point into a file).
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// One attested fact about a caller, `type:key:value` (e.g. `unix:uid:1001`).
/// The value may itself contain `:`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector(String);

impl Selector {
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let mut parts = s.splitn(3, ':');
        let ok = matches!(
            (parts.next(), parts.next(), parts.next()),
            (Some(t), Some(k), Some(v)) if !t.is_empty() && !k.is_empty() && !v.is_empty()
        ) && !s.chars().any(char::is_control);
        if ok { Ok(Self(s.to_owned())) } else { Err(IdentityError::Selector(s.to_owned())) }
    }

    /// For attestors, which build selectors from values they read themselves.
    pub fn new(kind: &str, key: &str, value: impl fmt::Display) -> Self {
        Self(format!("{kind}:{key}:{value}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `type:key`, e.g. `oidc:repository_id`.
    pub fn type_key(&self) -> &str {
        let end = self.0.match_indices(':').nth(1).map_or(self.0.len(), |(i, _)| i);
        &self.0[..end]
    }

    /// The value after `type:key:`.
    pub fn value(&self) -> &str {
        self.0.get(self.type_key().len() + 1..).unwrap_or_default()
    }

    /// Whether this pins an immutable CI id (`oidc:repository_id:…`, `oidc:project_id:…`, …).
    pub fn is_id(&self) -> bool {
        self.type_key().strip_prefix("oidc:").is_some_and(|k| OidcClaims::ID_KEYS.contains(&k))
    }

    /// Checks the selector is one an attestor can produce, with a value of the right shape,
    /// so a typo in inventory.toml (`unix:uid:jenkins`) is an error, not an entry that
    /// silently never matches.
    pub fn check_known(&self) -> Result<(), String> {
        let mut parts = self.0.splitn(3, ':');
        let (kind, key, value) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let digits = |v: &str| !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit());
        let ok = match (kind, key) {
            ("unix", "uid") => value == "self" || digits(value),
            ("unix", "gid") => digits(value),
            ("unix", "path") => value.starts_with('/'),
            ("unix", "sha256") => {
                value.len() == 64 && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            }
            ("unix", "container") => value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            ("oidc", k) if OidcClaims::ID_KEYS.contains(&k) => is_numeric_id(value),
            ("oidc", k) if OidcClaims::SELECTOR_KEYS.contains(&k) => !value.is_empty(),
            _ => {
                return Err(format!(
                    "`{self}`: unknown selector type `{kind}:{key}` (known: unix:uid|gid|path|sha256|container, oidc:{})",
                    OidcClaims::SELECTOR_KEYS.join("|")
                ));
            }
        };
        if ok { Ok(()) } else { Err(format!("`{self}`: the value does not fit `{kind}:{key}`")) }
    }
}

/// The claims of a verified OIDC id-token that policy and the inventory may use. Raw
/// claims are mapped to these typed fields before policy sees them (GitHub's `ref` is
/// `git_ref` here, since `ref` reads as a keyword).
///
/// Names (`repository`, `repository_owner`) change when a repository is renamed or
/// transferred, and a name can be taken again by whoever re-creates a deleted repository;
/// the numeric ids (`repository_id`, `repository_owner_id`; GitLab `project_id`,
/// `namespace_id`) never do. Inventory entries and rules pin on the ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcClaims {
    pub issuer: String,
    pub subject: String,
    pub repository: Option<String>,
    pub repository_owner: Option<String>,
    /// GitHub's immutable repository id (digits).
    pub repository_id: Option<String>,
    /// GitHub's immutable id of the repository's owner (user or organisation; digits).
    pub repository_owner_id: Option<String>,
    /// GitLab's immutable project id (digits).
    pub project_id: Option<String>,
    /// GitLab's immutable id of the project's group or user namespace (digits).
    pub namespace_id: Option<String>,
    pub git_ref: Option<String>,
    pub ref_type: Option<String>,
    pub environment: Option<String>,
    pub workflow_ref: Option<String>,
    pub event_name: Option<String>,
    /// The commit the run is for.
    pub sha: Option<String>,
    /// The CI run (GitHub `run_id`, GitLab `pipeline_id`).
    pub run_id: Option<String>,
    /// GitLab: whether the ref is protected (`"true"` / `"false"`).
    pub ref_protected: Option<String>,
}

impl OidcClaims {
    /// The `oidc:<key>:<value>` selector keys an id-token yields.
    pub const SELECTOR_KEYS: [&'static str; 16] = [
        "iss",
        "sub",
        "repository",
        "repository_owner",
        "repository_id",
        "repository_owner_id",
        "project_id",
        "namespace_id",
        "ref",
        "ref_type",
        "environment",
        "workflow_ref",
        "event_name",
        "sha",
        "run_id",
        "ref_protected",
    ];

    /// The selector keys whose values are immutable numeric ids (what entries pin on).
    pub const ID_KEYS: [&'static str; 4] = ["repository_id", "repository_owner_id", "project_id", "namespace_id"];

    /// The present claims as (Cedar attribute name, value).
    pub fn fields(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![("issuer", self.issuer.as_str()), ("subject", self.subject.as_str())];
        let optional = [
            ("repository", &self.repository),
            ("repository_owner", &self.repository_owner),
            ("repository_id", &self.repository_id),
            ("repository_owner_id", &self.repository_owner_id),
            ("project_id", &self.project_id),
            ("namespace_id", &self.namespace_id),
            ("git_ref", &self.git_ref),
            ("ref_type", &self.ref_type),
            ("environment", &self.environment),
            ("workflow_ref", &self.workflow_ref),
            ("event_name", &self.event_name),
            ("sha", &self.sha),
            ("run_id", &self.run_id),
            ("ref_protected", &self.ref_protected),
        ];
        out.extend(optional.into_iter().filter_map(|(k, v)| v.as_deref().map(|v| (k, v))));
        out
    }

    /// The selectors a caller with these claims presents to the inventory.
    pub fn selectors(&self) -> Selectors {
        self.fields()
            .into_iter()
            .map(|(k, v)| {
                let key = match k {
                    "issuer" => "iss",
                    "subject" => "sub",
                    "git_ref" => "ref",
                    other => other,
                };
                Selector::new("oidc", key, v)
            })
            .collect()
    }
}

/// A CI platform's immutable numeric id: 1 to 20 ASCII digits, no leading zero.
pub fn is_numeric_id(value: &str) -> bool {
    (1..=20).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit()) && !value.starts_with('0')
}

/// One SPIFFE ID path segment that stands for `text`, whatever it holds: ASCII letters,
/// digits and `-` are kept, every other byte is written `_` and two lower-case hex digits
/// (`/` is `_2f`, `_` itself `_5f`, `.` `_2e`). Injective — two texts never share a
/// segment, unlike replacing what does not fit — and never `.` or `..`. `None` when the
/// segment would be empty or longer than `max` bytes: refused, never truncated (a cut
/// would make distinct texts one identity).
pub fn path_segment(text: &str, max: usize) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
        if out.len() > max {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Selectors = BTreeSet<Selector>;

/// A credential lifetime: positive, whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ttl(Duration);

/// The lifetimes a request may ask for: `issuance.min_ttl ..= issuance.max_ttl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlBounds {
    pub min: Ttl,
    pub max: Ttl,
}

impl Ttl {
    /// The shortest lifetime there is.
    pub const SECOND: Ttl = Ttl(Duration::from_secs(1));

    /// A requested TTL in seconds, checked against the configured floor and ceiling.
    pub fn from_request(secs: i64, bounds: TtlBounds) -> Result<Self, IdentityError> {
        let secs = u64::try_from(secs).ok().filter(|s| *s > 0).ok_or(IdentityError::TtlNotPositive(secs))?;
        if secs > bounds.max.as_secs() {
            return Err(IdentityError::TtlOverMaximum { requested: secs, max: bounds.max.as_secs() });
        }
        if secs < bounds.min.as_secs() {
            return Err(IdentityError::TtlUnderMinimum { requested: secs, min: bounds.min.as_secs() });
        }
        Ok(Self(Duration::from_secs(secs)))
    }

    pub fn from_secs(secs: u64) -> Result<Self, IdentityError> {
        if secs == 0 {
            return Err(IdentityError::TtlNotPositive(0));
        }
        Ok(Self(Duration::from_secs(secs)))
    }

    /// `90s`, `30m`, `1h`, `2d`, or a bare number of seconds.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::Duration(s.to_owned());
        let s = s.trim();
        let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        Self::from_secs(n.checked_mul(mult).ok_or_else(bad)?).map_err(|_| bad())
    }

    pub fn as_secs(&self) -> u64 {
        self.0.as_secs()
    }

    pub fn as_duration(&self) -> Duration {
        self.0
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

/// A registered non-human identity: who owns it, why it exists, until when, and which
/// attested selectors prove a caller is it (all of them must be present).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryEntry {
    pub id: WorkloadId,
    pub owner: String,
    pub purpose: String,
    /// Where it runs, e.g. `prod`, `staging`, `dev`, `ci`.
    pub environment: String,
    /// How critical it is, e.g. `critical`, `standard`, `experimental`.
    pub tier: String,
    /// Last day (UTC) on which the entry is valid.
    pub expires: Date,
    pub selectors: Selectors,
    /// What the ids the entry pins were called when it was written (`oidc:repository:acme/app`).
    /// Never matched on: a caller with this name but other ids is refused with the reason
    /// (`Lookup::NameReused`) instead of "no entry".
    pub known_as: Selectors,
}

impl InventoryEntry {
    pub fn is_expired(&self, today: Date) -> bool {
        today > self.expires
    }
}

/// Result of looking a caller up in the inventory.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Found(&'a InventoryEntry),
    /// No entry's selectors are all satisfied by the caller.
    NoMatch,
    /// Matching entries exist but every one of them has expired.
    Expired(&'a InventoryEntry),
    /// Several live entries match and the request did not say which one.
    Ambiguous(Vec<&'a WorkloadId>),
    /// No entry matches, but one knows the caller's name (`known_as`) under other
    /// immutable ids: a repository re-created or transferred under the same name is
    /// another repository.
    NameReused {
        entry: &'a InventoryEntry,
        pinned: &'a Selector,
        presented: Option<Selector>,
    },
}

impl Lookup<'_> {
    /// Why a `NameReused` caller is refused, naming the entry, the pinned id and the one
    /// presented (for the ledger and the caller: ids are public, and this tells an
    /// operator whose repository moved what to re-pin).
    pub fn name_reused_reason(entry: &InventoryEntry, pinned: &Selector, presented: Option<&Selector>) -> String {
        let names: Vec<String> = entry.known_as.iter().map(|s| format!("`{s}`")).collect();
        let has = match presented {
            Some(p) => format!("this caller has `{p}`"),
            None => format!("this caller presents no `{}`", pinned.type_key()),
        };
        format!(
            "no inventory entry matches: `{}` knows {} but is pinned to `{pinned}`, and {has}; a repository \
             deleted and re-created (or transferred) under the same name is another repository, so it is not \
             this identity (re-pin the entry in inventory.toml if it really is)",
            entry.id,
            names.join(" and ")
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct Inventory {
    entries: Vec<InventoryEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    workload: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    id: toml::Spanned<String>,
    owner: String,
    purpose: String,
    environment: String,
    tier: String,
    expires: toml::value::Datetime,
    selectors: Vec<String>,
    #[serde(default)]
    known_as: Vec<String>,
}

impl Inventory {
    /// Parses inventory.toml. Every entry must be inside `trust_domain`, have an owner, a
    /// purpose, an environment, a tier, an expiry date and at least one selector an attestor
    /// can produce; ids are unique. Errors name the line of the entry's `id`.
    pub fn parse(text: &str, trust_domain: &TrustDomain) -> Result<Self, IdentityError> {
        let raw: RawInventory = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| format!("line {}: ", line_col(text, s.start).0)).unwrap_or_default();
            IdentityError::Inventory(format!("{line}{}", e.message()))
        })?;
        let mut entries = Vec::with_capacity(raw.workload.len());
        let mut seen = BTreeSet::new();
        for e in raw.workload {
            let line = line_col(text, e.id.span().start).0;
            let at =
                |what: String| IdentityError::Inventory(format!("line {line}, workload `{}`: {what}", e.id.get_ref()));
            let id = WorkloadId::parse(e.id.get_ref()).map_err(|err| at(err.to_string()))?;
            if !id.is_member_of(trust_domain) {
                return Err(at(format!("not in the trust domain `{trust_domain}`")));
            }
            if !seen.insert(id.clone()) {
                return Err(at("duplicate id".into()));
            }
            if [&e.owner, &e.purpose, &e.environment, &e.tier].iter().any(|v| v.trim().is_empty()) {
                return Err(at("`owner`, `purpose`, `environment` and `tier` must not be empty".into()));
            }
            let expires = match (e.expires.date, e.expires.time) {
                (Some(d), None) => Date::from_calendar_date(
                    i32::from(d.year),
                    time::Month::try_from(d.month).map_err(|err| at(err.to_string()))?,
                    d.day,
                )
                .map_err(|err| at(err.to_string()))?,
                _ => return Err(at("`expires` must be a date like 2027-06-30".into())),
            };
            if e.selectors.is_empty() {
                return Err(at("needs at least one selector".into()));
            }
            let selectors = e
                .selectors
                .iter()
                .map(|s| Selector::parse(s))
                .collect::<Result<Selectors, _>>()
                .map_err(|err| at(err.to_string()))?;
            for s in &selectors {
                s.check_known().map_err(&at)?;
            }
            let known_as = e
                .known_as
                .iter()
                .map(|s| Selector::parse(s))
                .collect::<Result<Selectors, _>>()
                .map_err(|err| at(format!("known_as: {err}")))?;
            for s in &known_as {
                s.check_known().map_err(|err| at(format!("known_as: {err}")))?;
                if !s.as_str().starts_with("oidc:") || s.is_id() {
                    return Err(at(format!("known_as: `{s}` is not an oidc name (repository, repository_owner, …)")));
                }
            }
            if !known_as.is_empty() && !selectors.iter().any(Selector::is_id) {
                return Err(at(format!(
                    "known_as names what pinned ids were called, but no selector pins one ({})",
                    OidcClaims::ID_KEYS.join(", ")
                )));
            }
            entries.push(InventoryEntry {
                id,
                owner: e.owner,
                purpose: e.purpose,
                environment: e.environment,
                tier: e.tier,
                expires,
                selectors,
                known_as,
            });
        }
        Ok(Self { entries })
    }

    pub fn entries(&self) -> &[InventoryEntry] {
        &self.entries
    }

    /// Finds the caller's identity. An entry matches when all its selectors are among the
    /// caller's. `wanted` picks one identity when the caller asked for a specific one.
    pub fn lookup(&self, caller: &Selectors, wanted: Option<&WorkloadId>, today: Date) -> Lookup<'_> {
        let matching: Vec<&InventoryEntry> = self
            .entries
            .iter()
            .filter(|e| e.selectors.is_subset(caller))
            .filter(|e| wanted.is_none_or(|w| &e.id == w))
            .collect();
        let live: Vec<&InventoryEntry> = matching.iter().copied().filter(|e| !e.is_expired(today)).collect();
        match (live.as_slice(), matching.first()) {
            ([one], _) => Lookup::Found(one),
            ([], Some(expired)) => Lookup::Expired(expired),
            ([], None) => self.name_reused(caller, wanted).unwrap_or(Lookup::NoMatch),
            (many, _) => Lookup::Ambiguous(many.iter().map(|e| &e.id).collect()),
        }
    }

    /// An entry that knows the caller by name and matches it in everything but a pinned
    /// id: the name now belongs to another repository (or project).
    fn name_reused(&self, caller: &Selectors, wanted: Option<&WorkloadId>) -> Option<Lookup<'_>> {
        self.entries.iter().filter(|e| wanted.is_none_or(|w| &e.id == w)).find_map(|e| {
            let named = !e.known_as.is_empty() && e.known_as.is_subset(caller);
            let rest_matches = e.selectors.iter().filter(|s| !s.is_id()).all(|s| caller.contains(s));
            let pinned = e.selectors.iter().find(|s| s.is_id() && !caller.contains(s))?;
            let presented = caller.iter().find(|c| c.type_key() == pinned.type_key()).cloned();
            (named && rest_matches).then_some(Lookup::NameReused { entry: e, pinned, presented })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    #[test]
    fn spiffe_ids_are_checked_by_the_standard() {
        let id = WorkloadId::parse("spiffe://example.org/ns/prod/sa/api").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/api");
        for bad in [
            "https://example.org/x",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://Example.org/x",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?b",
            "spiffe://example.org/a b",
        ] {
            assert!(WorkloadId::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn ttl_rejects_zero_negative_under_minimum_and_over_maximum() {
        let max = Ttl::parse("24h").unwrap();
        let bounds = TtlBounds { min: Ttl::parse("5m").unwrap(), max };
        assert_eq!(Ttl::from_request(0, bounds), Err(IdentityError::TtlNotPositive(0)));
        assert_eq!(Ttl::from_request(-5, bounds), Err(IdentityError::TtlNotPositive(-5)));
        assert_eq!(
            Ttl::from_request(86_401, bounds),
            Err(IdentityError::TtlOverMaximum { requested: 86_401, max: 86_400 })
        );
        let short = Ttl::from_request(1, bounds).unwrap_err();
        assert_eq!(short, IdentityError::TtlUnderMinimum { requested: 1, min: 300 });
        assert!(short.to_string().contains("issuance.min_ttl"), "{short}");
        assert_eq!(Ttl::from_request(299, bounds), Err(IdentityError::TtlUnderMinimum { requested: 299, min: 300 }));
        assert_eq!(Ttl::from_request(300, bounds).unwrap().as_secs(), 300);
        let any = TtlBounds { min: Ttl::parse("1s").unwrap(), max };
        assert_eq!(Ttl::from_request(60, any).unwrap().as_secs(), 60);
        assert_eq!(Ttl::parse("30m").unwrap().as_secs(), 1800);
        assert!(Ttl::parse("10x").is_err());
        assert!(Ttl::parse("0s").is_err());
    }

    const INVENTORY: &str = r#"
        [[workload]]
        id = "spiffe://example.org/api"
        owner = "team-api"
        purpose = "serves the api"
        environment = "prod"
        tier = "critical"
        expires = 2030-01-01
        selectors = ["unix:uid:1001", "unix:sha256:abababababababababababababababababababababababababababababababab"]

        [[workload]]
        id = "spiffe://example.org/old"
        owner = "team-old"
        purpose = "retired"
        environment = "prod"
        tier = "standard"
        expires = 2020-01-01
        selectors = ["unix:uid:1002"]
    "#;

    fn sel(list: &[&str]) -> Selectors {
        list.iter().map(|s| Selector::parse(s).unwrap()).collect()
    }

    #[test]
    fn lookup_needs_every_selector_and_a_live_entry() {
        let inv = Inventory::parse(INVENTORY, &td()).unwrap();
        let today = time::macros::date!(2026 - 11 - 23);
        assert!(matches!(
            inv.lookup(&sel(&["unix:uid:1001", "unix:sha256:abababababababababababababababababababababababababababababababab", "unix:gid:5"]), None, today),
            Lookup::Found(e) if e.id.as_str() == "spiffe://example.org/api"
        ));
        assert_eq!(inv.lookup(&sel(&["unix:uid:1001"]), None, today), Lookup::NoMatch);
        assert!(matches!(inv.lookup(&sel(&["unix:uid:1002"]), None, today), Lookup::Expired(_)));
        // The last valid day is still valid.
        let entry = &inv.entries()[0];
        assert!(!entry.is_expired(time::macros::date!(2030 - 01 - 01)));
        assert!(entry.is_expired(time::macros::date!(2030 - 01 - 02)));
    }

    #[test]
    fn inventory_rejects_foreign_domains_duplicates_and_missing_fields() {
        let foreign = INVENTORY.replace("spiffe://example.org/api", "spiffe://evil.org/api");
        assert!(Inventory::parse(&foreign, &td()).unwrap_err().to_string().contains("trust domain"));
        let dup = INVENTORY.replace("spiffe://example.org/old", "spiffe://example.org/api");
        assert!(Inventory::parse(&dup, &td()).unwrap_err().to_string().contains("duplicate"));
        let no_owner = INVENTORY.replace("owner = \"team-api\"\n", "");
        assert!(Inventory::parse(&no_owner, &td()).is_err());
        let bad_sel = INVENTORY
            .replace("unix:sha256:abababababababababababababababababababababababababababababababab", "nocolons");
        assert!(Inventory::parse(&bad_sel, &td()).unwrap_err().to_string().contains("nocolons"));
    }

    #[test]
    fn inventory_errors_name_the_line_and_unknown_selectors_are_refused() {
        // The second entry's `id` is on line 10 of the fixture.
        let dup = INVENTORY.replace("spiffe://example.org/old", "spiffe://example.org/api");
        let err = Inventory::parse(&dup, &td()).unwrap_err().to_string();
        let line = dup.lines().position(|l| l.contains("id = ") && l.contains("/api")).unwrap();
        let second = dup.lines().skip(line + 1).position(|l| l.contains("id = ")).unwrap() + line + 2;
        assert!(err.contains(&format!("line {second}")), "{err}");
        for (typo, why) in [
            ("unix:uid:jenkins", "does not fit"),
            ("unix:sha256:abc", "does not fit"),
            ("unix:pid:42", "unknown selector type"),
            ("k8s:ns:default", "unknown selector type"),
            ("oidc:repo:acme/app", "unknown selector type"),
        ] {
            let text = INVENTORY.replace("unix:uid:1002", typo);
            let err = Inventory::parse(&text, &td()).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(typo), "{typo}: {err}");
        }
        let no_tier = INVENTORY.replace("tier = \"critical\"\n", "");
        assert!(Inventory::parse(&no_tier, &td()).unwrap_err().to_string().contains("tier"));
    }

    #[test]
    fn path_segments_stand_for_any_text_without_collisions() {
        assert_eq!(
            path_segment("repo:acme/app:ref:refs/heads/main", 1024).unwrap(),
            "repo_3aacme_2fapp_3aref_3arefs_2fheads_2fmain"
        );
        // Each separator a naive mapping would fold into one character stays distinct.
        let texts = ["a/b", "a_b", "a_2fb", "a+b", "a,b", "a*b", "a.b", "a b", ".", "..", "a@b", "é"];
        let segments: BTreeSet<String> = texts.iter().map(|t| path_segment(t, 64).unwrap()).collect();
        assert_eq!(segments.len(), texts.len(), "{segments:?}");
        for seg in &segments {
            let id = format!("spiffe://example.org/dev/oidc/{seg}");
            assert!(WorkloadId::parse(&id).is_ok(), "{id}");
        }
        assert_eq!(path_segment("", 64), None);
        assert_eq!(path_segment(&"x".repeat(65), 64), None, "refused, not cut");
        assert_eq!(path_segment("//", 5), None, "escaping counts toward the limit");
    }

    #[test]
    fn ids_are_digits_without_a_leading_zero() {
        assert!(is_numeric_id("892735111") && is_numeric_id("1"));
        for bad in ["", "0", "0123", "12a", "-1", "1 2", &"9".repeat(21)] {
            assert!(!is_numeric_id(bad), "{bad}");
        }
        assert!(Selector::parse("oidc:repository_id:892735111").unwrap().check_known().is_ok());
        assert!(Selector::parse("oidc:repository_id:acme/app").unwrap().check_known().is_err());
        let s = Selector::parse("oidc:project_id:48110736").unwrap();
        assert_eq!((s.type_key(), s.value(), s.is_id()), ("oidc:project_id", "48110736", true));
        assert!(!Selector::parse("oidc:repository:acme/app").unwrap().is_id());
    }

    const PINNED: &str = r#"
        [[workload]]
        id = "spiffe://example.org/ci/acme/app"
        owner = "acme"
        purpose = "ci"
        environment = "ci"
        tier = "critical"
        expires = 2030-01-01
        selectors = ["oidc:iss:https://token.actions.githubusercontent.com", "oidc:repository_owner_id:1342004", "oidc:repository_id:892735111"]
        known_as = ["oidc:repository:acme/app"]
    "#;

    #[test]
    fn entries_pinned_on_ids_survive_a_rename_and_name_a_reused_name() {
        let inv = Inventory::parse(PINNED, &td()).unwrap();
        let today = time::macros::date!(2026 - 11 - 23);
        let iss = "oidc:iss:https://token.actions.githubusercontent.com";
        let renamed = sel(&[
            iss,
            "oidc:repository:acme/application",
            "oidc:repository_id:892735111",
            "oidc:repository_owner_id:1342004",
        ]);
        assert!(matches!(inv.lookup(&renamed, None, today), Lookup::Found(e) if e.id.path() == "/ci/acme/app"));

        let recreated =
            sel(&[iss, "oidc:repository:acme/app", "oidc:repository_id:990000001", "oidc:repository_owner_id:1342004"]);
        let Lookup::NameReused { entry, pinned, presented } = inv.lookup(&recreated, None, today) else {
            panic!("{:?}", inv.lookup(&recreated, None, today))
        };
        assert_eq!(
            (pinned.as_str(), presented.as_ref().map(Selector::as_str)),
            ("oidc:repository_id:892735111", Some("oidc:repository_id:990000001"))
        );
        let why = Lookup::name_reused_reason(entry, pinned, presented.as_ref());
        assert!(why.contains("re-created") && why.contains("`oidc:repository:acme/app`"), "{why}");

        // Another name with other ids is just no match; so is the name from another issuer.
        let other = sel(&[iss, "oidc:repository:evil/app", "oidc:repository_id:7", "oidc:repository_owner_id:8"]);
        assert_eq!(inv.lookup(&other, None, today), Lookup::NoMatch);
        let elsewhere =
            sel(&["oidc:iss:https://gitlab.example.org", "oidc:repository:acme/app", "oidc:repository_id:7"]);
        assert_eq!(inv.lookup(&elsewhere, None, today), Lookup::NoMatch);
    }

    #[test]
    fn known_as_must_be_names_beside_pinned_ids() {
        let id_as_name =
            PINNED.replace(r#"known_as = ["oidc:repository:acme/app"]"#, r#"known_as = ["oidc:repository_id:1"]"#);
        assert!(Inventory::parse(&id_as_name, &td()).unwrap_err().to_string().contains("not an oidc name"));
        let unpinned = PINNED.replace(
            r#""oidc:repository_owner_id:1342004", "oidc:repository_id:892735111""#,
            r#""oidc:repository:acme/app""#,
        );
        assert!(Inventory::parse(&unpinned, &td()).unwrap_err().to_string().contains("no selector pins one"));
    }

    #[test]
    fn oidc_claims_become_selectors_an_inventory_can_require() {
        let claims = OidcClaims {
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: "repo:acme/app:ref:refs/heads/main".into(),
            repository: Some("acme/app".into()),
            git_ref: Some("refs/heads/main".into()),
            ..OidcClaims::default()
        };
        let selectors = claims.selectors();
        for s in &selectors {
            s.check_known().unwrap();
        }
        assert!(selectors.contains(&Selector::parse("oidc:repository:acme/app").unwrap()));
        assert!(selectors.contains(&Selector::parse("oidc:ref:refs/heads/main").unwrap()));
        assert!(selectors.contains(&Selector::parse("oidc:iss:https://token.actions.githubusercontent.com").unwrap()));
        assert_eq!(selectors.len(), 4);
    }
}

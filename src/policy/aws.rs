//! What an `issue_aws` permit says beyond yes and its `@max_ttl`: the session policy that
//! scopes the role down (`@aws_session_policy("name")`, the document in
//! `session-policies/<name>.json`) and which identity attributes become session tags
//! (`@aws_session_tags("owner environment tier")`). Checked when the release loads, so a
//! typo is a rejected release, never a surprise at issuance.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use cedar_policy::Policy;
use serde_json::Value;

use super::PolicyError;
use super::bundle::PolicyFiles;
use crate::identity::{InventoryEntry, Ttl};

/// Identity attributes a rule may turn into session tags (`aws:PrincipalTag/<name>`).
pub const TAGGABLE: [&str; 7] = ["spiffe_id", "trust_domain", "path", "owner", "purpose", "environment", "tier"];
/// AWS's limit on a session policy, as STS measures it (whitespace-free JSON).
const MAX_SESSION_POLICY_CHARS: usize = 2048;

/// Permission to assume one role, as the permitting rules shape it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsGrant {
    /// The largest `@max_ttl` of the permitting rules: a session may not outlive it.
    pub ceiling: Ttl,
    /// `None`: the role's own permissions. `Some`: the intersection with this document.
    pub session_policy: Option<SessionPolicy>,
    /// Session tags, key → value, from the identity's attributes.
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionPolicy {
    /// The `session-policies/` names it was built from.
    pub names: Vec<String>,
    /// Compact JSON, as sent to STS.
    pub document: String,
}

/// The AWS annotations of a release's permits.
#[derive(Debug, Default)]
pub struct AwsRules {
    session_policy: HashMap<String, String>,
    tags: HashMap<String, Vec<String>>,
    documents: HashMap<String, Value>,
}

impl AwsRules {
    /// Reads every `session-policies/*.json` document and checks its shape.
    pub fn load(files: &PolicyFiles) -> Result<Self, PolicyError> {
        let mut documents = HashMap::new();
        for (path, text) in files.under("session-policies", "json") {
            let fail = |why: String| PolicyError::Parse { path: PathBuf::from(path), why };
            let doc: Value = serde_json::from_str(text).map_err(|e| fail(format!("not JSON: {e}")))?;
            let statements = doc.get("Statement").and_then(Value::as_array);
            if doc.get("Version").and_then(Value::as_str) != Some("2012-10-17") || statements.is_none_or(Vec::is_empty)
            {
                return Err(fail(
                    "an IAM policy needs \"Version\": \"2012-10-17\" and a non-empty \"Statement\" list".into(),
                ));
            }
            let compact = doc.to_string();
            if compact.len() > MAX_SESSION_POLICY_CHARS {
                return Err(fail(format!(
                    "{} characters without whitespace; STS accepts at most {MAX_SESSION_POLICY_CHARS}",
                    compact.len()
                )));
            }
            let name = path.trim_start_matches("session-policies/").trim_end_matches(".json").to_owned();
            documents.insert(name, doc);
        }
        Ok(Self { documents, ..Self::default() })
    }

    /// Takes a permit's `@aws_session_policy` and `@aws_session_tags`, if any.
    pub fn annotate(&mut self, path: &str, id: &str, policy: &Policy) -> Result<(), PolicyError> {
        let fail = |why: String| PolicyError::Parse { path: PathBuf::from(path), why: format!("rule `{id}`: {why}") };
        if let Some(name) = policy.annotation("aws_session_policy") {
            if !self.documents.contains_key(name) {
                return Err(fail(format!("@aws_session_policy(\"{name}\"): there is no session-policies/{name}.json")));
            }
            self.session_policy.insert(id.to_owned(), name.to_owned());
        }
        if let Some(list) = policy.annotation("aws_session_tags") {
            let names: Vec<String> = list.split([' ', ',']).filter(|s| !s.is_empty()).map(str::to_owned).collect();
            if let Some(bad) = names.iter().find(|n| !TAGGABLE.contains(&n.as_str())) {
                return Err(fail(format!("@aws_session_tags: `{bad}` is not one of {}", TAGGABLE.join(", "))));
            }
            self.tags.insert(id.to_owned(), names);
        }
        Ok(())
    }

    /// A rule's session policy: its name and document.
    pub fn policy_of(&self, rule: &str) -> Option<(&str, &Value)> {
        let name = self.session_policy.get(rule)?;
        Some((name.as_str(), self.documents.get(name)?))
    }

    /// The grant's AWS shape from ONE permitting rule (the engine picks the one with the
    /// longest `@max_ttl`): its ceiling, its session policy, its tags. Rules are never
    /// mixed — a long read-only rule and a short unscoped one must not add up to a long
    /// unscoped session.
    pub fn grant(&self, rule: &str, workload: &InventoryEntry, ceiling: Ttl) -> AwsGrant {
        let session_policy = self.session_policy.get(rule).and_then(|name| {
            let doc = self.documents.get(name)?;
            Some(SessionPolicy { names: vec![name.clone()], document: doc.to_string() })
        });
        let attributes: BTreeSet<&String> = self.tags.get(rule).into_iter().flatten().collect();
        let tags = attributes
            .into_iter()
            .map(|name| {
                let value = match name.as_str() {
                    "spiffe_id" => workload.id.as_str(),
                    "trust_domain" => workload.id.trust_domain(),
                    "path" => workload.id.path(),
                    "owner" => &workload.owner,
                    "purpose" => &workload.purpose,
                    "environment" => &workload.environment,
                    _ => &workload.tier,
                };
                (name.clone(), tag_value(value))
            })
            .collect();
        AwsGrant { ceiling, session_policy, tags }
    }
}

/// A session tag value in the characters and length AWS accepts (letters, digits, spaces
/// and `_.:/=+-@`, at most 256): anything else becomes `_`.
fn tag_value(v: &str) -> String {
    v.chars()
        .map(|c| if c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c) { c } else { '_' })
        .take(256)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistakes_in_aws_annotations_reject_the_release() {
        let rule = |annotations: &str| {
            format!(
                "@id(\"x\") @max_ttl(\"1h\") {annotations} permit(principal, action == Mayfly::Action::\"issue_aws\", resource);"
            )
        };
        let engine = |files: &[(&str, Option<&str>)]| {
            super::super::Engine::from_files(&super::super::shipped_files_with(files))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let missing = rule("@aws_session_policy(\"nope\")");
        let err = engine(&[("issuance/x.cedar", Some(missing.as_str()))]).unwrap_err();
        assert!(err.contains("session-policies/nope.json"), "{err}");
        let bad_tag = rule("@aws_session_tags(\"owner password\")");
        let err = engine(&[("issuance/x.cedar", Some(bad_tag.as_str()))]).unwrap_err();
        assert!(err.contains("`password` is not one of"), "{err}");
        let err = engine(&[("session-policies/artifacts-read.json", Some("{\"Statement\": []}"))]).unwrap_err();
        assert!(err.contains("2012-10-17"), "{err}");
        let huge = format!(
            "{{\"Version\":\"2012-10-17\",\"Statement\":[{{\"Effect\":\"Allow\",\"Action\":\"s3:GetObject\",\"Resource\":\"{}\"}}]}}",
            "a".repeat(2100)
        );
        let err = engine(&[("session-policies/artifacts-read.json", Some(huge.as_str()))]).unwrap_err();
        assert!(err.contains("at most 2048"), "{err}");
        assert!(engine(&[]).is_ok(), "the shipped release loads");
    }

    #[test]
    fn the_grant_is_one_rule_never_a_mix() {
        let files = super::super::shipped_files_with(&[(
            "session-policies/other.json",
            Some(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"sqs:*","Resource":"*"}]}"#),
        )]);
        let mut rules = AwsRules::load(&files).unwrap();
        let policy =
            |a: &str| cedar_policy::Policy::parse(None, format!("{a} permit(principal, action, resource);")).unwrap();
        rules
            .annotate(
                "issuance/x.cedar",
                "a",
                &policy("@aws_session_policy(\"artifacts-read\") @aws_session_tags(\"owner\")"),
            )
            .unwrap();
        rules
            .annotate(
                "issuance/x.cedar",
                "b",
                &policy("@aws_session_policy(\"other\") @aws_session_tags(\"tier,owner\")"),
            )
            .unwrap();
        rules.annotate("issuance/x.cedar", "c", &policy("")).unwrap();
        let entry = crate::identity::InventoryEntry {
            id: crate::identity::WorkloadId::parse("spiffe://mayfly.local/ci/acme/app").unwrap(),
            owner: "team@example.org".into(),
            purpose: "p".into(),
            environment: "ci".into(),
            tier: "critical".into(),
            expires: time::macros::date!(2030 - 01 - 01),
            selectors: Default::default(),
            known_as: Default::default(),
        };
        let ttl = Ttl::from_secs(3600).unwrap();
        let b = rules.grant("b", &entry, ttl);
        assert_eq!(b.session_policy.as_ref().unwrap().names, vec!["other".to_owned()]);
        let doc: Value = serde_json::from_str(&b.session_policy.unwrap().document).unwrap();
        assert_eq!(doc["Statement"][0]["Action"], "sqs:*", "b's statements only");
        assert_eq!(b.tags.keys().cloned().collect::<Vec<_>>(), vec!["owner".to_owned(), "tier".to_owned()]);
        assert_eq!(b.ceiling, ttl);
        let c = rules.grant("c", &entry, ttl);
        assert!(c.session_policy.is_none() && c.tags.is_empty(), "c grants the role unscoped, untagged");
    }

    #[test]
    fn a_long_scoped_rule_and_a_short_unscoped_one_do_not_add_up() {
        let rules = r#"
            @id("read-long") @max_ttl("12h") @aws_session_policy("artifacts-read")
            permit (principal, action == Mayfly::Action::"issue_aws", resource == Mayfly::AwsRole::"arn:aws:iam::111122223333:role/acme-app-read")
            when { principal.attestation == "oidc" };
            @id("full-short") @max_ttl("15m")
            permit (principal, action == Mayfly::Action::"issue_aws", resource == Mayfly::AwsRole::"arn:aws:iam::111122223333:role/acme-app-read")
            when { principal.attestation == "oidc" };
        "#;
        let release = crate::policy::replay::tests::release(Some(rules));
        let entry =
            release.inventory.entries().iter().find(|e| e.id.as_str() == "spiffe://mayfly.local/ci/acme/app").unwrap();
        let claims: crate::identity::OidcClaims = serde_json::from_value(serde_json::json!({
            "issuer": "https://token.actions.githubusercontent.com", "subject": "s", "repository": "acme/app", "git_ref": "refs/heads/main", "event_name": "push"
        })).unwrap();
        let selectors = claims.selectors();
        let context = crate::policy::RequestContext { oidc: Some(claims), ..Default::default() };
        let resource = crate::policy::Resource::Aws {
            role: crate::policy::AwsRole::parse("arn:aws:iam::111122223333:role/acme-app-read").unwrap(),
        };
        for asked in ["10m", "8h"] {
            let req = crate::policy::DecisionRequest {
                workload: entry,
                attestation: "oidc",
                selectors: &selectors,
                resource: &resource,
                requested_ttl: Ttl::parse(asked).unwrap(),
                context: &context,
                reserved_audiences: &[],
            };
            let d = release.engine.decide(&req, std::time::SystemTime::now());
            let crate::policy::Verdict::Allow(g) = d.verdict else { panic!("{:?}", d.rules) };
            let aws = g.aws().unwrap();
            assert_eq!(aws.ceiling.as_secs(), 12 * 3600, "{asked}");
            assert_eq!(
                aws.session_policy.as_ref().map(|p| p.names.clone()),
                Some(vec!["artifacts-read".to_owned()]),
                "{asked}: never unscoped and long"
            );
        }
    }

    #[test]
    fn tag_values_keep_what_aws_accepts_and_replace_the_rest() {
        assert_eq!(tag_value("payments@example.org"), "payments@example.org");
        assert_eq!(tag_value("nightly export (legacy); v2"), "nightly export _legacy__ v2");
        assert_eq!(tag_value(&"x".repeat(300)).len(), 256);
    }
}

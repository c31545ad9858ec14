//! What an `issue_aws` permit says beyond yes and its `@max_ttl`: the session policy that
//! scopes the role down (`@aws_session_policy("name")`, the document in
//! `session-policies/<name>.json`) and which identity attributes become session tags
//! (`@aws_session_tags("owner environment tier")`). Checked when the release loads, so a
//! typo is a rejected release, never a surprise at issuance.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use cedar_policy::Policy;
use serde_json::Value;

use super::bundle::PolicyFiles;
use super::PolicyError;
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
            if doc.get("Version").and_then(Value::as_str) != Some("2012-10-17") || statements.is_none_or(Vec::is_empty) {
                return Err(fail("an IAM policy needs \"Version\": \"2012-10-17\" and a non-empty \"Statement\" list".into()));
            }
            let compact = doc.to_string();
            if compact.len() > MAX_SESSION_POLICY_CHARS {
                return Err(fail(format!("{} characters without whitespace; STS accepts at most {MAX_SESSION_POLICY_CHARS}", compact.len())));
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

    /// The grant's AWS shape from the live permitting rules. Permits are a union: if any
    /// of them grants the role without a session policy, none applies; otherwise the
    /// session policy allows what any of theirs allows (their statements, together).
    pub fn grant(&self, permits: &[String], workload: &InventoryEntry, ceiling: Ttl) -> AwsGrant {
        let scoped: Option<BTreeSet<&String>> = permits.iter().map(|id| self.session_policy.get(id)).collect();
        let session_policy = scoped.filter(|names| !names.is_empty()).map(|names| {
            let statements: Vec<Value> = names
                .iter()
                .filter_map(|n| self.documents.get(*n))
                .flat_map(|d| d.get("Statement").and_then(Value::as_array).cloned().unwrap_or_default())
                .collect();
            let document = serde_json::json!({ "Version": "2012-10-17", "Statement": statements }).to_string();
            SessionPolicy { names: names.into_iter().cloned().collect(), document }
        });
        let attributes: BTreeSet<&String> = permits.iter().filter_map(|id| self.tags.get(id)).flatten().collect();
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
            format!("@id(\"x\") @max_ttl(\"1h\") {annotations} permit(principal, action == Mayfly::Action::\"issue_aws\", resource);")
        };
        let engine = |files: &[(&str, Option<&str>)]| super::super::Engine::from_files(&super::super::shipped_files_with(files)).map(|_| ()).map_err(|e| e.to_string());
        let missing = rule("@aws_session_policy(\"nope\")");
        let err = engine(&[("issuance/x.cedar", Some(missing.as_str()))]).unwrap_err();
        assert!(err.contains("session-policies/nope.json"), "{err}");
        let bad_tag = rule("@aws_session_tags(\"owner password\")");
        let err = engine(&[("issuance/x.cedar", Some(bad_tag.as_str()))]).unwrap_err();
        assert!(err.contains("`password` is not one of"), "{err}");
        let err = engine(&[("session-policies/artifacts-read.json", Some("{\"Statement\": []}"))]).unwrap_err();
        assert!(err.contains("2012-10-17"), "{err}");
        let huge = format!("{{\"Version\":\"2012-10-17\",\"Statement\":[{{\"Effect\":\"Allow\",\"Action\":\"s3:GetObject\",\"Resource\":\"{}\"}}]}}", "a".repeat(2100));
        let err = engine(&[("session-policies/artifacts-read.json", Some(huge.as_str()))]).unwrap_err();
        assert!(err.contains("at most 2048"), "{err}");
        assert!(engine(&[]).is_ok(), "the shipped release loads");
    }

    #[test]
    fn permits_are_a_union_any_unscoped_permit_leaves_the_role_unscoped() {
        let files = super::super::shipped_files_with(&[("session-policies/other.json", Some(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"sqs:*","Resource":"*"}]}"#))]);
        let mut rules = AwsRules::load(&files).unwrap();
        let policy = |a: &str| cedar_policy::Policy::parse(None, format!("{a} permit(principal, action, resource);")).unwrap();
        rules.annotate("issuance/x.cedar", "a", &policy("@aws_session_policy(\"artifacts-read\") @aws_session_tags(\"owner\")")).unwrap();
        rules.annotate("issuance/x.cedar", "b", &policy("@aws_session_policy(\"other\") @aws_session_tags(\"tier,owner\")")).unwrap();
        rules.annotate("issuance/x.cedar", "c", &policy("")).unwrap();
        let entry = crate::identity::InventoryEntry {
            id: crate::identity::WorkloadId::parse("spiffe://mayfly.local/ci/acme/app").unwrap(),
            owner: "team@example.org".into(),
            purpose: "p".into(),
            environment: "ci".into(),
            tier: "critical".into(),
            expires: time::macros::date!(2030 - 01 - 01),
            selectors: Default::default(),
        };
        let ttl = Ttl::from_secs(3600).unwrap();
        let both = rules.grant(&["a".into(), "b".into()], &entry, ttl);
        let scoped = both.session_policy.unwrap();
        assert_eq!(scoped.names, vec!["artifacts-read".to_owned(), "other".to_owned()]);
        let doc: Value = serde_json::from_str(&scoped.document).unwrap();
        assert_eq!(doc["Statement"].as_array().unwrap().len(), 2, "each permit's statements, together");
        assert_eq!(both.tags.keys().cloned().collect::<Vec<_>>(), vec!["owner".to_owned(), "tier".to_owned()]);
        assert!(rules.grant(&["a".into(), "c".into()], &entry, ttl).session_policy.is_none(), "c grants the role unscoped");
    }

    #[test]
    fn tag_values_keep_what_aws_accepts_and_replace_the_rest() {
        assert_eq!(tag_value("payments@example.org"), "payments@example.org");
        assert_eq!(tag_value("nightly export (legacy); v2"), "nightly export _legacy__ v2");
        assert_eq!(tag_value(&"x".repeat(300)).len(), 256);
    }
}

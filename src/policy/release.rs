//! A release: one policy tree, from a directory or a verified bundle, turned into what the
//! daemon decides with (engine + inventory) — only when its rules validate and its inventory
//! checks out for this trust domain. `test` runs the cases it carries: `mayfly policy
//! build` refuses to build a release whose cases fail, and `verify` re-runs them. The daemon
//! does not: cases without a pinned `now` age (an inventory entry expires), and a release
//! already built, tested and signed must not stop a restart months later.

use std::time::SystemTime;

use super::Engine;
use super::bundle::PolicyFiles;
use super::cases;
use crate::identity::{Inventory, TrustDomain};

/// Where a release came from and who vouched for it; recorded with every activation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    pub version: String,
    pub label: Option<String>,
    /// The id of the key whose signature verified; `None` for an unsigned dev tree.
    pub signed_by: Option<String>,
    /// The file or directory it was read from.
    pub source: String,
}

#[derive(Debug)]
pub struct Release {
    pub engine: Engine,
    pub inventory: Inventory,
    pub provenance: Provenance,
}

impl Release {
    /// Validates `files`. The error is for people: what failed, where.
    pub fn build(
        files: &PolicyFiles,
        trust_domain: &TrustDomain,
        label: Option<String>,
        signed_by: Option<String>,
        source: String,
    ) -> Result<Self, String> {
        let engine = Engine::from_files(files).map_err(|e| e.to_string())?;
        let inventory_text = files.get("inventory.toml").ok_or("inventory.toml is missing")?;
        let inventory = Inventory::parse(inventory_text, trust_domain).map_err(|e| format!("inventory.toml: {e}"))?;
        let provenance = Provenance { version: engine.version().to_owned(), label, signed_by, source };
        Ok(Self { engine, inventory, provenance })
    }

    /// Runs the release's own test cases at `now`; the number that passed, or what failed.
    pub fn test(&self, files: &PolicyFiles, now: SystemTime) -> Result<usize, String> {
        let outcomes = cases::run_all(&self.engine, &self.inventory, files, now);
        let failed: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.failure.as_ref().map(|why| format!("{} / {}: {why}", o.file, o.name)))
            .collect();
        if !failed.is_empty() {
            let shown: Vec<&str> = failed.iter().take(5).map(String::as_str).collect();
            return Err(format!(
                "{} of {} policy test cases fail: {}",
                failed.len(),
                outcomes.len(),
                shown.join(" | ")
            ));
        }
        Ok(outcomes.len())
    }

    pub fn version(&self) -> &str {
        &self.provenance.version
    }
}

//! `mayfly init DIR`: a starter directory outside any checkout — `mayfly.toml` for `serve`
//! (commented, every path inside DIR) and the shipped example `policies/` tree (rules, their
//! tests, the inventory), so `mayfly dev` and `serve` work from anywhere an installed binary
//! runs. The tree is compiled in: `STARTER_POLICIES` lists the repository's `policies/`
//! files with `include_str!`, and a test keeps that list equal to the directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::fail;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mayfly init ~/mayfly && cd ~/mayfly && mayfly policy test policies && mayfly dev\n  \
    mayfly init --force .      # put back the starter files, replacing edited ones\n\
    Then: the comments at the top of DIR/mayfly.toml say how to sign a release and `serve`.")]
pub struct Args {
    /// The directory to write into (created if missing).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Replace files that exist (otherwise an existing file stops it before anything is written).
    #[arg(long)]
    force: bool,
}

/// The starter configuration; `@DIR@` becomes the directory's absolute path.
const STARTER_CONFIG: &str = include_str!("init/mayfly.toml");

/// The repository's `policies/` tree, file by file (path below `policies/`, content).
/// Why a list and not a build script walking the tree: what ships is reviewed here, and
/// `the_starter_tree_is_the_repository_policies_tree` fails when the two drift apart.
pub const STARTER_POLICIES: &[(&str, &str)] = &[
    ("schema.cedarschema", include_str!("../../policies/schema.cedarschema")),
    ("inventory.toml", include_str!("../../policies/inventory.toml")),
    ("issuance/guardrails.cedar", include_str!("../../policies/issuance/guardrails.cedar")),
    ("issuance/ci.cedar", include_str!("../../policies/issuance/ci.cedar")),
    ("issuance/local.cedar", include_str!("../../policies/issuance/local.cedar")),
    ("assurance/critical.cedar", include_str!("../../policies/assurance/critical.cedar")),
    ("exceptions/legacy-batch.cedar", include_str!("../../policies/exceptions/legacy-batch.cedar")),
    ("break-glass/oncall.cedar", include_str!("../../policies/break-glass/oncall.cedar")),
    ("session-policies/artifacts-read.json", include_str!("../../policies/session-policies/artifacts-read.json")),
    ("tests/local.toml", include_str!("../../policies/tests/local.toml")),
    ("tests/ci.toml", include_str!("../../policies/tests/ci.toml")),
    ("tests/wit.toml", include_str!("../../policies/tests/wit.toml")),
    ("tests/break-glass.toml", include_str!("../../policies/tests/break-glass.toml")),
];

pub fn run(args: Args) -> ExitCode {
    match write_starter(&args.dir, args.force) {
        Ok(written) => {
            let shown = args.dir.display();
            out!("wrote {written} files to {shown}: mayfly.toml and policies/ ({} files)", STARTER_POLICIES.len());
            out!("next: cd {shown} && mayfly policy test policies && mayfly dev");
            out!("serve: sign a release first; the comments at the top of mayfly.toml say how");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Writes the starter files into `dir`; without `force`, refuses before writing anything
/// if one of them exists. Returns how many files it wrote.
fn write_starter(dir: &Path, force: bool) -> Result<usize, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("`{}`: {e}", dir.display()))?;
    let absolute = dir.canonicalize().map_err(|e| format!("`{}`: {e}", dir.display()))?;
    let files = starter_files(&absolute)?;
    if !force {
        let existing: Vec<String> = files
            .iter()
            .filter(|(path, _)| std::fs::symlink_metadata(path).is_ok())
            .map(|(path, _)| format!("`{}`", path.display()))
            .collect();
        if let Some(first) = existing.first() {
            let more = match existing.len() {
                1 => String::new(),
                n => format!(" and {} more starter files", n - 1),
            };
            return Err(format!(
                "{first}{more} exist already (nothing was written; --force replaces the starter files)"
            ));
        }
    }
    for (path, content) in &files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("`{}`: {e}", parent.display()))?;
        }
        write_file(path, content, force).map_err(|e| format!("`{}`: {e}", path.display()))?;
    }
    Ok(files.len())
}

/// Every file `init` writes under `dir` (absolute), with its content.
fn starter_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let text = dir.to_str().ok_or_else(|| format!("`{}`: not UTF-8, so not writable into TOML", dir.display()))?;
    if text.chars().any(char::is_control) {
        return Err(format!("`{}`: a control character in the path", dir.display()));
    }
    // Why escape: the path lands inside TOML basic strings (and comments, where it is inert).
    let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
    let mut files = vec![(dir.join("mayfly.toml"), STARTER_CONFIG.replace("@DIR@", &escaped))];
    let policies = dir.join("policies");
    files.extend(STARTER_POLICIES.iter().map(|(path, content)| (policies.join(path), (*content).to_owned())));
    Ok(files)
}

fn write_file(path: &Path, content: &str, replace: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o644);
    if replace {
        options.create(true).truncate(true);
    } else {
        // Why create_new: a file made between the check and here is still not replaced.
        options.create_new(true);
    }
    let mut file = options.open(path)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starter_tree_is_the_repository_policies_tree() {
        fn walk(root: &Path, dir: &Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, found);
                } else {
                    found.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let mut found = Vec::new();
        walk(&root, &root, &mut found);
        found.sort();
        let mut listed: Vec<String> = STARTER_POLICIES.iter().map(|(p, _)| (*p).to_owned()).collect();
        listed.sort();
        assert_eq!(listed, found, "init::STARTER_POLICIES must list every file of policies/");
    }

    #[test]
    fn init_writes_a_config_that_parses_and_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a \"quoted\" dir");
        assert_eq!(write_starter(&target, false).unwrap(), STARTER_POLICIES.len() + 1);
        let text = std::fs::read_to_string(target.join("mayfly.toml")).unwrap();
        let raw: toml::Value = toml::from_str(&text).unwrap();
        let expected = target.canonicalize().unwrap().join("data");
        assert_eq!(raw["data_dir"].as_str().unwrap(), expected.to_str().unwrap());

        std::fs::write(target.join("policies/inventory.toml"), "# edited").unwrap();
        let refused = write_starter(&target, false).unwrap_err();
        assert!(refused.contains("exist already") && refused.contains("mayfly.toml"), "{refused}");
        assert_eq!(std::fs::read_to_string(target.join("policies/inventory.toml")).unwrap(), "# edited");

        write_starter(&target, true).unwrap();
        assert!(std::fs::read_to_string(target.join("policies/inventory.toml")).unwrap().contains("[[workload]]"));
    }
}

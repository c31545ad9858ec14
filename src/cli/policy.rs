//! `mayfly policy validate|test`: check a policies/ tree before it ships. Exit 0 only when
//! everything holds; output names the file, line and rule.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use crate::config::DEV_TRUST_DOMAIN;
use crate::identity::{Inventory, TrustDomain};
use crate::policy::Engine;
use crate::policy::cases::{self, CaseFile};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Parse the rules, validate them against the schema, and check the inventory.
    Validate {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Trust domain inventory ids must belong to.
        #[arg(long, default_value = DEV_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Run every case in DIR/tests/*.toml and print what failed and why.
    Test {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        #[arg(long, default_value = DEV_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

pub fn run(command: Command) -> ExitCode {
    let (dir, trust_domain, test) = match command {
        Command::Validate { dir, trust_domain } => (dir, trust_domain, false),
        Command::Test { dir, trust_domain } => (dir, trust_domain, true),
    };
    let (engine, inventory) = match load(&dir, &trust_domain) {
        Ok(loaded) => loaded,
        Err(why) => {
            eprintln!("policy `{}`: INVALID\n{why}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    if !test {
        println!(
            "policy `{}`: valid (version {}, {} inventory entries, {} exceptions)",
            dir.display(),
            engine.version(),
            inventory.entries().len(),
            engine.exceptions().len()
        );
        let today = crate::clock::utc_date(SystemTime::now());
        for e in engine.exceptions() {
            let days_left = (e.expires - today).whole_days();
            if e.is_expired(today) {
                println!(
                    "debt: exception `{}` ({}) expired after {}; it grants nothing; owner {} should remove it",
                    e.id,
                    e.path.display(),
                    e.expires,
                    e.owner
                );
            } else if days_left < 14 {
                println!(
                    "warning: exception `{}` ({}) stops applying after {} ({} days); owner {}",
                    e.id,
                    e.path.display(),
                    e.expires,
                    days_left,
                    e.owner
                );
            }
        }
        return ExitCode::SUCCESS;
    }
    run_cases(&dir, &engine, &inventory)
}

fn load(dir: &Path, trust_domain: &str) -> Result<(Engine, Inventory), String> {
    let td = TrustDomain::parse(trust_domain).map_err(|e| format!("--trust-domain: {e}"))?;
    let engine = Engine::load(dir).map_err(|e| e.to_string())?;
    let path = dir.join("inventory.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let inventory = Inventory::parse(&text, &td).map_err(|e| format!("`{}`: {e}", path.display()))?;
    Ok((engine, inventory))
}

fn run_cases(dir: &Path, engine: &Engine, inventory: &Inventory) -> ExitCode {
    let tests = dir.join("tests");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&tests) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect(),
        Err(e) => {
            eprintln!("cannot read `{}`: {e}", tests.display());
            return ExitCode::FAILURE;
        }
    };
    files.sort();
    let (mut passed, mut failed) = (0usize, 0usize);
    let now = SystemTime::now();
    for path in &files {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| toml::from_str::<CaseFile>(&text).map_err(|e| e.to_string()));
        let file = match parsed {
            Ok(f) => f,
            Err(why) => {
                eprintln!("FAIL  `{}`: {why}", path.display());
                failed += 1;
                continue;
            }
        };
        for outcome in cases::run(engine, inventory, &file, now) {
            match outcome.failure {
                None => {
                    passed += 1;
                    println!("ok    {}", outcome.name);
                }
                Some(why) => {
                    failed += 1;
                    println!("FAIL  {} ({})\n      {why}", outcome.name, path.display());
                }
            }
        }
    }
    if passed + failed == 0 {
        eprintln!("no cases in `{}`", tests.display());
        return ExitCode::FAILURE;
    }
    println!("policy: {passed} passed, {failed} failed");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

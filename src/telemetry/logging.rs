//! The daemon's log: text for people or JSON lines for collectors (`--log-format`, config
//! `telemetry.log_format`), at the level `--log-level` / `telemetry.log_level` / `RUST_LOG`
//! says (that order; default `info`). Colour only when stderr is a terminal, so files and
//! journald never get ANSI escapes. Secrets never reach it: callers log ids, serials and
//! fingerprints, never tokens or keys.

use std::io::IsTerminal;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (fields flattened), for log collectors.
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}` is not `text` or `json`")),
        }
    }
}

/// Checks a level or filter directive (`info`, `debug`, `mayfly=debug,info`).
pub fn check_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level).map(|_| ()).map_err(|e| format!("`{level}`: {e}"))
}

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(format: LogFormat, level: Option<&str>) {
    let filter = match level {
        Some(l) => tracing_subscriber::EnvFilter::try_new(l).ok(),
        None => tracing_subscriber::EnvFilter::try_from_default_env().ok(),
    }
    .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

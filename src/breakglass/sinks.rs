//! Elevated sinks: where break-glass steps are written, synchronously and in addition to
//! the ledger, so that the people who must know (on-call channel, security) know at once.
//! Unlike best-effort event sinks, an elevated write that fails fails the step: no
//! break-glass credential leaves unless every configured sink took its line. Sinks come only
//! from the config file. Decides nothing.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::ledger::BoxFuture;

pub trait ElevatedSink: Send + Sync + 'static {
    /// Resolves once the line is durably accepted.
    fn write<'a>(&'a self, line: &'a str) -> BoxFuture<'a, Result<(), String>>;
    fn name(&self) -> String;
}

/// An append-only file (mode 0600): one JSON object per line, fsynced before the step goes on.
pub struct FileSink {
    path: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl FileSink {
    pub fn new(path: PathBuf) -> Self {
        Self { path, lock: tokio::sync::Mutex::new(()) }
    }
}

impl ElevatedSink for FileSink {
    fn write<'a>(&'a self, line: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let _one_writer = self.lock.lock().await;
            let path = self.path.clone();
            let mut text = line.to_owned();
            text.push('\n');
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(&path)?;
                f.write_all(text.as_bytes())?;
                f.sync_data()
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("`{}`: {e}", self.path.display()))
        })
    }

    fn name(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// A webhook (a paging or chat system): POST of the JSON line, a 2xx within 5 s, retried
/// with backoff; the last failure is the step's failure.
pub struct WebhookSink {
    url: String,
    client: reqwest::Client,
    retries: u32,
}

impl WebhookSink {
    pub fn new(url: String, retries: u32) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { url, client, retries })
    }
}

impl ElevatedSink for WebhookSink {
    fn write<'a>(&'a self, line: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut last = String::new();
            for attempt in 0..=self.retries {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 * (1 << attempt.min(5)))).await;
                }
                match self
                    .client
                    .post(&self.url)
                    .header("content-type", "application/json")
                    .body(line.to_owned())
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => return Ok(()),
                    Ok(r) => last = format!("answered {}", r.status()),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(format!("webhook `{}`: {last} (after {} attempts)", self.url, self.retries + 1))
        })
    }

    fn name(&self) -> String {
        format!("webhook {}", self.url)
    }
}

/// Every configured elevated sink; a write succeeds only if each one took the line.
#[derive(Clone, Default)]
pub struct Elevated {
    sinks: Vec<Arc<dyn ElevatedSink>>,
}

impl Elevated {
    pub fn new(sinks: Vec<Arc<dyn ElevatedSink>>) -> Self {
        Self { sinks }
    }

    pub fn is_configured(&self) -> bool {
        !self.sinks.is_empty()
    }

    pub async fn write(&self, line: &str) -> Result<(), String> {
        if self.sinks.is_empty() {
            return Err("no elevated sink is configured (break_glass.log_file or break_glass.webhook)".into());
        }
        for sink in &self.sinks {
            if let Err(e) = sink.write(line).await {
                tracing::error!(sink = sink.name(), error = %e, "elevated sink write failed");
                return Err(format!("the elevated log ({}) cannot be written: {e}", sink.name()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_file_sink_appends_private_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bg.log");
        let sinks = Elevated::new(vec![Arc::new(FileSink::new(path.clone()))]);
        sinks.write(r#"{"n":1}"#).await.unwrap();
        sinks.write(r#"{"n":2}"#).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":1}\n{\"n\":2}\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn no_sink_or_a_broken_one_fails_the_write() {
        assert!(Elevated::default().write("null").await.is_err());
        let broken = Elevated::new(vec![Arc::new(FileSink::new("/nonexistent-dir/bg.log".into()))]);
        assert!(broken.write("null").await.unwrap_err().contains("cannot be written"));
    }
}

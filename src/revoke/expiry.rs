//! The expiry sweep: records `expired` for every credential past its not-after (the
//! removal half of its lifecycle), in (not_after, id) order from a watermark kept in the
//! events themselves, so a restart catches up on what expired while the daemon was down.
//! Revoked credentials were already removed and are skipped; expiries of break-glass
//! credentials go to the elevated sinks too.

use std::sync::Arc;
use std::time::Duration;

use super::Revocations;
use crate::breakglass::EmergencyLog;
use crate::clock::{Clock, Ticker, unix_secs};
use crate::ledger::event::{Event, EventKind, Expired};
use crate::ledger::{CredentialFilter, EventFilter, Ledger, LedgerError, LedgerRead};

/// Credentials taken per read.
const BATCH: i64 = 500;

pub struct ExpirySweep {
    pub ledger: Arc<dyn Ledger>,
    pub reader: Arc<dyn LedgerRead>,
    pub revocations: Arc<Revocations>,
    pub emergency: Arc<EmergencyLog>,
    pub clock: Arc<dyn Clock>,
    /// The last credential recorded as expired: (not_after, id).
    watermark: Option<(i64, String)>,
}

impl ExpirySweep {
    pub fn new(
        ledger: Arc<dyn Ledger>,
        reader: Arc<dyn LedgerRead>,
        revocations: Arc<Revocations>,
        emergency: Arc<EmergencyLog>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { ledger, reader, revocations, emergency, clock, watermark: None }
    }

    /// Sweeps every `every` until the daemon stops.
    pub async fn run(mut self, every: Duration, stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticker = Ticker::new(every, stop);
        while ticker.next().await {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "expiry sweep failed; retrying next tick");
            }
        }
    }

    pub async fn sweep(&mut self) -> Result<(), LedgerError> {
        if self.watermark.is_none() {
            let last =
                self.reader.events(EventFilter { last: Some(1), ..EventFilter::kinds(&[EventKind::Expired]) }).await?;
            let mark = match last.first().map(|e| e.event()).transpose()? {
                Some(Event::Expired(e)) => (e.not_after, e.credential_id),
                _ => (i64::MIN, String::new()),
            };
            self.watermark = Some(mark);
        }
        let now = unix_secs(self.clock.now());
        loop {
            let after = self.watermark.clone().unwrap_or((i64::MIN, String::new()));
            let batch = self.reader.credentials(CredentialFilter::Expiring { after, until: now, limit: BATCH }).await?;
            if batch.is_empty() {
                return Ok(());
            }
            // Why all at once: each record waits for a commit; queued together they share
            // one group commit instead of one fsync per expired credential, so the sweep
            // keeps up with issuance.
            let credentials: Vec<_> = batch.into_iter().map(|r| r.credential).collect();
            let expired: Vec<Option<Expired>> = credentials
                .iter()
                .map(|c| {
                    (!self.revocations.is_revoked(&c.id)).then(|| Expired {
                        credential_id: c.id.clone(),
                        kind: c.kind.clone(),
                        identity: c.identity.clone(),
                        serial: c.serial.clone(),
                        not_after: c.not_after,
                        break_glass: self.emergency.is_flagged(&c.id),
                    })
                })
                .collect();
            let at = self.clock.now();
            let recorded = futures_util::future::join_all(
                expired.iter().flatten().map(|e| self.ledger.record(at, Event::Expired(e.clone()))),
            )
            .await;
            let mut outcomes = recorded.into_iter();
            // The watermark moves over a prefix of the batch whose events are all durable.
            for (c, e) in credentials.into_iter().zip(expired) {
                if let Some(e) = e {
                    outcomes.next().unwrap_or(Err(LedgerError::WriterStopped))?;
                    if e.break_glass {
                        self.emergency.later("expired", &e).await;
                    }
                }
                self.watermark = Some((c.not_after, c.id));
            }
        }
    }
}

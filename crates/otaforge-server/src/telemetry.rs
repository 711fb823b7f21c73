//! Buffered device check-in reports: a poll touches memory only, and a background task
//! writes the batch in one transaction every flush interval and once more at shutdown.

use std::collections::HashMap;
use std::sync::Mutex;

use otaforge_store::Store;
use otaforge_store::model::{Id, Telemetry};

#[derive(Default)]
pub struct TelemetryBuffer {
    pending: Mutex<HashMap<Id, Telemetry>>,
    /// The map the last flush emptied, with its room: the next flush swaps it for the
    /// pending one, so that the buffer does not grow its table again (page by fresh page)
    /// after every flush.
    spare: Mutex<HashMap<Id, Telemetry>>,
    /// When the oldest report still pending came in.
    oldest: Mutex<Option<std::time::Instant>>,
    /// One flush at a time (concurrent batches would lock the same rows in two orders), and
    /// the batch it writes, whose room is kept from one flush to the next.
    flushing: tokio::sync::Mutex<Vec<(Id, Telemetry)>>,
    last: Mutex<FlushStats>,
}

/// The last flush: how many devices it wrote, how long the write took, and how long its
/// oldest report had waited in memory until written (the flush lag).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, utoipa::ToSchema)]
pub struct FlushStats {
    pub devices: usize,
    pub write_ms: u64,
    pub lag_ms: u64,
    /// Reports waiting now.
    pub pending: usize,
}

impl TelemetryBuffer {
    /// Folds a report into the pending batch.
    pub fn record(&self, device: Id, report: Telemetry) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_empty() {
            *self.oldest.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::time::Instant::now());
        }
        pending.entry(device).or_default().merge(report);
    }

    /// The last flush's figures, and how many reports wait now.
    pub fn stats(&self) -> FlushStats {
        let mut stats = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        stats.pending = self.pending.lock().unwrap_or_else(|e| e.into_inner()).len();
        stats
    }

    /// Writes everything pending. On failure the batch goes back into the buffer, under
    /// any newer reports, so nothing is lost.
    pub async fn flush(&self, store: &dyn Store) -> otaforge_store::Result<usize> {
        let mut batch = self.flushing.lock().await;
        let mut taken = std::mem::take(&mut *self.spare.lock().unwrap_or_else(|e| e.into_inner()));
        let oldest = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *pending, &mut taken);
            self.oldest.lock().unwrap_or_else(|e| e.into_inner()).take()
        };
        batch.clear();
        batch.extend(taken.drain());
        *self.spare.lock().unwrap_or_else(|e| e.into_inner()) = taken;
        // Rows in id order, so that any other writer locking several devices cannot deadlock
        // with this batch.
        batch.sort_unstable_by_key(|(id, _)| *id);
        if batch.is_empty() {
            return Ok(0);
        }
        let started = std::time::Instant::now();
        match store.record_telemetry(&batch).await {
            Ok(()) => {
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = FlushStats {
                    devices: batch.len(),
                    write_ms: started.elapsed().as_millis() as u64,
                    lag_ms: oldest.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0),
                    pending: 0,
                };
                let written = batch.len();
                batch.clear();
                Ok(written)
            }
            Err(err) => {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let mut first = self.oldest.lock().unwrap_or_else(|e| e.into_inner());
                *first = oldest.or(*first);
                drop(first);
                for (id, mut older) in batch.drain(..) {
                    if let Some(newer) = pending.remove(&id) {
                        older.merge(newer);
                    }
                    pending.insert(id, older);
                }
                Err(err)
            }
        }
    }
}

//! Buffered device check-in reports: a poll touches memory only, and a background task
//! writes the batch in one transaction every flush interval and once more at shutdown.

use std::collections::HashMap;
use std::sync::Mutex;

use otaforge_store::Store;
use otaforge_store::model::{Id, Telemetry};

#[derive(Default)]
pub struct TelemetryBuffer {
    pending: Mutex<HashMap<Id, Telemetry>>,
    /// One flush at a time: concurrent batches would lock the same rows in two orders.
    flushing: tokio::sync::Mutex<()>,
}

impl TelemetryBuffer {
    /// Folds a report into the pending batch.
    pub fn record(&self, device: Id, report: Telemetry) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.entry(device).or_default().merge(report);
    }

    /// Writes everything pending. On failure the batch goes back into the buffer, under
    /// any newer reports, so nothing is lost.
    pub async fn flush(&self, store: &dyn Store) -> otaforge_store::Result<usize> {
        let _one_at_a_time = self.flushing.lock().await;
        let mut batch: Vec<(Id, Telemetry)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *pending).into_iter().collect()
        };
        // Rows in id order, so that any other writer locking several devices cannot deadlock
        // with this batch.
        batch.sort_unstable_by_key(|(id, _)| *id);
        if batch.is_empty() {
            return Ok(0);
        }
        match store.record_telemetry(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(err) => {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (id, mut older) in batch {
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

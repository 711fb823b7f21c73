//! Work on many devices at once: a CSV import (all rows checked first, then written in one
//! transaction, so a bad row leaves nothing half-imported and a re-run changes nothing new),
//! changes by filter (verify, block, move, delete), and the CSV export.

use std::collections::HashMap;

use axum::http::StatusCode;
use otaforge_store::model::*;

use crate::AppState;
use crate::core::fleet::{Actor, check_serial};
use crate::error::{ApiError, ApiResult};

/// At most this many faults are listed in a refusal (the count says how many there were).
const LISTED_FAULTS: usize = 20;

/// The columns an import understands; `serial` is the only one required.
pub const IMPORT_COLUMNS: &[&str] = &[
    "serial",
    "group",
    "status",
    "password",
    "token",
    "password_hash",
    "public_key",
];

fn unprocessable(message: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
}

impl AppState {
    /// Imports devices from CSV (a header line naming the columns, then one device a line;
    /// `group` by name or id, default the product's default group; `status` default
    /// verified; `password` or `token`, the device's password or hawkBit target token, is
    /// hashed; `password_hash` is an Argon2id PHC string; `public_key` a PEM key for
    /// Mender). Existing serials are updated. Any bad row: 422 listing the faults by line,
    /// nothing written.
    pub async fn import_devices(
        &self,
        actor: &Actor,
        product: Id,
        csv_text: &[u8],
    ) -> ApiResult<ImportOutcome> {
        let product = self.store().get_product(product).await?;
        let groups = self.store().list_groups(product.id).await?;
        let by_name: HashMap<&str, Id> = groups.iter().map(|g| (g.name.as_str(), g.id)).collect();
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(false)
            .from_reader(csv_text);
        let header = reader
            .headers()
            .map_err(|e| unprocessable(format!("line 1: {e}")))?
            .clone();
        let mut column = HashMap::new();
        for (i, name) in header.iter().enumerate() {
            let name = name.to_ascii_lowercase();
            if !IMPORT_COLUMNS.contains(&name.as_str()) {
                return Err(unprocessable(format!(
                    "line 1: unknown column {name:?}; the columns are {}",
                    IMPORT_COLUMNS.join(", ")
                )));
            }
            if column.insert(name.clone(), i).is_some() {
                return Err(unprocessable(format!("line 1: column {name:?} twice")));
            }
        }
        if !column.contains_key("serial") {
            return Err(unprocessable("line 1: no serial column".into()));
        }
        if column.contains_key("password") && column.contains_key("token") {
            return Err(unprocessable(
                "line 1: password and token are the same thing; give one".into(),
            ));
        }
        let mut faults: Vec<String> = Vec::new();
        let mut fault_count = 0usize;
        let mut fault = |faults: &mut Vec<String>, text: String| {
            fault_count += 1;
            if faults.len() < LISTED_FAULTS {
                faults.push(text);
            }
        };
        // The rows as they will be written, their lines, and the passwords still to hash
        // (by row index): one copy of each row in memory, whatever the file's size.
        let mut rows: Vec<ImportedDevice> = Vec::new();
        let mut lines: Vec<u64> = Vec::new();
        let mut passwords: Vec<(usize, String)> = Vec::new();
        for record in reader.records() {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map(|p| p.line()).unwrap_or(0);
                    fault(&mut faults, format!("line {line}: {e}"));
                    continue;
                }
            };
            let line = record.position().map(|p| p.line()).unwrap_or(0);
            let get = |name: &str| {
                column
                    .get(name)
                    .and_then(|i| record.get(*i))
                    .filter(|v| !v.is_empty())
            };
            let serial = match check_serial(get("serial").unwrap_or_default()) {
                Ok(s) => s,
                Err(e) => {
                    fault(&mut faults, format!("line {line}: {}", e.message));
                    continue;
                }
            };
            let group_id = match get("group") {
                None => product.default_group_id,
                Some(g) => match by_name.get(g).copied().or_else(|| {
                    g.parse::<Id>()
                        .ok()
                        .filter(|id| groups.iter().any(|x| x.id == *id))
                }) {
                    Some(id) => id,
                    None => {
                        fault(&mut faults, format!("line {line}: no group {g:?}"));
                        continue;
                    }
                },
            };
            let status = match get("status") {
                None => DeviceStatus::Verified,
                Some(s) => match DeviceStatus::parse(s) {
                    Some(s) => s,
                    None => {
                        fault(
                            &mut faults,
                            format!(
                                "line {line}: status {s:?} is not new, verified, blocked or disabled"
                            ),
                        );
                        continue;
                    }
                },
            };
            let password = get("password").or_else(|| get("token"));
            if password.is_some_and(|p| p.len() > 128) {
                fault(
                    &mut faults,
                    format!("line {line}: the password is longer than 128 bytes"),
                );
                continue;
            }
            let password_hash = get("password_hash");
            if let Some(h) = password_hash
                && !h.starts_with("$argon2id$")
            {
                fault(
                    &mut faults,
                    format!("line {line}: password_hash is not an Argon2id PHC string"),
                );
                continue;
            }
            if password.is_some() && password_hash.is_some() {
                fault(
                    &mut faults,
                    format!("line {line}: give a password or a password_hash, not both"),
                );
                continue;
            }
            let public_key = get("public_key");
            if let Some(k) = public_key
                && !crate::core::device_auth::is_public_key(k)
            {
                fault(
                    &mut faults,
                    format!("line {line}: public_key is not an RSA, P-256 or Ed25519 key in PEM"),
                );
                continue;
            }
            if let Some(p) = password {
                passwords.push((rows.len(), p.to_string()));
            }
            rows.push(ImportedDevice {
                serial,
                group_id,
                status,
                password_hash: password_hash.map(str::to_string),
                public_key: public_key.map(str::to_string),
            });
            lines.push(line);
        }
        // A serial twice: found by sorting row numbers by serial (no second copy of them).
        let mut order: Vec<u32> = (0..rows.len() as u32).collect();
        order.sort_unstable_by(|a, b| {
            rows[*a as usize]
                .serial
                .cmp(&rows[*b as usize].serial)
                .then(a.cmp(b))
        });
        for pair in order.windows(2) {
            let (a, b) = (pair[0] as usize, pair[1] as usize);
            if rows[a].serial == rows[b].serial {
                fault(
                    &mut faults,
                    format!(
                        "line {}: serial {:?} is on line {} too",
                        lines[b], rows[b].serial, lines[a]
                    ),
                );
            }
        }
        drop(order);
        if fault_count > 0 {
            let more = fault_count.saturating_sub(faults.len());
            return Err(unprocessable(format!(
                "{fault_count} bad rows, nothing imported: {}{}",
                faults.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                }
            )));
        }
        for (index, hash) in hash_passwords(passwords, &lines).await? {
            rows[index].password_hash = Some(hash);
        }
        let outcome = self.store().import_devices(product.id, &rows).await?;
        self.inner.catalog.invalidate();
        self.audited(
            actor,
            "imported devices",
            &format!("product {}", product.name),
            &format!(
                "{} rows: {} created, {} updated",
                outcome.rows, outcome.created, outcome.updated
            ),
        )
        .await;
        Ok(outcome)
    }

    /// Applies `change` to every device of the product the filter takes; how many changed.
    /// (`bulk_change` reads an action as the API and the pages name it.)
    /// An empty filter takes every device only when `all` says so.
    pub async fn bulk_devices(
        &self,
        actor: &Actor,
        product: Id,
        filter: &DeviceQuery,
        all: bool,
        change: BulkChange,
    ) -> ApiResult<u64> {
        crate::core::fleet::check_device_query(filter)?;
        let product = self.store().get_product(product).await?;
        if filter.filters_nothing() && !all {
            return Err(unprocessable(
                "the filter takes every device; say \"all\": true to mean it".into(),
            ));
        }
        // Buffered reports would otherwise be written back to rows just deleted or judged
        // by an older filter.
        self.flush_telemetry().await?;
        let changed = self
            .store()
            .bulk_devices(product.id, filter, change)
            .await?;
        self.inner.catalog.invalidate();
        let what = match change {
            BulkChange::Status(s) => format!("set status {}", s.as_str()),
            BulkChange::Group(g) => format!("moved to group {g}"),
            BulkChange::Delete => "deleted".to_string(),
        };
        self.audited(
            actor,
            &format!("bulk {what}"),
            &format!("product {}", product.name),
            &format!("{changed} devices; filter {filter:?}"),
        )
        .await;
        Ok(changed)
    }
}

/// Hashes passwords (by row index) on every core (Argon2id is meant to be slow).
async fn hash_passwords(
    passwords: Vec<(usize, String)>,
    lines: &[u64],
) -> ApiResult<Vec<(usize, String)>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let per = passwords.len().div_ceil(threads).max(1);
    let mut passwords = passwords.into_iter();
    let mut tasks = Vec::new();
    loop {
        let chunk: Vec<(usize, u64, String)> = passwords
            .by_ref()
            .take(per)
            .map(|(i, p)| (i, lines.get(i).copied().unwrap_or(0), p))
            .collect();
        if chunk.is_empty() {
            break;
        }
        tasks.push(tokio::task::spawn_blocking(move || {
            chunk
                .into_iter()
                .map(|(index, line, password)| {
                    crate::auth::hash_password(&password)
                        .map(|hash| (index, hash))
                        .map_err(|e| unprocessable(format!("line {line}: {}", e.message)))
                })
                .collect::<ApiResult<Vec<_>>>()
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.extend(
            task.await
                .map_err(|e| ApiError::internal("hashing passwords", e))??,
        );
    }
    Ok(out)
}

/// A bulk action as the API and the pages name it: `verify`, `block`, `disable`, `unverify`,
/// `delete`, or `move` with its group.
pub fn bulk_change(action: &str, group: Option<Id>) -> ApiResult<BulkChange> {
    Ok(match (action, group) {
        ("verify", None) => BulkChange::Status(DeviceStatus::Verified),
        ("block", None) => BulkChange::Status(DeviceStatus::Blocked),
        ("disable", None) => BulkChange::Status(DeviceStatus::Disabled),
        ("unverify", None) => BulkChange::Status(DeviceStatus::New),
        ("delete", None) => BulkChange::Delete,
        ("move", Some(group)) => BulkChange::Group(group),
        ("move", None) => return Err(unprocessable("move needs a group_id".into())),
        (_, Some(_)) => return Err(unprocessable("group_id goes with move only".into())),
        (other, None) => {
            return Err(unprocessable(format!(
                "no action {other:?}: verify, block, disable, unverify, move or delete"
            )));
        }
    })
}

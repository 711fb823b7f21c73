//! SQL backends: `SqliteStore` and `PgStore`. Both schemas use the same column types and
//! `$N` placeholders, so one macro body implements `Store` for each backend's pool type.

use async_trait::async_trait;
use sqlx::Row;

use crate::error::{Result, StoreError};
use crate::model::*;
use crate::store::Store;
use otaforge_domain::rollout_plan::{FleetOrder, ORDER_PRIME};

const PRODUCT_COLS: &str =
    "id, name, api_key_digest, default_group_id, created_at, artifact_keys, firmware_keys";
const GROUP_COLS: &str =
    "id, product_id, name, is_default, firmware_id, other_firmware, config, created_at";
const DEVICE_COLS: &str = "id, product_id, group_id, serial, status, password_hash, created_at, \
     last_seen, version, sketch_md5, sta_mac, ap_mac, free_space, chip_size, sdk_version, \
     firmware_id, secrets, attributes, closed_firmware_id, public_key, open_firmware_id, chip";
/// `DEVICE_COLS` with the time seen read by `seen` instead of the `last_seen` column.
fn device_cols_seen_as(seen: &str) -> String {
    DEVICE_COLS.replacen(" last_seen,", &format!(" {seen} AS last_seen,"), 1)
}

/// A new device's columns, as `INSERT ... RETURNING` gives them (it has not been seen).
fn new_device_cols() -> &'static str {
    static COLS: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| device_cols_seen_as("CAST(NULL AS BIGINT)"));
    &COLS
}

/// `DEVICE_COLS` as read from `devices` alone: PostgreSQL keeps the time each device was
/// seen in a table of its own (schema 18), looked up here by device (an index probe per row
/// returned, so that a page keeps the plan of its own order).
fn device_cols(backend: &str) -> &'static str {
    static PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        device_cols_seen_as(
            "(SELECT s.last_seen FROM device_seen s WHERE s.device_id = devices.id)",
        )
    });
    if backend == "postgres" {
        &PG
    } else {
        DEVICE_COLS
    }
}

/// Where a page of devices in order of time seen is read from: on PostgreSQL `devices`
/// joined to `device_seen` by device and product, so that the page walks that table's index
/// (`DEVICE_COLS` then name its `last_seen`).
fn devices_by_seen(backend: &str) -> &'static str {
    if backend == "postgres" {
        "devices JOIN device_seen ON device_seen.device_id = devices.id \
         AND device_seen.seen_product = devices.product_id"
    } else {
        "devices"
    }
}

/// A condition on the time seen (`last_seen`), as a filter of `devices` rows.
fn seen_filter(backend: &str, condition: &str) -> String {
    if backend == "postgres" {
        format!(
            " AND id IN (SELECT device_id FROM device_seen WHERE seen_product = $1 AND {condition})"
        )
    } else {
        format!(" AND {condition}")
    }
}

const ROLLOUT_COLS: &str = "id, product_id, firmware_id, other_firmware, target, stages, rate_per_minute, state, \
     current_stage, stage_started_at, rolled_back_stages, message, created_by, created_at, updated_at";
const MEMBER_COLS: &str =
    "rollout_id, device_id, stage, state, from_version, offered_at, updated_at, message";
const REVISION_COLS: &str = "id, device_id, fqbn, files, author, created_at";
const BUILD_COLS: &str = "id, product_id, device_id, fqbn, files, status, log, diagnostics, \
     firmware_id, worker, requested_by, created_at, started_at, finished_at";
const FIRMWARE_COLS: &str =
    "id, product_id, version, size, md5, sha256, format, metadata, created_at";
const RESOURCE_COLS: &str = "id, group_id, name, fk, size, md5, sha256, created_at";
const USER_COLS: &str = "id, username, password_hash, role, created_at";

/// Maps a unique-constraint violation to `Conflict` with the given message.
fn conflict(err: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what()),
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            StoreError::Conflict(format!("{}: it is still referenced", what()))
        }
        _ => StoreError::Database(err),
    }
}

fn parse_typed<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Invalid(format!("stored json: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

fn parse_json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| StoreError::Invalid(format!("stored json: {e}")))
}

/// A value bound to a numbered placeholder of a query built at run time.
enum Arg {
    Int(i64),
    Text(String),
}

/// A query with these arguments bound to its placeholders in order.
fn bound<'q, DB>(
    sql: &'q str,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut q = sqlx::query::<DB>(sql);
    for a in args {
        q = match a {
            Arg::Int(v) => q.bind(v),
            Arg::Text(t) => q.bind(t),
        };
    }
    q
}

/// `LIKE` pattern text with `%`, `_` and the escape character itself escaped (`ESCAPE '\\'`).
fn like_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The `WHERE` clause (from `product_id = $1` on) and, with `paged`, the cursor condition,
/// `ORDER BY` and `LIMIT` of a device query, with its arguments in placeholder order.
/// `backend`: "sqlite" or "postgres" (SQLite's `LIKE` ignores ASCII case, PostgreSQL's
/// `ILIKE` does, on `device_serials`; serials are ASCII).
fn device_query_sql(
    backend: &str,
    product_id: Id,
    q: &DeviceQuery,
    paged: bool,
) -> Result<(String, Vec<Arg>)> {
    let mut args = vec![Arg::Int(product_id)];
    let mut sql = String::from("product_id = $1");
    let arg = |args: &mut Vec<Arg>, value: Arg| {
        args.push(value);
        format!("${}", args.len())
    };
    if let Some(status) = q.status {
        let n = arg(&mut args, Arg::Text(status.as_str().into()));
        sql.push_str(&format!(" AND status = {n}"));
    }
    if let Some(group) = q.group_id {
        let n = arg(&mut args, Arg::Int(group));
        sql.push_str(&format!(" AND group_id = {n}"));
    }
    if let Some(version) = &q.version {
        let n = arg(&mut args, Arg::Text(version.clone()));
        sql.push_str(&format!(" AND version = {n}"));
    }
    if let Some(before) = q.seen_before {
        let n = arg(&mut args, Arg::Int(before));
        sql.push_str(&seen_filter(
            backend,
            &format!("COALESCE(last_seen, 0) < {n}"),
        ));
    }
    if let Some(after) = q.seen_after {
        let n = arg(&mut args, Arg::Int(after));
        sql.push_str(&seen_filter(backend, &format!("last_seen >= {n}")));
    }
    if let Some(chip) = &q.chip {
        let n = arg(&mut args, Arg::Text(chip.clone()));
        sql.push_str(&format!(" AND chip = {n}"));
    }
    if let Some(prefix) = q.serial_prefix.as_deref().filter(|p| !p.is_empty()) {
        let p = arg(&mut args, Arg::Text(prefix.into()));
        let len = arg(&mut args, Arg::Int(prefix.chars().count() as i64));
        sql.push_str(&format!(
            " AND serial >= {p} AND substr(serial, 1, CAST({len} AS INTEGER)) = {p}"
        ));
    }
    if let Some(search) = q.search.as_deref().filter(|s| !s.is_empty()) {
        let n = arg(&mut args, Arg::Text(format!("%{}%", like_escaped(search))));
        if backend == "postgres" {
            // The trigram-indexed copy of the serials (schema 17).
            sql.push_str(&format!(
                " AND id IN (SELECT device_id FROM device_serials WHERE serial ILIKE {n} ESCAPE '\\')"
            ));
        } else {
            sql.push_str(&format!(" AND serial LIKE {n} ESCAPE '\\'"));
        }
    }
    if !paged {
        return Ok((sql, args));
    }
    let (cmp, dir) = if q.descending {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    let order = match (&q.sort, &q.after) {
        (DeviceSort::Serial, after) => {
            if let Some(DeviceCursor::Serial(serial)) = after {
                let n = arg(&mut args, Arg::Text(serial.clone()));
                sql.push_str(&format!(" AND serial {cmp} {n}"));
            }
            format!("serial {dir}")
        }
        (DeviceSort::LastSeen, after) => {
            if let Some(DeviceCursor::LastSeen(seen, id)) = after {
                let k = arg(&mut args, Arg::Int(*seen));
                let i = arg(&mut args, Arg::Int(*id));
                sql.push_str(&format!(
                    " AND (COALESCE(last_seen, 0) {cmp} {k} OR (COALESCE(last_seen, 0) = {k} AND id {cmp} {i}))"
                ));
            }
            format!("COALESCE(last_seen, 0) {dir}, id {dir}")
        }
        (DeviceSort::Created, after) => {
            if let Some(DeviceCursor::Created(id)) = after {
                let n = arg(&mut args, Arg::Int(*id));
                sql.push_str(&format!(" AND id {cmp} {n}"));
            }
            format!("id {dir}")
        }
    };
    if !q.cursor_fits() {
        return Err(StoreError::Invalid(
            "the cursor comes from a list in another order".into(),
        ));
    }
    let n = arg(&mut args, Arg::Int(q.limit.clamp(1, 10_000)));
    sql.push_str(&format!(" ORDER BY {order} LIMIT {n}"));
    Ok((sql, args))
}

/// The devices a target takes, numbered (`rn`, from 1) in a rollout's fleet order.
fn ranked_devices_sql(
    backend: &str,
    product_id: Id,
    target: &DeviceQuery,
    order: FleetOrder,
) -> Result<(String, Vec<Arg>)> {
    let (filter, mut args) = device_query_sql(backend, product_id, target, false)?;
    args.push(Arg::Int(order.multiplier));
    let m = args.len();
    args.push(Arg::Int(order.offset));
    let o = args.len();
    Ok((
        format!(
            "SELECT id, serial, version, ROW_NUMBER() OVER \
             (ORDER BY (id * ${m} + ${o}) % {ORDER_PRIME}, id) AS rn FROM devices WHERE {filter}"
        ),
        args,
    ))
}

/// The stage of a numbered device (`CASE WHEN rn <= end of stage 1 THEN 0 ...`) and the
/// placeholder of the last planned number.
fn stage_case(sizes: &[u64], args: &mut Vec<Arg>) -> (String, String) {
    let mut case = String::from("CAST(CASE");
    let mut end = 0u64;
    for (i, size) in sizes.iter().enumerate() {
        end += size;
        args.push(Arg::Int(end as i64));
        case.push_str(&format!(" WHEN rn <= ${} THEN {i}", args.len()));
    }
    case.push_str(" ELSE -1 END AS BIGINT)");
    args.push(Arg::Int(end as i64));
    (case, format!("${}", args.len()))
}

macro_rules! sql_store {
    ($store:ident, $db:ty, $row:ty, $backend:literal, $begin:literal) => {
        impl $store {
            /// Replaces one of a product's key lists (`column`: `artifact_keys` or
            /// `firmware_keys`, JSON text).
            async fn set_product_keys(
                &self,
                id: Id,
                column: &'static str,
                keys: &[String],
            ) -> Result<Product> {
                sqlx::query(&format!(
                    "UPDATE products SET {column} = $1 WHERE id = $2 RETURNING {PRODUCT_COLS}"
                ))
                .bind(to_json(&keys))
                .bind(id)
                .fetch_optional(&self.write)
                .await?
                .map(|row| Self::product(&row))
                .transpose()?
                .ok_or(StoreError::NotFound("product"))
            }

            fn product(row: &$row) -> Result<Product> {
                Ok(Product {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    api_key_digest: row.try_get("api_key_digest")?,
                    default_group_id: row.try_get("default_group_id")?,
                    created_at: row.try_get("created_at")?,
                    artifact_keys: serde_json::from_str(&row.try_get::<String, _>("artifact_keys")?)
                        .unwrap_or_default(),
                    firmware_keys: serde_json::from_str(&row.try_get::<String, _>("firmware_keys")?)
                        .unwrap_or_default(),
                })
            }

            fn group(row: &$row) -> Result<Group> {
                let config: String = row.try_get("config")?;
                Ok(Group {
                    id: row.try_get("id")?,
                    product_id: row.try_get("product_id")?,
                    name: row.try_get("name")?,
                    is_default: row.try_get::<i64, _>("is_default")? != 0,
                    firmware_id: row.try_get("firmware_id")?,
                    other_firmware_ids: parse_typed(&row.try_get::<String, _>("other_firmware")?)?,
                    config: parse_json(&config)?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn device(row: &$row) -> Result<Device> {
                let status: String = row.try_get("status")?;
                Ok(Device {
                    id: row.try_get("id")?,
                    product_id: row.try_get("product_id")?,
                    group_id: row.try_get("group_id")?,
                    serial: row.try_get("serial")?,
                    status: DeviceStatus::parse(&status).ok_or_else(|| {
                        StoreError::Invalid(format!("stored device status {status:?}"))
                    })?,
                    password_hash: row.try_get("password_hash")?,
                    created_at: row.try_get("created_at")?,
                    firmware_id: row.try_get("firmware_id")?,
                    secrets: row.try_get("secrets")?,
                    closed_firmware_id: row.try_get("closed_firmware_id")?,
                    public_key: row.try_get("public_key")?,
                    open_firmware_id: row.try_get("open_firmware_id")?,
                    attributes: row
                        .try_get::<Option<String>, _>("attributes")?
                        .and_then(|a| serde_json::from_str(&a).ok()),
                    telemetry: Telemetry {
                        last_seen: row.try_get("last_seen")?,
                        version: row.try_get("version")?,
                        sketch_md5: row.try_get("sketch_md5")?,
                        sta_mac: row.try_get("sta_mac")?,
                        ap_mac: row.try_get("ap_mac")?,
                        free_space: row.try_get("free_space")?,
                        chip_size: row.try_get("chip_size")?,
                        sdk_version: row.try_get("sdk_version")?,
                        chip: row.try_get("chip")?,
                    },
                })
            }

            fn firmware(row: &$row) -> Result<Firmware> {
                let metadata: String = row.try_get("metadata")?;
                Ok(Firmware {
                    id: row.try_get("id")?,
                    product_id: row.try_get("product_id")?,
                    version: row.try_get("version")?,
                    size: row.try_get("size")?,
                    md5: row.try_get("md5")?,
                    sha256: row.try_get("sha256")?,
                    format: row.try_get("format")?,
                    metadata: parse_json(&metadata)?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn resource(row: &$row) -> Result<Resource> {
                Ok(Resource {
                    id: row.try_get("id")?,
                    group_id: row.try_get("group_id")?,
                    name: row.try_get("name")?,
                    fk: row.try_get("fk")?,
                    size: row.try_get("size")?,
                    md5: row.try_get("md5")?,
                    sha256: row.try_get("sha256")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn user(row: &$row) -> Result<User> {
                Ok(User {
                    id: row.try_get("id")?,
                    username: row.try_get("username")?,
                    password_hash: row.try_get("password_hash")?,
                    role: {
                        let role: String = row.try_get("role")?;
                        Role::parse(&role).ok_or_else(|| {
                            StoreError::Invalid(format!("user role {role:?}"))
                        })?
                    },
                    created_at: row.try_get("created_at")?,
                })
            }

            fn revision(row: &$row) -> Result<SketchRevision> {
                let files: String = row.try_get("files")?;
                Ok(SketchRevision {
                    id: row.try_get("id")?,
                    device_id: row.try_get("device_id")?,
                    fqbn: row.try_get("fqbn")?,
                    files: parse_typed(&files)?,
                    author: row.try_get("author")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn rollout(row: &$row) -> Result<Rollout> {
                let target: String = row.try_get("target")?;
                let stages: String = row.try_get("stages")?;
                let rolled: String = row.try_get("rolled_back_stages")?;
                let state: String = row.try_get("state")?;
                Ok(Rollout {
                    id: row.try_get("id")?,
                    product_id: row.try_get("product_id")?,
                    firmware_id: row.try_get("firmware_id")?,
                    other_firmware_ids: parse_typed(&row.try_get::<String, _>("other_firmware")?)?,
                    target: parse_typed(&target)?,
                    stages: parse_typed(&stages)?,
                    rate_per_minute: row.try_get("rate_per_minute")?,
                    state: RolloutState::parse(&state).ok_or_else(|| {
                        StoreError::Invalid(format!("stored rollout state {state:?}"))
                    })?,
                    current_stage: row.try_get("current_stage")?,
                    stage_started_at: row.try_get("stage_started_at")?,
                    rolled_back_stages: parse_typed(&rolled)?,
                    message: row.try_get("message")?,
                    created_by: row.try_get("created_by")?,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                })
            }

            fn member(row: &$row) -> Result<RolloutMember> {
                let state: String = row.try_get("state")?;
                Ok(RolloutMember {
                    rollout_id: row.try_get("rollout_id")?,
                    device_id: row.try_get("device_id")?,
                    stage: row.try_get("stage")?,
                    state: MemberState::parse(&state).ok_or_else(|| {
                        StoreError::Invalid(format!("stored member state {state:?}"))
                    })?,
                    from_version: row.try_get("from_version")?,
                    offered_at: row.try_get("offered_at")?,
                    updated_at: row.try_get("updated_at")?,
                    message: row.try_get("message")?,
                })
            }

            fn build(row: &$row) -> Result<Build> {
                let files: String = row.try_get("files")?;
                let diagnostics: String = row.try_get("diagnostics")?;
                let status: String = row.try_get("status")?;
                Ok(Build {
                    id: row.try_get("id")?,
                    product_id: row.try_get("product_id")?,
                    device_id: row.try_get("device_id")?,
                    fqbn: row.try_get("fqbn")?,
                    files: parse_typed(&files)?,
                    status: BuildStatus::parse(&status).ok_or_else(|| {
                        StoreError::Invalid(format!("stored build status {status:?}"))
                    })?,
                    log: row.try_get("log")?,
                    diagnostics: parse_typed(&diagnostics)?,
                    firmware_id: row.try_get("firmware_id")?,
                    worker: row.try_get("worker")?,
                    requested_by: row.try_get("requested_by")?,
                    created_at: row.try_get("created_at")?,
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                })
            }

            /// The row of a new rollout (running, in its first stage), in `tx`.
            async fn insert_rollout(
                tx: &mut sqlx::Transaction<'static, $db>,
                new: &NewRollout,
                now: Millis,
            ) -> Result<Rollout> {
                let row = sqlx::query(&format!(
                    "INSERT INTO rollouts (product_id, firmware_id, target, stages, rate_per_minute, state, \
                     current_stage, stage_started_at, rolled_back_stages, message, created_by, created_at, \
                     updated_at, other_firmware) \
                     VALUES ($1, $2, $3, $4, $5, 'running', 0, $6, '[]', '', $7, $6, $6, $8) RETURNING {ROLLOUT_COLS}"
                ))
                .bind(new.product_id)
                .bind(new.firmware_id)
                .bind(to_json(&new.target))
                .bind(to_json(&new.stages))
                .bind(new.rate_per_minute)
                .bind(now)
                .bind(&new.created_by)
                .bind(to_json(&new.other_firmware_ids))
                .fetch_one(&mut **tx)
                .await?;
                Self::rollout(&row)
            }

            async fn begin_write(&self) -> Result<sqlx::Transaction<'static, $db>> {
                Ok(self.write.begin_with($begin).await?)
            }
        }

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn create_user(
                &self,
                username: &str,
                password_hash: &str,
                role: Role,
            ) -> Result<User> {
                let row = sqlx::query(&format!(
                    "INSERT INTO users (username, password_hash, is_admin, role, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING {USER_COLS}"
                ))
                .bind(username)
                .bind(password_hash)
                .bind((role == Role::Admin) as i64)
                .bind(role.as_str())
                .bind(now_millis())
                .fetch_one(&self.write)
                .await
                .map_err(|e| conflict(e, || format!("user {username:?} already exists")))?;
                Self::user(&row)
            }

            async fn user_by_name(&self, username: &str) -> Result<Option<User>> {
                let row = sqlx::query(&format!("SELECT {USER_COLS} FROM users WHERE username = $1"))
                    .bind(username)
                    .fetch_optional(&self.read)
                    .await?;
                row.as_ref().map(Self::user).transpose()
            }

            async fn user_by_id(&self, id: Id) -> Result<Option<User>> {
                let row = sqlx::query(&format!("SELECT {USER_COLS} FROM users WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.read)
                    .await?;
                row.as_ref().map(Self::user).transpose()
            }

            async fn list_users(&self) -> Result<Vec<User>> {
                let rows = sqlx::query(&format!("SELECT {USER_COLS} FROM users ORDER BY username"))
                    .fetch_all(&self.read)
                    .await?;
                rows.iter().map(Self::user).collect()
            }

            async fn set_user_role(&self, id: Id, role: Role) -> Result<User> {
                let row = sqlx::query(&format!(
                    "UPDATE users SET role = $1, is_admin = $2 WHERE id = $3 RETURNING {USER_COLS}"
                ))
                .bind(role.as_str())
                .bind((role == Role::Admin) as i64)
                .bind(id)
                .fetch_optional(&self.write)
                .await?
                .ok_or(StoreError::NotFound("user"))?;
                Self::user(&row)
            }

            async fn set_user_password(&self, id: Id, password_hash: &str) -> Result<()> {
                let done = sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
                    .bind(password_hash)
                    .bind(id)
                    .execute(&self.write)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("user"));
                }
                // Its browsers sign in again.
                sqlx::query("DELETE FROM sessions WHERE user_id = $1")
                    .bind(id)
                    .execute(&self.write)
                    .await?;
                Ok(())
            }

            async fn delete_user(&self, id: Id) -> Result<()> {
                let done = sqlx::query("DELETE FROM users WHERE id = $1")
                    .bind(id)
                    .execute(&self.write)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("user"));
                }
                Ok(())
            }

            async fn count_users(&self) -> Result<i64> {
                let row = sqlx::query("SELECT COUNT(*) AS n FROM users")
                    .fetch_one(&self.read)
                    .await?;
                Ok(row.try_get("n")?)
            }

            async fn create_token(&self, digest: &str, user_id: Id, expires_at: Millis) -> Result<()> {
                sqlx::query(
                    "INSERT INTO api_tokens (digest, user_id, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(digest)
                .bind(user_id)
                .bind(now_millis())
                .bind(expires_at)
                .execute(&self.write)
                .await?;
                Ok(())
            }

            async fn user_by_token(&self, digest: &str) -> Result<Option<User>> {
                let row = sqlx::query(
                    "SELECT u.id, u.username, u.password_hash, u.role, u.created_at \
                     FROM api_tokens t JOIN users u ON u.id = t.user_id \
                     WHERE t.digest = $1 AND t.expires_at > $2",
                )
                .bind(digest)
                .bind(now_millis())
                .fetch_optional(&self.read)
                .await?;
                row.as_ref().map(Self::user).transpose()
            }

            async fn list_tokens(&self, user_id: Option<Id>) -> Result<Vec<TokenInfo>> {
                let rows = sqlx::query(
                    "SELECT t.digest, t.user_id, u.username, t.created_at, t.expires_at \
                     FROM api_tokens t JOIN users u ON u.id = t.user_id \
                     WHERE ($1 IS NULL OR t.user_id = $1) ORDER BY t.created_at, t.digest",
                )
                .bind(user_id)
                .fetch_all(&self.read)
                .await?;
                rows.iter()
                    .map(|row| {
                        let digest: String = row.try_get("digest")?;
                        Ok(TokenInfo {
                            id: digest.chars().take(TOKEN_ID_LEN).collect(),
                            user_id: row.try_get("user_id")?,
                            username: row.try_get("username")?,
                            created_at: row.try_get("created_at")?,
                            expires_at: row.try_get("expires_at")?,
                        })
                    })
                    .collect()
            }

            async fn revoke_token(&self, id: &str, user_id: Option<Id>) -> Result<bool> {
                if id.len() != TOKEN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Ok(false);
                }
                // The id is hex only, so the pattern holds no wildcard but the last.
                let done = sqlx::query(
                    "DELETE FROM api_tokens WHERE digest LIKE $1 AND ($2 IS NULL OR user_id = $2)",
                )
                .bind(format!("{}%", id.to_ascii_lowercase()))
                .bind(user_id)
                .execute(&self.write)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn create_product(&self, name: &str, api_key_digest: &str) -> Result<Product> {
                let now = now_millis();
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(&format!(
                    "INSERT INTO products (name, api_key_digest, created_at) VALUES ($1, $2, $3) \
                     RETURNING {PRODUCT_COLS}"
                ))
                .bind(name)
                .bind(api_key_digest)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| conflict(e, || format!("a product named {name:?} already exists")))?;
                let mut product = Self::product(&row)?;
                let group: Id = sqlx::query(
                    "INSERT INTO device_groups (product_id, name, is_default, config, created_at) \
                     VALUES ($1, 'Default', 1, '{}', $2) RETURNING id",
                )
                .bind(product.id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
                .try_get("id")?;
                sqlx::query("UPDATE products SET default_group_id = $1 WHERE id = $2")
                    .bind(group)
                    .bind(product.id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                product.default_group_id = group;
                Ok(product)
            }

            async fn list_products(&self) -> Result<Vec<Product>> {
                let rows = sqlx::query(&format!("SELECT {PRODUCT_COLS} FROM products ORDER BY id"))
                    .fetch_all(&self.read)
                    .await?;
                rows.iter().map(Self::product).collect()
            }

            async fn get_product(&self, id: Id) -> Result<Product> {
                let row = sqlx::query(&format!("SELECT {PRODUCT_COLS} FROM products WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.read)
                    .await?
                    .ok_or(StoreError::NotFound("product"))?;
                Self::product(&row)
            }

            async fn product_by_key_digest(&self, digest: &str) -> Result<Option<Product>> {
                let row = sqlx::query(&format!(
                    "SELECT {PRODUCT_COLS} FROM products WHERE api_key_digest = $1"
                ))
                .bind(digest)
                .fetch_optional(&self.read)
                .await?;
                row.as_ref().map(Self::product).transpose()
            }

            async fn rename_product(&self, id: Id, name: &str) -> Result<Product> {
                let row = sqlx::query(&format!(
                    "UPDATE products SET name = $1 WHERE id = $2 RETURNING {PRODUCT_COLS}"
                ))
                .bind(name)
                .bind(id)
                .fetch_optional(&self.write)
                .await
                .map_err(|e| conflict(e, || format!("a product named {name:?} already exists")))?
                .ok_or(StoreError::NotFound("product"))?;
                Self::product(&row)
            }

            async fn set_product_key(&self, id: Id, api_key_digest: &str) -> Result<Product> {
                let row = sqlx::query(&format!(
                    "UPDATE products SET api_key_digest = $1 WHERE id = $2 RETURNING {PRODUCT_COLS}"
                ))
                .bind(api_key_digest)
                .bind(id)
                .fetch_optional(&self.write)
                .await?
                .ok_or(StoreError::NotFound("product"))?;
                Self::product(&row)
            }

            async fn delete_product(&self, id: Id) -> Result<()> {
                let mut tx = self.begin_write().await?;
                // Children first: the schema's cascades cannot order groups, devices and the
                // firmware that groups refer to.
                sqlx::query("DELETE FROM devices WHERE product_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "DELETE FROM resources WHERE group_id IN \
                     (SELECT id FROM device_groups WHERE product_id = $1)",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM device_groups WHERE product_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                // Rollouts (and their members) belong to the product and refer to its firmware.
                sqlx::query("DELETE FROM rollouts WHERE product_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM firmware WHERE product_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let done = sqlx::query("DELETE FROM products WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("product"));
                }
                tx.commit().await?;
                Ok(())
            }

            async fn create_group(&self, product_id: Id, name: &str) -> Result<Group> {
                let row = sqlx::query(&format!(
                    "INSERT INTO device_groups (product_id, name, is_default, config, created_at) \
                     SELECT id, $2, 0, '{{}}', $3 FROM products WHERE id = $1 RETURNING {GROUP_COLS}"
                ))
                .bind(product_id)
                .bind(name)
                .bind(now_millis())
                .fetch_optional(&self.write)
                .await
                .map_err(|e| conflict(e, || format!("a group named {name:?} already exists")))?
                .ok_or(StoreError::NotFound("product"))?;
                Self::group(&row)
            }

            async fn list_groups(&self, product_id: Id) -> Result<Vec<Group>> {
                let rows = sqlx::query(&format!(
                    "SELECT {GROUP_COLS} FROM device_groups WHERE product_id = $1 ORDER BY id"
                ))
                .bind(product_id)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::group).collect()
            }

            async fn get_group(&self, product_id: Id, id: Id) -> Result<Group> {
                let row = sqlx::query(&format!(
                    "SELECT {GROUP_COLS} FROM device_groups WHERE product_id = $1 AND id = $2"
                ))
                .bind(product_id)
                .bind(id)
                .fetch_optional(&self.read)
                .await?
                .ok_or(StoreError::NotFound("group"))?;
                Self::group(&row)
            }

            async fn update_group(&self, product_id: Id, id: Id, patch: GroupPatch) -> Result<Group> {
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(&format!(
                    "SELECT {GROUP_COLS} FROM device_groups WHERE product_id = $1 AND id = $2"
                ))
                .bind(product_id)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("group"))?;
                let mut group = Self::group(&row)?;
                let named = patch
                    .firmware_id
                    .flatten()
                    .into_iter()
                    .chain(patch.other_firmware_ids.iter().flatten().copied());
                for firmware_id in named {
                    let found = sqlx::query("SELECT id FROM firmware WHERE product_id = $1 AND id = $2")
                        .bind(product_id)
                        .bind(firmware_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if found.is_none() {
                        return Err(StoreError::NotFound("firmware"));
                    }
                }
                if let Some(name) = patch.name {
                    group.name = name;
                }
                if let Some(firmware_id) = patch.firmware_id {
                    group.firmware_id = firmware_id;
                }
                if let Some(others) = patch.other_firmware_ids {
                    group.other_firmware_ids = others;
                }
                if let Some(config) = patch.config {
                    group.config = config;
                }
                let name = group.name.clone();
                sqlx::query(
                    "UPDATE device_groups SET name = $1, firmware_id = $2, other_firmware = $3, \
                     config = $4 WHERE id = $5",
                )
                .bind(&group.name)
                .bind(group.firmware_id)
                .bind(to_json(&group.other_firmware_ids))
                .bind(group.config.to_string())
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict(e, || format!("a group named {name:?} already exists")))?;
                tx.commit().await?;
                Ok(group)
            }

            async fn delete_group(&self, product_id: Id, id: Id) -> Result<()> {
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(
                    "SELECT g.is_default, p.default_group_id FROM device_groups g \
                     JOIN products p ON p.id = g.product_id WHERE g.product_id = $1 AND g.id = $2",
                )
                .bind(product_id)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("group"))?;
                if row.try_get::<i64, _>("is_default")? != 0 {
                    return Err(StoreError::Conflict("the Default group cannot be deleted".into()));
                }
                let default_group: Id = row.try_get("default_group_id")?;
                sqlx::query("UPDATE devices SET group_id = $1 WHERE group_id = $2")
                    .bind(default_group)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM resources WHERE group_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM device_groups WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn create_device(&self, new: NewDevice) -> Result<Device> {
                let serial = new.serial.clone();
                let row = sqlx::query(&format!(
                    "INSERT INTO devices (product_id, group_id, serial, status, password_hash, created_at) \
                     SELECT p.id, COALESCE(g.id, p.default_group_id), $3, $4, $5, $6 \
                     FROM products p LEFT JOIN device_groups g ON g.product_id = p.id AND g.id = $2 \
                     WHERE p.id = $1 AND ($2 IS NULL OR g.id IS NOT NULL) RETURNING {}", new_device_cols()
                ))
                .bind(new.product_id)
                .bind(new.group_id)
                .bind(&new.serial)
                .bind(new.status.as_str())
                .bind(&new.password_hash)
                .bind(now_millis())
                .fetch_optional(&self.write)
                .await
                .map_err(|e| conflict(e, || format!("a device with serial {serial:?} already exists")))?;
                match row {
                    Some(row) => Self::device(&row),
                    None => {
                        self.get_product(new.product_id).await?;
                        Err(StoreError::NotFound("group"))
                    }
                }
            }

            async fn list_devices(&self, product_id: Id) -> Result<Vec<Device>> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM devices WHERE product_id = $1 ORDER BY id", device_cols($backend)
                ))
                .bind(product_id)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::device).collect()
            }

            async fn device_page(&self, product_id: Id, query: &DeviceQuery) -> Result<Vec<Device>> {
                let (filter, args) = device_query_sql($backend, product_id, query, true)?;
                let sql = if query.sort == DeviceSort::LastSeen {
                    format!("SELECT {DEVICE_COLS} FROM {} WHERE {filter}", devices_by_seen($backend))
                } else {
                    format!("SELECT {} FROM devices WHERE {filter}", device_cols($backend))
                };
                let q = bound(&sql, args);
                let rows = q.fetch_all(&self.read).await?;
                rows.iter().map(Self::device).collect()
            }

            async fn count_devices(&self, product_id: Id, query: &DeviceQuery) -> Result<i64> {
                let (filter, args) = device_query_sql($backend, product_id, query, false)?;
                let sql = format!("SELECT COUNT(*) AS n FROM devices WHERE {filter}");
                let q = bound(&sql, args);
                Ok(q.fetch_one(&self.read).await?.try_get("n")?)
            }

            async fn import_devices(
                &self,
                product_id: Id,
                rows: &[ImportedDevice],
            ) -> Result<ImportOutcome> {
                /// Rows per statement: 6 placeholders each, far under both backends' limits.
                const BATCH: usize = 500;
                let mut tx = self.begin_write().await?;
                let count = async |tx: &mut sqlx::Transaction<'_, $db>| -> Result<i64> {
                    Ok(sqlx::query("SELECT COUNT(*) AS n FROM devices WHERE product_id = $1")
                        .bind(product_id)
                        .fetch_one(&mut **tx)
                        .await?
                        .try_get("n")?)
                };
                let before = count(&mut tx).await?;
                let groups: Vec<Id> = sqlx::query("SELECT id FROM device_groups WHERE product_id = $1")
                    .bind(product_id)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|r| r.try_get("id"))
                    .collect::<std::result::Result<_, _>>()?;
                if let Some(row) = rows.iter().find(|r| !groups.contains(&r.group_id)) {
                    return Err(StoreError::Invalid(format!(
                        "device {:?}: group {} is not this product's",
                        row.serial, row.group_id
                    )));
                }
                let now = now_millis();
                for chunk in rows.chunks(BATCH) {
                    let mut sql = String::from(
                        "INSERT INTO devices (product_id, group_id, serial, status, password_hash, public_key, created_at) VALUES ",
                    );
                    for i in 0..chunk.len() {
                        let b = i * 6;
                        if i > 0 {
                            sql.push_str(", ");
                        }
                        sql.push_str(&format!(
                            "($1, ${}, ${}, ${}, ${}, ${}, ${})",
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5,
                            b + 6,
                            b + 7
                        ));
                    }
                    sql.push_str(
                        " ON CONFLICT (product_id, serial) DO UPDATE SET group_id = excluded.group_id, \
                         status = excluded.status, \
                         password_hash = COALESCE(excluded.password_hash, devices.password_hash), \
                         public_key = COALESCE(excluded.public_key, devices.public_key)",
                    );
                    let mut q = sqlx::query(&sql).bind(product_id);
                    for row in chunk {
                        q = q
                            .bind(row.group_id)
                            .bind(&row.serial)
                            .bind(row.status.as_str())
                            .bind(&row.password_hash)
                            .bind(&row.public_key)
                            .bind(now);
                    }
                    q.execute(&mut *tx).await.map_err(|e| {
                        conflict(e, || "two rows of the import name one serial".to_string())
                    })?;
                }
                let after = count(&mut tx).await?;
                tx.commit().await?;
                // After a large import the planner's statistics are stale (PostgreSQL would
                // scan instead of using the serial index until autovacuum runs).
                if rows.len() >= 10_000 {
                    sqlx::query("ANALYZE devices").execute(&self.write).await?;
                }
                let created = (after - before).max(0) as u64;
                Ok(ImportOutcome {
                    rows: rows.len() as u64,
                    created,
                    updated: rows.len() as u64 - created.min(rows.len() as u64),
                })
            }

            async fn bulk_devices(
                &self,
                product_id: Id,
                filter: &DeviceQuery,
                change: BulkChange,
            ) -> Result<u64> {
                let (filter, mut args) = device_query_sql($backend, product_id, filter, false)?;
                let sql = match change {
                    BulkChange::Delete => format!("DELETE FROM devices WHERE {filter}"),
                    BulkChange::Status(status) => {
                        args.push(Arg::Text(status.as_str().into()));
                        format!("UPDATE devices SET status = ${} WHERE {filter}", args.len())
                    }
                    BulkChange::Group(group) => {
                        let found = sqlx::query(
                            "SELECT id FROM device_groups WHERE product_id = $1 AND id = $2",
                        )
                        .bind(product_id)
                        .bind(group)
                        .fetch_optional(&self.write)
                        .await?;
                        if found.is_none() {
                            return Err(StoreError::NotFound("group"));
                        }
                        args.push(Arg::Int(group));
                        format!("UPDATE devices SET group_id = ${} WHERE {filter}", args.len())
                    }
                };
                let q = bound(&sql, args);
                Ok(q.execute(&self.write).await?.rows_affected())
            }

            async fn bump_cache_generation(&self, scope: CacheScope) -> Result<i64> {
                let row = sqlx::query("UPDATE cache_generation SET n = n + 1 WHERE id = $1 RETURNING n")
                    .bind(scope.row())
                    .fetch_one(&self.write)
                    .await?;
                Ok(row.try_get("n")?)
            }

            async fn cache_generation(&self, scope: CacheScope) -> Result<i64> {
                let row = sqlx::query("SELECT n FROM cache_generation WHERE id = $1")
                    .bind(scope.row())
                    .fetch_one(&self.write)
                    .await?;
                Ok(row.try_get("n")?)
            }

            async fn add_device_changes(&self, devices: &[(Id, String)]) -> Result<()> {
                let now = now_millis();
                let mut tx = self.begin_write().await?;
                for (product_id, serial) in devices {
                    sqlx::query("INSERT INTO device_changes (product_id, serial, at) VALUES ($1, $2, $3)")
                        .bind(product_id)
                        .bind(serial)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                // Older than a minute: every process has read them.
                sqlx::query("DELETE FROM device_changes WHERE at < $1")
                    .bind(now - 60_000)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn device_changes_since(&self, seq: i64) -> Result<Vec<(i64, Id, String)>> {
                let rows = sqlx::query(
                    "SELECT seq, product_id, serial FROM device_changes WHERE seq > $1 ORDER BY seq LIMIT 10000",
                )
                .bind(seq)
                .fetch_all(&self.write)
                .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("seq")?, r.try_get("product_id")?, r.try_get("serial")?)))
                    .collect()
            }

            async fn last_device_change(&self) -> Result<i64> {
                let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS n FROM device_changes")
                    .fetch_one(&self.write)
                    .await?;
                Ok(row.try_get("n")?)
            }

            async fn device_tally(&self, product_id: Id) -> Result<Vec<DeviceTally>> {
                // SQLite's planner, given the statistics of a product that holds every row,
                // picks another of the product's indexes and reads each row from the table
                // (3.6x slower at a million devices); the covering index is named.
                let devices = if $backend == "sqlite" {
                    "devices INDEXED BY devices_tally"
                } else {
                    "devices"
                };
                let rows = sqlx::query(&format!(
                    "SELECT group_id, status, version, COUNT(*) AS n FROM {devices} \
                     WHERE product_id = $1 GROUP BY group_id, status, version",
                ))
                .bind(product_id)
                .fetch_all(&self.read)
                .await?;
                rows.iter()
                    .map(|row| {
                        let status: String = row.try_get("status")?;
                        Ok(DeviceTally {
                            group_id: row.try_get("group_id")?,
                            status: DeviceStatus::parse(&status).ok_or_else(|| {
                                StoreError::Invalid(format!("stored device status {status:?}"))
                            })?,
                            version: row.try_get("version")?,
                            count: row.try_get("n")?,
                        })
                    })
                    .collect()
            }

            async fn find_device(&self, product_id: Id, serial: &str) -> Result<Option<Device>> {
                let row = sqlx::query(&format!(
                    "SELECT {} FROM devices WHERE product_id = $1 AND serial = $2", device_cols($backend)
                ))
                .bind(product_id)
                .bind(serial)
                .fetch_optional(&self.read)
                .await?;
                row.as_ref().map(Self::device).transpose()
            }

            async fn get_device(&self, product_id: Id, serial: &str) -> Result<Device> {
                self.find_device(product_id, serial)
                    .await?
                    .ok_or(StoreError::NotFound("device"))
            }

            async fn update_device(
                &self,
                product_id: Id,
                serial: &str,
                patch: DevicePatch,
            ) -> Result<Device> {
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(&format!(
                    "SELECT {} FROM devices WHERE product_id = $1 AND serial = $2", device_cols($backend)
                ))
                .bind(product_id)
                .bind(serial)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("device"))?;
                let mut device = Self::device(&row)?;
                if let Some(group_id) = patch.group_id {
                    let found = sqlx::query("SELECT id FROM device_groups WHERE product_id = $1 AND id = $2")
                        .bind(product_id)
                        .bind(group_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if found.is_none() {
                        return Err(StoreError::NotFound("group"));
                    }
                    device.group_id = group_id;
                }
                if let Some(status) = patch.status {
                    device.status = status;
                }
                if let Some(password_hash) = patch.password_hash {
                    device.password_hash = password_hash;
                }
                sqlx::query("UPDATE devices SET group_id = $1, status = $2, password_hash = $3 WHERE id = $4")
                    .bind(device.group_id)
                    .bind(device.status.as_str())
                    .bind(&device.password_hash)
                    .bind(device.id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(device)
            }

            async fn delete_device(&self, product_id: Id, serial: &str) -> Result<()> {
                let done = sqlx::query("DELETE FROM devices WHERE product_id = $1 AND serial = $2")
                    .bind(product_id)
                    .bind(serial)
                    .execute(&self.write)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("device"));
                }
                Ok(())
            }

            async fn register_device(&self, product_id: Id, serial: &str) -> Result<Device> {
                if let Some(device) = self.find_device(product_id, serial).await? {
                    return Ok(device);
                }
                sqlx::query(
                    "INSERT INTO devices (product_id, group_id, serial, status, created_at) \
                     SELECT id, default_group_id, $2, 'new', $3 FROM products WHERE id = $1 \
                     ON CONFLICT (product_id, serial) DO NOTHING",
                )
                .bind(product_id)
                .bind(serial)
                .bind(now_millis())
                .execute(&self.write)
                .await?;
                let row = sqlx::query(&format!(
                    "SELECT {} FROM devices WHERE product_id = $1 AND serial = $2", device_cols($backend)
                ))
                .bind(product_id)
                .bind(serial)
                .fetch_optional(&self.write)
                .await?
                .ok_or(StoreError::NotFound("product"))?;
                Self::device(&row)
            }

            async fn record_telemetry(&self, batch: &[(Id, Telemetry)]) -> Result<()> {
                if batch.is_empty() {
                    return Ok(());
                }
                self.write_telemetry(batch).await
            }

            async fn create_firmware(&self, new: NewFirmware) -> Result<Firmware> {
                let version = new.version.clone();
                let row = sqlx::query(&format!(
                    "INSERT INTO firmware (product_id, version, size, md5, sha256, format, metadata, created_at) \
                     SELECT id, $2, $3, $4, $5, $6, $7, $8 FROM products WHERE id = $1 \
                     RETURNING {FIRMWARE_COLS}"
                ))
                .bind(new.product_id)
                .bind(&new.version)
                .bind(new.size)
                .bind(&new.md5)
                .bind(&new.sha256)
                .bind(&new.format)
                .bind(new.metadata.to_string())
                .bind(now_millis())
                .fetch_optional(&self.write)
                .await
                .map_err(|e| {
                    conflict(e, || format!("firmware version {version:?} already exists in this product"))
                })?
                .ok_or(StoreError::NotFound("product"))?;
                Self::firmware(&row)
            }

            async fn list_firmware(&self, product_id: Id) -> Result<Vec<Firmware>> {
                let rows = sqlx::query(&format!(
                    "SELECT {FIRMWARE_COLS} FROM firmware WHERE product_id = $1 ORDER BY id"
                ))
                .bind(product_id)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::firmware).collect()
            }

            async fn firmware_page(
                &self,
                product_id: Id,
                filter: &FirmwareFilter,
                before: Option<Id>,
                limit: i64,
            ) -> Result<Vec<Firmware>> {
                let chip = if $backend == "postgres" {
                    "(metadata::jsonb ->> 'chip')"
                } else {
                    "json_extract(metadata, '$.chip')"
                };
                let sql = format!(
                    "SELECT {FIRMWARE_COLS} FROM firmware WHERE product_id = $1 \
                     AND ($2 IS NULL OR id < $2) AND ($3 IS NULL OR version = $3) \
                     AND ($4 IS NULL OR format = $4) AND ($5 IS NULL OR {chip} = $5) \
                     ORDER BY id DESC LIMIT $6"
                );
                let rows = sqlx::query(&sql)
                    .bind(product_id)
                    .bind(before)
                    .bind(filter.version.as_deref())
                    .bind(filter.format.as_deref())
                    .bind(filter.chip.as_deref())
                    .bind(limit)
                    .fetch_all(&self.read)
                    .await?;
                rows.iter().map(Self::firmware).collect()
            }

            async fn get_firmware(&self, product_id: Id, id: Id) -> Result<Firmware> {
                let row = sqlx::query(&format!(
                    "SELECT {FIRMWARE_COLS} FROM firmware WHERE product_id = $1 AND id = $2"
                ))
                .bind(product_id)
                .bind(id)
                .fetch_optional(&self.read)
                .await?
                .ok_or(StoreError::NotFound("firmware"))?;
                Self::firmware(&row)
            }

            async fn delete_firmware(&self, product_id: Id, id: Id) -> Result<()> {
                let mut tx = self.begin_write().await?;
                let users = sqlx::query("SELECT name FROM device_groups WHERE firmware_id = $1")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
                if let Some(row) = users.first() {
                    let name: String = row.try_get("name")?;
                    return Err(StoreError::Conflict(format!(
                        "firmware is assigned to group {name:?}; unassign it first"
                    )));
                }
                let releases = sqlx::query(
                    "SELECT name, other_firmware FROM device_groups \
                     WHERE product_id = $1 AND other_firmware <> '[]' ORDER BY id",
                )
                .bind(product_id)
                .fetch_all(&mut *tx)
                .await?;
                for row in &releases {
                    let others: Vec<Id> = parse_typed(&row.try_get::<String, _>("other_firmware")?)?;
                    if others.contains(&id) {
                        let name: String = row.try_get("name")?;
                        return Err(StoreError::Conflict(format!(
                            "firmware is assigned to group {name:?}; unassign it first"
                        )));
                    }
                }
                let rollouts = sqlx::query(
                    "SELECT id, firmware_id, other_firmware FROM rollouts WHERE product_id = $1 ORDER BY id",
                )
                .bind(product_id)
                .fetch_all(&mut *tx)
                .await?;
                for row in &rollouts {
                    let primary: Id = row.try_get("firmware_id")?;
                    let others: Vec<Id> = parse_typed(&row.try_get::<String, _>("other_firmware")?)?;
                    if primary != id && !others.contains(&id) {
                        continue;
                    }
                    let rollout: Id = row.try_get("id")?;
                    return Err(StoreError::Conflict(format!(
                        "firmware is the target of rollout {rollout}; it stays while the rollout's history does"
                    )));
                }
                let devices = sqlx::query("SELECT serial FROM devices WHERE firmware_id = $1 ORDER BY id")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
                if let Some(row) = devices.first() {
                    let serial: String = row.try_get("serial")?;
                    return Err(StoreError::Conflict(format!(
                        "firmware is assigned to device {serial:?}; assign it another first"
                    )));
                }
                let done = sqlx::query("DELETE FROM firmware WHERE product_id = $1 AND id = $2")
                    .bind(product_id)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("firmware"));
                }
                tx.commit().await?;
                Ok(())
            }

            async fn blob_in_use(&self, sha256: &str) -> Result<bool> {
                let row = sqlx::query(
                    "SELECT (SELECT COUNT(*) FROM firmware WHERE sha256 = $1) + \
                     (SELECT COUNT(*) FROM resources WHERE sha256 = $1) + \
                     (SELECT COUNT(*) FROM build_images WHERE sha256 = $1) AS n",
                )
                .bind(sha256)
                .fetch_one(&self.write)
                .await?;
                Ok(row.try_get::<i64, _>("n")? > 0)
            }

            async fn create_resource(&self, new: NewResource) -> Result<Resource> {
                let mut tx = self.begin_write().await?;
                sqlx::query("DELETE FROM resources WHERE group_id = $1 AND name = $2")
                    .bind(new.group_id)
                    .bind(&new.name)
                    .execute(&mut *tx)
                    .await?;
                let row = sqlx::query(&format!(
                    "INSERT INTO resources (group_id, name, fk, size, md5, sha256, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {RESOURCE_COLS}"
                ))
                .bind(new.group_id)
                .bind(&new.name)
                .bind(&new.fk)
                .bind(new.size)
                .bind(&new.md5)
                .bind(&new.sha256)
                .bind(now_millis())
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| conflict(e, || "resource file key already in use".to_string()))?;
                tx.commit().await?;
                Self::resource(&row)
            }

            async fn list_resources(&self, group_id: Id) -> Result<Vec<Resource>> {
                let rows = sqlx::query(&format!(
                    "SELECT {RESOURCE_COLS} FROM resources WHERE group_id = $1 ORDER BY name"
                ))
                .bind(group_id)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::resource).collect()
            }

            async fn resource_by_fk(&self, product_id: Id, fk: &str) -> Result<Option<Resource>> {
                let row = sqlx::query(
                    "SELECT r.id, r.group_id, r.name, r.fk, r.size, r.md5, r.sha256, r.created_at \
                     FROM resources r JOIN device_groups g ON g.id = r.group_id \
                     WHERE g.product_id = $1 AND r.fk = $2",
                )
                .bind(product_id)
                .bind(fk)
                .fetch_optional(&self.read)
                .await?;
                row.as_ref().map(Self::resource).transpose()
            }

            async fn delete_resource(&self, group_id: Id, id: Id) -> Result<Resource> {
                let row = sqlx::query(&format!(
                    "DELETE FROM resources WHERE group_id = $1 AND id = $2 RETURNING {RESOURCE_COLS}"
                ))
                .bind(group_id)
                .bind(id)
                .fetch_optional(&self.write)
                .await?
                .ok_or(StoreError::NotFound("resource"))?;
                Self::resource(&row)
            }

            async fn create_session(&self, digest: &str, session: &Session) -> Result<()> {
                sqlx::query(
                    "INSERT INTO sessions (digest, user_id, device_id, csrf, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(digest)
                .bind(session.user_id)
                .bind(session.device_id)
                .bind(&session.csrf)
                .bind(now_millis())
                .bind(session.expires_at)
                .execute(&self.write)
                .await?;
                Ok(())
            }

            async fn session(&self, digest: &str) -> Result<Option<Session>> {
                let row = sqlx::query(
                    "SELECT user_id, device_id, csrf, expires_at FROM sessions \
                     WHERE digest = $1 AND expires_at > $2",
                )
                .bind(digest)
                .bind(now_millis())
                .fetch_optional(&self.read)
                .await?;
                match row {
                    Some(row) => Ok(Some(Session {
                        user_id: row.try_get("user_id")?,
                        device_id: row.try_get("device_id")?,
                        csrf: row.try_get("csrf")?,
                        expires_at: row.try_get("expires_at")?,
                    })),
                    None => Ok(None),
                }
            }

            async fn delete_session(&self, digest: &str) -> Result<()> {
                sqlx::query("DELETE FROM sessions WHERE digest = $1 OR expires_at <= $2")
                    .bind(digest)
                    .bind(now_millis())
                    .execute(&self.write)
                    .await?;
                Ok(())
            }

            async fn delete_sessions_of(&self, user_id: Option<Id>, device_id: Option<Id>) -> Result<u64> {
                let done = sqlx::query(
                    "DELETE FROM sessions WHERE ($1 IS NOT NULL AND user_id = $1) \
                     OR ($2 IS NOT NULL AND device_id = $2)",
                )
                .bind(user_id)
                .bind(device_id)
                .execute(&self.write)
                .await?;
                Ok(done.rows_affected())
            }

            async fn device_by_id(&self, id: Id) -> Result<Device> {
                let row = sqlx::query(&format!("SELECT {} FROM devices WHERE id = $1", device_cols($backend)))
                    .bind(id)
                    .fetch_optional(&self.read)
                    .await?
                    .ok_or(StoreError::NotFound("device"))?;
                Self::device(&row)
            }

            async fn devices_by_serial(&self, serial: &str) -> Result<Vec<Device>> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM devices WHERE serial = $1 ORDER BY id", device_cols($backend)
                ))
                .bind(serial)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::device).collect()
            }

            async fn set_device_firmware(&self, device_id: Id, firmware_id: Option<Id>) -> Result<()> {
                let done = sqlx::query(
                    "UPDATE devices SET firmware_id = $1 WHERE id = $2 AND ($1 IS NULL OR EXISTS \
                     (SELECT 1 FROM firmware f WHERE f.id = $1 AND f.product_id = devices.product_id))",
                )
                .bind(firmware_id)
                .bind(device_id)
                .execute(&self.write)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("device or firmware"));
                }
                Ok(())
            }

            async fn set_device_attributes(
                &self,
                device_id: Id,
                attributes: &serde_json::Value,
            ) -> Result<()> {
                let done = sqlx::query("UPDATE devices SET attributes = $1 WHERE id = $2")
                    .bind(attributes.to_string())
                    .bind(device_id)
                    .execute(&self.write)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("device"));
                }
                Ok(())
            }

            async fn set_product_firmware_keys(&self, id: Id, keys: &[String]) -> Result<Product> {
                self.set_product_keys(id, "firmware_keys", keys).await
            }

            async fn set_product_artifact_keys(&self, id: Id, keys: &[String]) -> Result<Product> {
                self.set_product_keys(id, "artifact_keys", keys).await
            }

            async fn set_device_open_firmware(
                &self,
                device_id: Id,
                firmware_id: Option<Id>,
            ) -> Result<()> {
                let done = sqlx::query("UPDATE devices SET open_firmware_id = $1 WHERE id = $2")
                    .bind(firmware_id)
                    .bind(device_id)
                    .execute(&self.write)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("device"));
                }
                Ok(())
            }

            async fn bind_device_key(&self, device_id: Id, public_key: &str) -> Result<bool> {
                let done = sqlx::query(
                    "UPDATE devices SET public_key = $1 WHERE id = $2 AND public_key IS NULL",
                )
                .bind(public_key)
                .bind(device_id)
                .execute(&self.write)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn set_device_closed_firmware(
                &self,
                device_id: Id,
                firmware_id: Option<Id>,
            ) -> Result<()> {
                let done = sqlx::query("UPDATE devices SET closed_firmware_id = $1 WHERE id = $2")
                    .bind(firmware_id)
                    .bind(device_id)
                    .execute(&self.write)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("device"));
                }
                Ok(())
            }

            async fn set_device_secrets(&self, device_id: Id, sealed: Option<&str>) -> Result<()> {
                let done = sqlx::query("UPDATE devices SET secrets = $1 WHERE id = $2")
                    .bind(sealed)
                    .bind(device_id)
                    .execute(&self.write)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound("device"));
                }
                Ok(())
            }

            async fn save_revision(
                &self,
                device_id: Id,
                fqbn: &str,
                files: &std::collections::BTreeMap<String, String>,
                author: &str,
            ) -> Result<SketchRevision> {
                let row = sqlx::query(&format!(
                    "INSERT INTO sketch_revisions (device_id, fqbn, files, author, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING {REVISION_COLS}"
                ))
                .bind(device_id)
                .bind(fqbn)
                .bind(to_json(files))
                .bind(author)
                .bind(now_millis())
                .fetch_one(&self.write)
                .await
                .map_err(|e| conflict(e, || "device".to_string()))?;
                Self::revision(&row)
            }

            async fn list_revisions(&self, device_id: Id, limit: i64) -> Result<Vec<SketchRevision>> {
                let rows = sqlx::query(&format!(
                    "SELECT {REVISION_COLS} FROM sketch_revisions WHERE device_id = $1 \
                     ORDER BY id DESC LIMIT $2"
                ))
                .bind(device_id)
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::revision).collect()
            }

            async fn get_revision(&self, device_id: Id, id: Id) -> Result<SketchRevision> {
                let row = sqlx::query(&format!(
                    "SELECT {REVISION_COLS} FROM sketch_revisions WHERE device_id = $1 AND id = $2"
                ))
                .bind(device_id)
                .bind(id)
                .fetch_optional(&self.read)
                .await?
                .ok_or(StoreError::NotFound("revision"))?;
                Self::revision(&row)
            }

            async fn create_build(&self, new: NewBuild) -> Result<Build> {
                let row = sqlx::query(&format!(
                    "INSERT INTO builds (product_id, device_id, fqbn, files, status, log, diagnostics, \
                     requested_by, created_at) VALUES ($1, $2, $3, $4, 'queued', '', '[]', $5, $6) \
                     RETURNING {BUILD_COLS}"
                ))
                .bind(new.product_id)
                .bind(new.device_id)
                .bind(&new.fqbn)
                .bind(to_json(&new.files))
                .bind(&new.requested_by)
                .bind(now_millis())
                .fetch_one(&self.write)
                .await?;
                Self::build(&row)
            }

            async fn get_build(&self, id: Id) -> Result<Build> {
                let row = sqlx::query(&format!("SELECT {BUILD_COLS} FROM builds WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.write)
                    .await?
                    .ok_or(StoreError::NotFound("build"))?;
                Self::build(&row)
            }

            async fn list_builds(&self, device_id: Id, limit: i64) -> Result<Vec<Build>> {
                let rows = sqlx::query(&format!(
                    "SELECT {BUILD_COLS} FROM builds WHERE device_id = $1 ORDER BY id DESC LIMIT $2"
                ))
                .bind(device_id)
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::build).collect()
            }

            async fn build_page(
                &self,
                device_id: Id,
                status: Option<BuildStatus>,
                before: Option<Id>,
                limit: i64,
            ) -> Result<Vec<Build>> {
                let rows = sqlx::query(&format!(
                    "SELECT {BUILD_COLS} FROM builds WHERE device_id = $1 \
                     AND ($2 IS NULL OR id < $2) AND ($3 IS NULL OR status = $3) \
                     ORDER BY id DESC LIMIT $4"
                ))
                .bind(device_id)
                .bind(before)
                .bind(status.map(BuildStatus::as_str))
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::build).collect()
            }

            async fn claim_build(&self, worker: &str) -> Result<Option<Build>> {
                // The status test in the UPDATE makes the claim atomic: of two workers that
                // picked the same id, one updates no row and tries again later. Fair: the
                // oldest build of the requester with the fewest builds running goes first.
                let row = sqlx::query(&format!(
                    "UPDATE builds SET status = 'running', worker = $1, started_at = $2 \
                     WHERE status = 'queued' AND id = \
                     (SELECT q.id FROM builds q WHERE q.status = 'queued' ORDER BY \
                      (SELECT COUNT(*) FROM builds r WHERE r.status = 'running' \
                       AND r.requested_by = q.requested_by), q.id LIMIT 1) \
                     RETURNING {BUILD_COLS}"
                ))
                .bind(worker)
                .bind(now_millis())
                .fetch_optional(&self.write)
                .await?;
                row.as_ref().map(Self::build).transpose()
            }

            async fn count_pending_builds(&self, device_id: Option<Id>, requested_by: &str) -> Result<i64> {
                let row = sqlx::query(
                    "SELECT COUNT(*) AS n FROM builds WHERE status IN ('queued', 'running') \
                     AND (($1 IS NOT NULL AND device_id = $1) OR requested_by = $2)",
                )
                .bind(device_id)
                .bind(requested_by)
                .fetch_one(&self.read)
                .await?;
                Ok(row.try_get("n")?)
            }

            async fn append_build_log(&self, id: Id, text: &str) -> Result<()> {
                sqlx::query("UPDATE builds SET log = log || $1 WHERE id = $2")
                    .bind(text)
                    .bind(id)
                    .execute(&self.write)
                    .await?;
                Ok(())
            }

            async fn finish_build(
                &self,
                id: Id,
                status: BuildStatus,
                diagnostics: &[Diagnostic],
                firmware_id: Option<Id>,
            ) -> Result<()> {
                sqlx::query(
                    "UPDATE builds SET status = $1, diagnostics = $2, firmware_id = $3, finished_at = $4 \
                     WHERE id = $5",
                )
                .bind(status.as_str())
                .bind(to_json(&diagnostics))
                .bind(firmware_id)
                .bind(now_millis())
                .bind(id)
                .execute(&self.write)
                .await?;
                Ok(())
            }

            async fn add_build_image(&self, build_id: Id, image: &BuildImage) -> Result<()> {
                sqlx::query(
                    "INSERT INTO build_images (build_id, name, sha256, size) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (build_id, name) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size",
                )
                .bind(build_id)
                .bind(&image.name)
                .bind(&image.sha256)
                .bind(image.size)
                .execute(&self.write)
                .await?;
                Ok(())
            }

            async fn list_build_images(&self, build_id: Id) -> Result<Vec<BuildImage>> {
                let rows = sqlx::query(
                    "SELECT name, sha256, size FROM build_images WHERE build_id = $1 ORDER BY name",
                )
                .bind(build_id)
                .fetch_all(&self.write)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(BuildImage {
                            name: r.try_get("name")?,
                            sha256: r.try_get("sha256")?,
                            size: r.try_get("size")?,
                        })
                    })
                    .collect()
            }

            async fn fail_stale_builds(&self, before: Millis) -> Result<u64> {
                let done = sqlx::query(
                    "UPDATE builds SET status = 'failed', finished_at = $1, \
                     log = log || '\nthe worker running this build stopped; queue it again\n' \
                     WHERE status = 'running' AND started_at < $2",
                )
                .bind(now_millis())
                .bind(before)
                .execute(&self.write)
                .await?;
                Ok(done.rows_affected())
            }

            async fn create_rollout(
                &self,
                new: NewRollout,
                members: &[(Id, i64, Option<String>)],
            ) -> Result<Rollout> {
                let now = now_millis();
                let mut tx = self.begin_write().await?;
                let rollout = Self::insert_rollout(&mut tx, &new, now).await?;
                for (device, stage, version) in members {
                    sqlx::query(
                        "INSERT INTO rollout_devices (rollout_id, device_id, stage, state, from_version, updated_at, message) \
                         VALUES ($1, $2, $3, 'pending', $4, $5, '')",
                    )
                    .bind(rollout.id)
                    .bind(device)
                    .bind(stage)
                    .bind(version)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(rollout)
            }

            async fn create_planned_rollout(
                &self,
                new: NewRollout,
                target: &DeviceQuery,
                order: FleetOrder,
                sizes: &[u64],
            ) -> Result<Rollout> {
                let now = now_millis();
                let mut tx = self.begin_write().await?;
                let rollout = Self::insert_rollout(&mut tx, &new, now).await?;
                let (ranked, mut args) = ranked_devices_sql($backend, new.product_id, target, order)?;
                let (stage, planned) = stage_case(sizes, &mut args);
                args.push(Arg::Int(rollout.id));
                let rid = args.len();
                args.push(Arg::Int(now));
                let at = args.len();
                let sql = format!(
                    "INSERT INTO rollout_devices (rollout_id, device_id, stage, state, from_version, updated_at, message) \
                     SELECT ${rid}, id, {stage}, 'pending', version, ${at}, '' FROM ({ranked}) ranked WHERE rn <= {planned} \
                     ORDER BY id"
                );
                let q = bound(&sql, args);
                q.execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(rollout)
            }

            async fn preview_plan(
                &self,
                product_id: Id,
                target: &DeviceQuery,
                order: FleetOrder,
                sizes: &[u64],
                version: &str,
                preview: i64,
            ) -> Result<Vec<PlannedStage>> {
                let (ranked, mut args) = ranked_devices_sql($backend, product_id, target, order)?;
                let (stage, planned) = stage_case(sizes, &mut args);
                args.push(Arg::Text(version.to_string()));
                let v = args.len();
                let counts_sql = format!(
                    "SELECT {stage} AS stage, COUNT(*) AS n, \
                     SUM(CASE WHEN version IS NULL OR version <> ${v} THEN 1 ELSE 0 END) AS updating \
                     FROM ({ranked}) ranked WHERE rn <= {planned} GROUP BY 1"
                );
                let mut out = vec![PlannedStage::default(); sizes.len()];
                let q = bound(&counts_sql, args);
                for row in q.fetch_all(&self.read).await? {
                    let i: i64 = row.try_get("stage")?;
                    if let Some(s) = out.get_mut(i as usize) {
                        s.count = row.try_get("n")?;
                        s.updating = row.try_get::<Option<i64>, _>("updating")?.unwrap_or(0);
                    }
                }
                // The first `preview` of each stage, in one pass.
                let (ranked, mut args) = ranked_devices_sql($backend, product_id, target, order)?;
                let mut windows = Vec::new();
                let mut start = 0u64;
                for (i, size) in sizes.iter().enumerate() {
                    let take = (*size).min(preview.max(0) as u64);
                    if take > 0 {
                        args.push(Arg::Int(start as i64));
                        let from = args.len();
                        args.push(Arg::Int((start + take) as i64));
                        let to = args.len();
                        args.push(Arg::Int(i as i64));
                        let stage = args.len();
                        windows.push((format!("(rn > ${from} AND rn <= ${to})"), stage, from, to));
                    }
                    start += size;
                }
                if windows.is_empty() {
                    return Ok(out);
                }
                let case: String = windows
                    .iter()
                    .map(|(w, stage, _, _)| format!(" WHEN {w} THEN ${stage}"))
                    .collect();
                let any: Vec<&str> = windows.iter().map(|(w, ..)| w.as_str()).collect();
                let sql = format!(
                    "SELECT serial, CASE{case} END AS stage FROM ({ranked}) ranked \
                     WHERE {} ORDER BY rn",
                    any.join(" OR ")
                );
                let q = bound(&sql, args);
                for row in q.fetch_all(&self.read).await? {
                    let i: i64 = row.try_get("stage")?;
                    if let Some(s) = out.get_mut(i as usize) {
                        s.serials.push(row.try_get("serial")?);
                    }
                }
                Ok(out)
            }

            async fn busy_devices(
                &self,
                product_id: Id,
                target: &DeviceQuery,
            ) -> Result<(i64, Option<String>)> {
                let (filter, args) = device_query_sql($backend, product_id, target, false)?;
                let sql = format!(
                    "SELECT COUNT(*) AS n, MIN(serial) AS one FROM devices WHERE {filter} AND id IN \
                     (SELECT m.device_id FROM rollout_devices m JOIN rollouts r ON r.id = m.rollout_id \
                      WHERE r.state <> 'completed' AND r.state <> 'cancelled')"
                );
                let q = bound(&sql, args);
                let row = q.fetch_one(&self.read).await?;
                Ok((row.try_get("n")?, row.try_get("one")?))
            }

            async fn get_rollout(&self, id: Id) -> Result<Rollout> {
                let row = sqlx::query(&format!("SELECT {ROLLOUT_COLS} FROM rollouts WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.write)
                    .await?
                    .ok_or(StoreError::NotFound("rollout"))?;
                Self::rollout(&row)
            }

            async fn list_rollouts(&self, product_id: Id) -> Result<Vec<Rollout>> {
                let rows = sqlx::query(&format!(
                    "SELECT {ROLLOUT_COLS} FROM rollouts WHERE product_id = $1 ORDER BY id DESC"
                ))
                .bind(product_id)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::rollout).collect()
            }

            async fn rollout_page(
                &self,
                product_id: Id,
                state: Option<RolloutState>,
                before: Option<Id>,
                limit: i64,
            ) -> Result<Vec<Rollout>> {
                let rows = sqlx::query(&format!(
                    "SELECT {ROLLOUT_COLS} FROM rollouts WHERE product_id = $1 \
                     AND ($2 IS NULL OR id < $2) AND ($3 IS NULL OR state = $3) \
                     ORDER BY id DESC LIMIT $4"
                ))
                .bind(product_id)
                .bind(before)
                .bind(state.map(RolloutState::as_str))
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::rollout).collect()
            }

            async fn live_rollouts(&self) -> Result<Vec<Rollout>> {
                let rows = sqlx::query(&format!(
                    "SELECT {ROLLOUT_COLS} FROM rollouts WHERE state NOT IN ('completed', 'cancelled') ORDER BY id"
                ))
                .fetch_all(&self.write)
                .await?;
                rows.iter().map(Self::rollout).collect()
            }

            async fn update_rollout(&self, rollout: &Rollout) -> Result<()> {
                sqlx::query(
                    "UPDATE rollouts SET state = $1, current_stage = $2, stage_started_at = $3, \
                     rolled_back_stages = $4, message = $5, updated_at = $6 WHERE id = $7",
                )
                .bind(rollout.state.as_str())
                .bind(rollout.current_stage)
                .bind(rollout.stage_started_at)
                .bind(to_json(&rollout.rolled_back_stages))
                .bind(&rollout.message)
                .bind(now_millis())
                .bind(rollout.id)
                .execute(&self.write)
                .await?;
                Ok(())
            }

            async fn rollout_members(&self, rollout_id: Id) -> Result<Vec<RolloutMember>> {
                let rows = sqlx::query(&format!(
                    "SELECT {MEMBER_COLS} FROM rollout_devices WHERE rollout_id = $1 ORDER BY stage, device_id"
                ))
                .bind(rollout_id)
                .fetch_all(&self.write)
                .await?;
                rows.iter().map(Self::member).collect()
            }

            async fn rollout_members_page(
                &self,
                rollout_id: Id,
                after: Option<(i64, Id)>,
                limit: i64,
            ) -> Result<Vec<RolloutMember>> {
                let (stage, device) = after.unwrap_or((-1, -1));
                let rows = sqlx::query(&format!(
                    "SELECT {MEMBER_COLS} FROM rollout_devices WHERE rollout_id = $1 \
                     AND (stage, device_id) > ($2, $3) \
                     ORDER BY stage, device_id LIMIT $4"
                ))
                .bind(rollout_id)
                .bind(stage)
                .bind(device)
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
                rows.iter().map(Self::member).collect()
            }

            async fn member_counts(&self, rollout_id: Id) -> Result<Vec<(i64, MemberState, i64)>> {
                let rows = sqlx::query(
                    "SELECT stage, state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 \
                     GROUP BY stage, state",
                )
                .bind(rollout_id)
                .fetch_all(&self.write)
                .await?;
                rows.iter()
                    .map(|row| {
                        let state: String = row.try_get("state")?;
                        let state = MemberState::parse(&state).ok_or_else(|| {
                            StoreError::Invalid(format!("stored member state {state:?}"))
                        })?;
                        Ok((row.try_get("stage")?, state, row.try_get("n")?))
                    })
                    .collect()
            }

            async fn move_member(
                &self,
                rollout_id: Id,
                device_id: Id,
                from: &[MemberState],
                to: MemberState,
                message: &str,
            ) -> Result<bool> {
                let list = from
                    .iter()
                    .map(|s| format!("'{}'", s.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ");
                let now = now_millis();
                let done = sqlx::query(&format!(
                    "UPDATE rollout_devices SET state = $1, updated_at = $2, message = $3, \
                     offered_at = CASE WHEN offered_at IS NULL AND $1 <> 'pending' THEN $2 ELSE offered_at END \
                     WHERE rollout_id = $4 AND device_id = $5 AND state IN ({list})"
                ))
                .bind(to.as_str())
                .bind(now)
                .bind(message)
                .bind(rollout_id)
                .bind(device_id)
                .execute(&self.write)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn offers_since(&self, rollout_id: Id, since: Millis) -> Result<i64> {
                let row = sqlx::query(
                    "SELECT COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 AND offered_at >= $2",
                )
                .bind(rollout_id)
                .bind(since)
                .fetch_one(&self.write)
                .await?;
                Ok(row.try_get("n")?)
            }

            async fn rollout_member(&self, rollout_id: Id, device_id: Id) -> Result<Option<RolloutMember>> {
                let row = sqlx::query(&format!(
                    "SELECT {MEMBER_COLS} FROM rollout_devices WHERE rollout_id = $1 AND device_id = $2"
                ))
                .bind(rollout_id)
                .bind(device_id)
                .fetch_optional(&self.write)
                .await?;
                row.as_ref().map(Self::member).transpose()
            }

            async fn hold_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool> {
                let now = now_millis();
                let row = sqlx::query(
                    "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until \
                     WHERE leases.holder = excluded.holder OR leases.until < $4 RETURNING holder",
                )
                .bind(name)
                .bind(holder)
                .bind(now + ttl_ms)
                .bind(now)
                .fetch_optional(&self.write)
                .await?;
                Ok(row.is_some())
            }

            async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
                sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
                    .bind(name)
                    .bind(holder)
                    .execute(&self.write)
                    .await?;
                Ok(())
            }

            async fn take_slot(&self, key: &str, window_ms: i64, cap: i64) -> Result<bool> {
                let now = now_millis();
                let row = sqlx::query(
                    "INSERT INTO count_windows (key, since, count) SELECT $1, $2, 1 WHERE $4 > 0 \
                     ON CONFLICT (key) DO UPDATE SET \
                     count = CASE WHEN count_windows.since <= $2 - $3 THEN 1 ELSE count_windows.count + 1 END, \
                     since = CASE WHEN count_windows.since <= $2 - $3 THEN $2 ELSE count_windows.since END \
                     WHERE (count_windows.since <= $2 - $3 OR count_windows.count < $4) AND $4 > 0 RETURNING count",
                )
                .bind(key)
                .bind(now)
                .bind(window_ms)
                .bind(cap)
                .fetch_optional(&self.write)
                .await?;
                Ok(row.is_some())
            }

            async fn give_back_slot(&self, key: &str, forget: bool) -> Result<()> {
                let sql = if forget {
                    "DELETE FROM count_windows WHERE key = $1"
                } else {
                    "UPDATE count_windows SET count = count - 1 WHERE key = $1 AND count > 0"
                };
                sqlx::query(sql).bind(key).execute(&self.write).await?;
                Ok(())
            }

            async fn prune_slots(&self, before: Millis) -> Result<u64> {
                let done = sqlx::query("DELETE FROM count_windows WHERE since < $1")
                    .bind(before)
                    .execute(&self.write)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn add_device_event(&self, device_id: Id, kind: &str, detail: &str) -> Result<()> {
                sqlx::query("INSERT INTO device_events (device_id, at, kind, detail) VALUES ($1, $2, $3, $4)")
                    .bind(device_id)
                    .bind(now_millis())
                    .bind(kind)
                    .bind(detail)
                    .execute(&self.write)
                    .await?;
                Ok(())
            }

            async fn device_events(
                &self,
                device_id: Id,
                before: Option<Id>,
                limit: i64,
            ) -> Result<Vec<DeviceEvent>> {
                let rows = sqlx::query(
                    "SELECT id, device_id, at, kind, detail FROM device_events WHERE device_id = $1 \
                     AND id < $2 ORDER BY id DESC LIMIT $3",
                )
                .bind(device_id)
                .bind(before.unwrap_or(Id::MAX))
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(DeviceEvent {
                            id: row.try_get("id")?,
                            device_id: row.try_get("device_id")?,
                            at: row.try_get("at")?,
                            kind: row.try_get("kind")?,
                            detail: row.try_get("detail")?,
                        })
                    })
                    .collect()
            }

            async fn audit(&self, actor: &str, action: &str, subject: &str, detail: &str) -> Result<()> {
                sqlx::query("INSERT INTO audit_log (at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5)")
                    .bind(now_millis())
                    .bind(actor)
                    .bind(action)
                    .bind(subject)
                    .bind(detail)
                    .execute(&self.write)
                    .await?;
                Ok(())
            }

            async fn audit_log(&self, before: Option<Id>, limit: i64) -> Result<Vec<AuditEntry>> {
                let rows = sqlx::query(
                    "SELECT id, at, actor, action, subject, detail FROM audit_log WHERE id < $1 \
                     ORDER BY id DESC LIMIT $2",
                )
                .bind(before.unwrap_or(Id::MAX))
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(AuditEntry {
                            id: row.try_get("id")?,
                            at: row.try_get("at")?,
                            actor: row.try_get("actor")?,
                            action: row.try_get("action")?,
                            subject: row.try_get("subject")?,
                            detail: row.try_get("detail")?,
                        })
                    })
                    .collect()
            }
        }
    };
}

/// SQLite in WAL mode: one writer connection (so writers queue in the pool rather than
/// fight over the lock), several readers, `BEGIN IMMEDIATE` for write transactions.
pub struct SqliteStore {
    read: sqlx::SqlitePool,
    write: sqlx::SqlitePool,
}

/// Rows per statement batch of a SQLite report flush (10 parameters a row).
const SQLITE_TELEMETRY_BATCH: usize = 64;

/// A report's fields besides the time seen, each with its place among the ten parameters of
/// one SQLite report (`sqlite_telemetry_update`; the ninth is the device's id).
const REPORTED: [(&str, usize); 8] = [
    ("version", 2),
    ("sketch_md5", 3),
    ("sta_mac", 4),
    ("ap_mac", 5),
    ("free_space", 6),
    ("chip_size", 7),
    ("sdk_version", 8),
    ("chip", 10),
];

/// The `SET` list that folds a report's fields into a device's row (a field the report
/// lacks keeps the row's), and the condition that one of them differs from the row.
/// `value(column, place)` names the report's value; `row` qualifies the row's columns;
/// `differs` is the backend's null-safe inequality.
fn reported_set_and_differs(
    value: impl Fn(&str, usize) -> String,
    row: &str,
    differs: &str,
) -> (String, String) {
    let set = REPORTED
        .iter()
        .map(|&(column, place)| {
            format!(
                "{column} = COALESCE({}, {row}{column})",
                value(column, place)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let changed = REPORTED
        .iter()
        .map(|&(column, place)| {
            let v = value(column, place);
            format!("({v} IS NOT NULL AND {v} {differs} {row}{column})")
        })
        .collect::<Vec<_>>()
        .join(" OR ");
    (set, changed)
}

/// The UPDATEs of one report whose ten parameters start after `$base`. The time it was
/// seen is written on its own; the other fields only when one of them differs from the
/// row. Naming a column in SET makes SQLite rewrite every index holding it, changed or not,
/// and a device's version and chip (three indexes) rarely change from one poll to the next.
fn sqlite_telemetry_update(base: usize) -> String {
    let p = |i: usize| format!("${}", base + i);
    let id = p(9);
    let (set, differs) = reported_set_and_differs(|_, place| p(place), "", "IS NOT");
    let seen = p(1);
    format!(
        "UPDATE devices SET last_seen = {seen} WHERE id = {id} AND {seen} IS NOT NULL; \
         UPDATE devices SET {set} WHERE id = {id} AND ({differs});"
    )
}

impl SqliteStore {
    /// Reports in one transaction. Each row is one indexed UPDATE; `SQLITE_TELEMETRY_BATCH`
    /// of them go to SQLite's thread as one multi-statement query (each numbered parameter
    /// names its own row), because a round trip per row (a wake of that thread and of the
    /// waiting task) cost several times what the UPDATE itself does and took CPU from the
    /// check-ins. The rows left over go one statement each.
    async fn write_telemetry(&self, batch: &[(Id, Telemetry)]) -> Result<()> {
        static BATCHED: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
        let (many, one) = BATCHED.get_or_init(|| {
            let many = (0..SQLITE_TELEMETRY_BATCH)
                .map(|row| sqlite_telemetry_update(row * 10))
                .collect::<String>();
            (many, sqlite_telemetry_update(0))
        });
        let mut tx = self.begin_write().await?;
        let mut chunks = batch.chunks_exact(SQLITE_TELEMETRY_BATCH);
        for chunk in chunks.by_ref() {
            let mut query = sqlx::query(many);
            for (id, t) in chunk {
                query = Self::bind_report(query, *id, t);
            }
            query.execute(&mut *tx).await?;
        }
        for (id, t) in chunks.remainder() {
            Self::bind_report(sqlx::query(one), *id, t)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The ten parameters of one report, in `sqlite_telemetry_update`'s order.
    fn bind_report<'q>(
        query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
        id: Id,
        t: &'q Telemetry,
    ) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
        query
            .bind(t.last_seen)
            .bind(&t.version)
            .bind(&t.sketch_md5)
            .bind(&t.sta_mac)
            .bind(&t.ap_mac)
            .bind(t.free_space)
            .bind(t.chip_size)
            .bind(&t.sdk_version)
            .bind(id)
            .bind(&t.chip)
    }

    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &std::path::Path) -> Result<Self> {
        use sqlx::sqlite::{
            SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        // The one writer gets a larger page cache (32 MiB): imports and rollouts of a
        // million rows rebuild index pages it would otherwise read again and again.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("cache_size", "-32768"))
            .await?;
        {
            // sqlx's migrator takes no lock on SQLite: two processes opening one file at
            // once (`serve` and `worker`) take turns through an advisory lock on the file.
            let file = std::fs::File::open(path)
                .map_err(|e| StoreError::Invalid(format!("opening {}: {e}", path.display())))?;
            file.lock()
                .map_err(|e| StoreError::Invalid(format!("locking {}: {e}", path.display())))?;
            migrate(&write, SQLITE_MIGRATIONS).await?;
        }
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore { read, write })
    }
}

/// PostgreSQL: one pool for reads and writes.
pub struct PgStore {
    read: sqlx::PgPool,
    write: sqlx::PgPool,
}

impl PgStore {
    /// Reports in one transaction of two `UPDATE ... FROM UNNEST(...)` per 5,000 rows (a
    /// round trip per row would cap a PostgreSQL on the network at a few thousand rows a
    /// second, fewer than a million devices report): the times seen into `device_seen`, then
    /// the other fields into the devices' rows where one of them differs from the row (most
    /// polls change nothing else, and an unchanged row is not written again).
    async fn write_telemetry(&self, batch: &[(Id, Telemetry)]) -> Result<()> {
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let others = SQL.get_or_init(|| {
            let (set, differs) = reported_set_and_differs(
                |column, _| format!("t.{column}"),
                "devices.",
                "IS DISTINCT FROM",
            );
            format!(
                "UPDATE devices SET {set} FROM UNNEST($1::bigint[], $2::text[], $3::text[], \
                 $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::text[], $9::text[]) \
                 AS t(id, version, sketch_md5, sta_mac, ap_mac, free_space, chip_size, \
                 sdk_version, chip) WHERE devices.id = t.id AND ({differs})"
            )
        });
        let mut tx = self.begin_write().await?;
        for chunk in batch.chunks(5_000) {
            let ids: Vec<i64> = chunk.iter().map(|(id, _)| *id).collect();
            let column = |f: fn(&Telemetry) -> Option<String>| -> Vec<Option<String>> {
                chunk.iter().map(|(_, t)| f(t)).collect()
            };
            let number = |f: fn(&Telemetry) -> Option<i64>| -> Vec<Option<i64>> {
                chunk.iter().map(|(_, t)| f(t)).collect()
            };
            sqlx::query(
                "UPDATE device_seen SET last_seen = t.last_seen \
                 FROM UNNEST($1::bigint[], $2::bigint[]) AS t(id, last_seen) \
                 WHERE device_seen.device_id = t.id AND t.last_seen IS NOT NULL",
            )
            .bind(&ids)
            .bind(number(|t| t.last_seen))
            .execute(&mut *tx)
            .await?;
            sqlx::query(others)
                .bind(ids)
                .bind(column(|t| t.version.clone()))
                .bind(column(|t| t.sketch_md5.clone()))
                .bind(column(|t| t.sta_mac.clone()))
                .bind(column(|t| t.ap_mac.clone()))
                .bind(number(|t| t.free_space))
                .bind(number(|t| t.chip_size))
                .bind(column(|t| t.sdk_version.clone()))
                .bind(column(|t| t.chip.clone()))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Connects and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Self> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        migrate(&pool, POSTGRES_MIGRATIONS).await?;
        Ok(PgStore {
            read: pool.clone(),
            write: pool,
        })
    }
}

sql_store!(
    SqliteStore,
    sqlx::Sqlite,
    sqlx::sqlite::SqliteRow,
    "sqlite",
    "BEGIN IMMEDIATE"
);
sql_store!(
    PgStore,
    sqlx::Postgres,
    sqlx::postgres::PgRow,
    "postgres",
    "BEGIN"
);

/// Each backend's migrations, in order: version N is the N-th entry.
const SQLITE_MIGRATIONS: &[(&str, &str)] = &[
    (
        "users products groups devices firmware resources",
        include_str!("../migrations/sqlite.sql"),
    ),
    (
        "sessions sketches builds",
        include_str!("../migrations/sqlite_2.sql"),
    ),
    (
        "rollouts events audit",
        include_str!("../migrations/sqlite_3.sql"),
    ),
    ("token expiry", include_str!("../migrations/sqlite_4.sql")),
    ("build images", include_str!("../migrations/sqlite_5.sql")),
    (
        "device attributes",
        include_str!("../migrations/sqlite_6.sql"),
    ),
    ("closed offers", include_str!("../migrations/sqlite_7.sql")),
    ("device keys", include_str!("../migrations/sqlite_8.sql")),
    ("open actions", include_str!("../migrations/sqlite_9.sql")),
    ("artifact keys", include_str!("../migrations/sqlite_10.sql")),
    ("releases", include_str!("../migrations/sqlite_11.sql")),
    ("list indexes", include_str!("../migrations/sqlite_12.sql")),
    (
        "cache coherence",
        include_str!("../migrations/sqlite_13.sql"),
    ),
    ("several nodes", include_str!("../migrations/sqlite_14.sql")),
    ("device chips", include_str!("../migrations/sqlite_15.sql")),
    (
        "device generation",
        include_str!("../migrations/sqlite_16.sql"),
    ),
    (
        "operator roles",
        include_str!("../migrations/sqlite_17.sql"),
    ),
    ("firmware keys", include_str!("../migrations/sqlite_18.sql")),
];
const POSTGRES_MIGRATIONS: &[(&str, &str)] = &[
    (
        "users products groups devices firmware resources",
        include_str!("../migrations/postgres.sql"),
    ),
    (
        "sessions sketches builds",
        include_str!("../migrations/postgres_2.sql"),
    ),
    (
        "rollouts events audit",
        include_str!("../migrations/postgres_3.sql"),
    ),
    ("token expiry", include_str!("../migrations/postgres_4.sql")),
    ("build images", include_str!("../migrations/postgres_5.sql")),
    (
        "device attributes",
        include_str!("../migrations/postgres_6.sql"),
    ),
    (
        "closed offers",
        include_str!("../migrations/postgres_7.sql"),
    ),
    ("device keys", include_str!("../migrations/postgres_8.sql")),
    ("open actions", include_str!("../migrations/postgres_9.sql")),
    (
        "artifact keys",
        include_str!("../migrations/postgres_10.sql"),
    ),
    ("releases", include_str!("../migrations/postgres_11.sql")),
    (
        "list indexes",
        include_str!("../migrations/postgres_12.sql"),
    ),
    (
        "cache coherence",
        include_str!("../migrations/postgres_13.sql"),
    ),
    (
        "several nodes",
        include_str!("../migrations/postgres_14.sql"),
    ),
    (
        "device chips",
        include_str!("../migrations/postgres_15.sql"),
    ),
    (
        "device generation",
        include_str!("../migrations/postgres_16.sql"),
    ),
    (
        "serial search index",
        include_str!("../migrations/postgres_17.sql"),
    ),
    (
        "time seen apart",
        include_str!("../migrations/postgres_18.sql"),
    ),
    (
        "operator roles",
        include_str!("../migrations/postgres_19.sql"),
    ),
    (
        "firmware keys",
        include_str!("../migrations/postgres_20.sql"),
    ),
];

/// sqlx's migrator over one backend's embedded migrations (no macros: the SQL is
/// `include_str!`-ed above, so nothing is read from disk at run time).
fn migrator(sources: &'static [(&'static str, &'static str)]) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    use std::borrow::Cow;
    let migrations: Vec<Migration> = sources
        .iter()
        .enumerate()
        .map(|(i, (description, sql))| {
            Migration::new(
                i as i64 + 1,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                Cow::Borrowed(*sql),
                false,
            )
        })
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

/// Brings the schema up to date with sqlx's migrator (one transaction per version, recorded
/// in `_sqlx_migrations` with its checksum); a database with a version this build does not
/// know is refused. A database made before the migrator (versions in `schema_version`) is
/// adopted first: its applied versions are recorded as applied.
async fn migrate<DB>(
    pool: &sqlx::Pool<DB>,
    sources: &'static [(&'static str, &'static str)],
) -> Result<()>
where
    DB: sqlx::Database,
    DB::Connection: sqlx::migrate::Migrate,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Vec<u8>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'r> sqlx::Decode<'r, DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    use sqlx::Executor;
    use sqlx::migrate::Migrate;
    let migrator = migrator(sources);
    let legacy: Option<Option<i64>> = match pool
        .fetch_optional("SELECT MAX(version) FROM schema_version")
        .await
    {
        Ok(Some(row)) => Some(row.try_get::<Option<i64>, _>(0usize)?),
        Ok(None) => Some(None),
        // No such table: a new database, or one the migrator made.
        Err(_) => None,
    };
    if let Some(done) = legacy {
        let done = done.unwrap_or(0);
        if done > sources.len() as i64 {
            return Err(StoreError::Invalid(format!(
                "the database schema is version {done}, newer than this build's {}",
                sources.len()
            )));
        }
        let mut conn = pool.acquire().await?;
        conn.lock().await.map_err(migrate_error)?;
        conn.ensure_migrations_table()
            .await
            .map_err(migrate_error)?;
        let applied = conn
            .list_applied_migrations()
            .await
            .map_err(migrate_error)?;
        for m in migrator.iter().filter(|m| m.version <= done) {
            if applied.iter().any(|a| a.version == m.version) {
                continue;
            }
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES ($1, $2, $3, $4, 0)",
            )
            .bind(m.version)
            .bind(m.description.to_string())
            .bind(true)
            .bind(m.checksum.to_vec())
            .execute(&mut *conn)
            .await?;
        }
        (&mut *conn).execute("DROP TABLE schema_version").await?;
        conn.unlock().await.map_err(migrate_error)?;
    }
    migrator.run(pool).await.map_err(migrate_error)?;
    Ok(())
}

fn migrate_error(e: sqlx::migrate::MigrateError) -> StoreError {
    StoreError::Invalid(format!("bringing the database schema up to date: {e}"))
}

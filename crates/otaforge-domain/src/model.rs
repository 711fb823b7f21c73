//! The fleet's data model: plain records shared by every storage backend.

use serde::{Deserialize, Serialize};

/// Row id. Opaque to API clients; a 64-bit integer in every backend.
pub type Id = i64;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Now, in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Product {
    pub id: Id,
    pub name: String,
    /// SHA-256 (hex) of the product's API key; the key itself is shown once.
    #[serde(skip)]
    pub api_key_digest: String,
    pub default_group_id: Id,
    pub created_at: Millis,
    /// Public keys (PEM) its Linux artifacts must be signed with; empty: not required.
    pub artifact_keys: Vec<String>,
    /// Key digests (hex SHA-256 of the public key, as eFuse and espsecure name them) its
    /// firmware must be signed with (ESP-IDF Secure Boot V2); empty: not required.
    pub firmware_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Group {
    pub id: Id,
    pub product_id: Id,
    pub name: String,
    pub is_default: bool,
    pub firmware_id: Option<Id>,
    /// The firmware for devices of other families than `firmware_id`'s (at most one image
    /// per family): a group of ESP32 boards and Linux devices runs one release.
    pub other_firmware_ids: Vec<Id>,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    New,
    Verified,
    Blocked,
    Disabled,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::New => "new",
            DeviceStatus::Verified => "verified",
            DeviceStatus::Blocked => "blocked",
            DeviceStatus::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "new" => Some(DeviceStatus::New),
            "verified" => Some(DeviceStatus::Verified),
            "blocked" => Some(DeviceStatus::Blocked),
            "disabled" => Some(DeviceStatus::Disabled),
            _ => None,
        }
    }
}

/// What a device last told the server about itself. Every field is optional:
/// a check-in only overwrites what it carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Telemetry {
    pub last_seen: Option<Millis>,
    pub version: Option<String>,
    pub sketch_md5: Option<String>,
    pub sta_mac: Option<String>,
    pub ap_mac: Option<String>,
    pub free_space: Option<i64>,
    pub chip_size: Option<i64>,
    pub sdk_version: Option<String>,
    /// The chip family the device's check-ins announce (`esp32`, `esp8266`, `w800`, ...).
    pub chip: Option<String>,
}

impl Telemetry {
    /// Fold a newer report into this one: newer fields win, absent ones keep the older value.
    pub fn merge(&mut self, newer: Telemetry) {
        fn take<T>(old: &mut Option<T>, new: Option<T>) {
            if new.is_some() {
                *old = new;
            }
        }
        take(&mut self.last_seen, newer.last_seen);
        take(&mut self.version, newer.version);
        take(&mut self.sketch_md5, newer.sketch_md5);
        take(&mut self.sta_mac, newer.sta_mac);
        take(&mut self.ap_mac, newer.ap_mac);
        take(&mut self.free_space, newer.free_space);
        take(&mut self.chip_size, newer.chip_size);
        take(&mut self.sdk_version, newer.sdk_version);
        take(&mut self.chip, newer.chip);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Device {
    pub id: Id,
    pub product_id: Id,
    pub group_id: Id,
    pub serial: String,
    pub status: DeviceStatus,
    /// Argon2id PHC string of the device's static-link password.
    #[serde(skip)]
    pub password_hash: Option<String>,
    pub created_at: Millis,
    /// Firmware assigned to this device alone (a workspace build); it wins over the group's.
    pub firmware_id: Option<Id>,
    /// Sealed (encrypted) device secrets: Wi-Fi credentials for its setup firmware.
    #[serde(skip)]
    pub secrets: Option<String>,
    /// What a Linux device reports about itself (hawkBit configData, Mender inventory).
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<serde_json::Value>,
    /// The firmware whose offer the device closed without installing it (a hawkBit action
    /// closed with failure, cancelled or rejected): it is not offered to the device again.
    pub closed_firmware_id: Option<Id>,
    /// The firmware a hawkBit client was offered and has not finished with (its open action).
    pub open_firmware_id: Option<Id>,
    /// The public key (PEM) the device signs its authentication requests with (Mender).
    #[serde(skip)]
    pub public_key: Option<String>,
    #[serde(flatten)]
    pub telemetry: Telemetry,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub product_id: Id,
    pub group_id: Option<Id>,
    pub serial: String,
    pub status: DeviceStatus,
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct DevicePatch {
    pub status: Option<DeviceStatus>,
    pub group_id: Option<Id>,
    /// `Some(None)` removes the password.
    pub password_hash: Option<Option<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Firmware {
    pub id: Id,
    pub product_id: Id,
    pub version: String,
    pub size: i64,
    pub md5: String,
    pub sha256: String,
    pub format: String,
    /// What the image says about itself (chip, project, IDF version, ...).
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub created_at: Millis,
}

impl Firmware {
    /// A text field of what the image says about itself (`chip`, `project_name`,
    /// `idf_version`, ...), empty when it says nothing.
    pub fn meta(&self, key: &str) -> &str {
        self.metadata
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
    }

    /// The key digests of the verified Secure Boot V2 blocks the image carries.
    pub fn signers(&self) -> Vec<&str> {
        self.metadata
            .get("signatures")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .filter(|b| b.get("verified").and_then(|v| v.as_bool()) == Some(true))
            .filter_map(|b| b.get("key_digest").and_then(|v| v.as_str()))
            .collect()
    }
}

/// What a firmware list is narrowed to (every field optional).
#[derive(Debug, Clone, Default)]
pub struct FirmwareFilter {
    pub version: Option<String>,
    pub format: Option<String>,
    /// The chip the image names (`esp32c3`, `esp8266`, ...).
    pub chip: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewFirmware {
    pub product_id: Id,
    pub version: String,
    pub size: i64,
    pub md5: String,
    pub sha256: String,
    pub format: String,
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, Default)]
pub struct GroupPatch {
    pub name: Option<String>,
    /// `Some(None)` unassigns the firmware.
    pub firmware_id: Option<Option<Id>>,
    /// The firmware for the other families (replaces the list).
    pub other_firmware_ids: Option<Vec<Id>>,
    pub config: Option<serde_json::Value>,
}

/// A file assigned to a group, fetched by devices with its file key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Resource {
    pub id: Id,
    pub group_id: Id,
    pub name: String,
    /// File key: what devices pass as `fk` to fetch it.
    pub fk: String,
    pub size: i64,
    pub md5: String,
    pub sha256: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone)]
pub struct NewResource {
    pub group_id: Id,
    pub name: String,
    pub fk: String,
    pub size: i64,
    pub md5: String,
    pub sha256: String,
}

/// How many hex characters of a token's SHA-256 name it (in lists and for revocation): the
/// digest of a 128-bit random token tells nothing about the token.
pub const TOKEN_ID_LEN: usize = 16;

/// A bearer token as listed: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub user_id: Id,
    pub username: String,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// What an operator account may do: an admin everything (accounts too), an operator every
/// fleet change, a viewer look only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct User {
    pub id: Id,
    pub username: String,
    #[serde(skip)]
    pub password_hash: String,
    pub role: Role,
    pub created_at: Millis,
}

impl User {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// A signed-in browser: an operator (`user_id`) or a bot, bound to one device (`device_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: Option<Id>,
    pub device_id: Option<Id>,
    /// The token forms must echo back (CSRF protection).
    pub csrf: String,
    pub expires_at: Millis,
}

/// One saved state of a device's sketch: every file, and the board it targets.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SketchRevision {
    pub id: Id,
    pub device_id: Id,
    pub fqbn: String,
    /// File name -> content.
    pub files: std::collections::BTreeMap<String, String>,
    pub author: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Running => "running",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(BuildStatus::Queued),
            "running" => Some(BuildStatus::Running),
            "succeeded" => Some(BuildStatus::Succeeded),
            "failed" => Some(BuildStatus::Failed),
            _ => None,
        }
    }

    pub fn is_done(self) -> bool {
        matches!(self, BuildStatus::Succeeded | BuildStatus::Failed)
    }
}

impl std::fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compiler diagnostic at a place in a sketch file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub severity: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Build {
    pub id: Id,
    pub product_id: Option<Id>,
    pub device_id: Option<Id>,
    pub fqbn: String,
    pub files: std::collections::BTreeMap<String, String>,
    pub status: BuildStatus,
    pub log: String,
    pub diagnostics: Vec<Diagnostic>,
    pub firmware_id: Option<Id>,
    pub worker: Option<String>,
    pub requested_by: String,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

/// An image a build exported beside its application, such as `merged.bin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BuildImage {
    pub name: String,
    pub sha256: String,
    pub size: i64,
}

#[derive(Debug, Clone)]
pub struct NewBuild {
    pub product_id: Option<Id>,
    pub device_id: Option<Id>,
    pub fqbn: String,
    pub files: std::collections::BTreeMap<String, String>,
    pub requested_by: String,
}

/// How big a rollout stage is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StageSize {
    /// This many devices.
    Count(u64),
    /// This share of all the rollout's devices (0 to 100).
    Percent(f64),
    /// Every device not in an earlier stage.
    Rest,
}

impl std::str::FromStr for StageSize {
    type Err = String;

    /// A stage's size as people write it: `10` (devices), `5%` (of the rollout's devices)
    /// or `rest`.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("rest") {
            return Ok(StageSize::Rest);
        }
        if let Some(share) = text.strip_suffix('%') {
            return match share.trim().parse::<f64>() {
                Ok(p) if p.is_finite() => Ok(StageSize::Percent(p)),
                _ => Err(format!("{text:?} is not a share such as 5%")),
            };
        }
        text.parse::<u64>().map(StageSize::Count).map_err(|_| {
            format!(
                "{text:?} is not a stage size: a number of devices, a share such as 5%, or rest"
            )
        })
    }
}

/// One stage of a rollout and its gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StageSpec {
    pub size: StageSize,
    /// Share (0..=1) of the stage's devices that must run the new firmware to pass.
    #[serde(default = "default_success")]
    pub success_threshold: f64,
    /// Share (0..=1) of the stage's devices rolled back or failed that halts the rollout.
    #[serde(default = "default_failure")]
    pub failure_threshold: f64,
    /// The stage runs at least this long before it may advance.
    #[serde(default)]
    pub window_secs: u64,
    /// Advance on its own when the gates pass (else wait for approval).
    #[serde(default = "default_true")]
    pub auto_advance: bool,
    /// On halt, return this stage's devices to the previous firmware.
    #[serde(default)]
    pub auto_rollback: bool,
}

impl StageSpec {
    /// The share that passes a stage when a rollout does not say.
    pub const DEFAULT_SUCCESS: f64 = 0.95;
    /// The share that halts it when a rollout does not say.
    pub const DEFAULT_FAILURE: f64 = 0.1;
}

fn default_success() -> f64 {
    StageSpec::DEFAULT_SUCCESS
}

fn default_failure() -> f64 {
    StageSpec::DEFAULT_FAILURE
}

fn default_true() -> bool {
    true
}

/// Which devices a rollout is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutTarget {
    pub group_id: Option<Id>,
    pub status: Option<DeviceStatus>,
    /// Only devices reporting this version.
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    /// The stage passed its gates and waits for an operator.
    AwaitingApproval,
    Paused,
    /// A failure threshold was crossed.
    Halted,
    Cancelled,
    Completed,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::AwaitingApproval => "awaiting_approval",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Cancelled => "cancelled",
            RolloutState::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            RolloutState::Running,
            RolloutState::AwaitingApproval,
            RolloutState::Paused,
            RolloutState::Halted,
            RolloutState::Cancelled,
            RolloutState::Completed,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }

    /// Still steering devices (offers, rollbacks).
    pub fn is_live(self) -> bool {
        !matches!(self, RolloutState::Completed)
    }
}

impl std::fmt::Display for RolloutState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Rollout {
    pub id: Id,
    pub product_id: Id,
    pub firmware_id: Id,
    /// The firmware for devices of other families (one image per family).
    pub other_firmware_ids: Vec<Id>,
    pub target: RolloutTarget,
    pub stages: Vec<StageSpec>,
    pub rate_per_minute: Option<i64>,
    pub state: RolloutState,
    pub current_stage: i64,
    pub stage_started_at: Millis,
    /// Stages returned to the previous firmware.
    pub rolled_back_stages: Vec<i64>,
    pub message: String,
    pub created_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone)]
pub struct NewRollout {
    pub product_id: Id,
    pub firmware_id: Id,
    pub other_firmware_ids: Vec<Id>,
    pub target: RolloutTarget,
    pub stages: Vec<StageSpec>,
    pub rate_per_minute: Option<i64>,
    pub created_by: String,
}

/// Where one device is in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Not offered yet.
    Pending,
    Offered,
    /// The whole image was served.
    Downloaded,
    /// Checked in running the new firmware.
    Succeeded,
    /// Came back on the old firmware after downloading the new one (or said so).
    RolledBack,
    /// Said the update failed.
    Failed,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Pending => "pending",
            MemberState::Offered => "offered",
            MemberState::Downloaded => "downloaded",
            MemberState::Succeeded => "succeeded",
            MemberState::RolledBack => "rolled_back",
            MemberState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            MemberState::Pending,
            MemberState::Offered,
            MemberState::Downloaded,
            MemberState::Succeeded,
            MemberState::RolledBack,
            MemberState::Failed,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RolloutMember {
    pub rollout_id: Id,
    pub device_id: Id,
    pub stage: i64,
    pub state: MemberState,
    pub from_version: Option<String>,
    pub offered_at: Option<Millis>,
    pub updated_at: Millis,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeviceEvent {
    pub id: Id,
    pub device_id: Id,
    pub at: Millis,
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: Id,
    pub at: Millis,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

/// How a device list is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSort {
    /// By serial (the default).
    #[default]
    Serial,
    /// By the time of the last check-in (never seen first).
    LastSeen,
    /// By registration (oldest first).
    Created,
}

/// Where the previous page of a device list ended: the last row's sort key and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceCursor {
    Serial(String),
    LastSeen(Millis, Id),
    Created(Id),
}

/// Which devices of a product a list or count takes, in which order, from where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceQuery {
    pub status: Option<DeviceStatus>,
    pub group_id: Option<Id>,
    /// Exactly this reported version.
    pub version: Option<String>,
    /// The chip family its check-ins announce (`esp32`, `esp8266`, `w800`, ...).
    pub chip: Option<String>,
    /// Last check-in before (never seen counts as before) or at/after this time.
    pub seen_before: Option<Millis>,
    pub seen_after: Option<Millis>,
    pub serial_prefix: Option<String>,
    /// Part of the serial, any case.
    pub search: Option<String>,
    pub sort: DeviceSort,
    pub descending: bool,
    /// Rows after this one (in the order asked for).
    pub after: Option<DeviceCursor>,
    pub limit: i64,
}

impl DeviceQuery {
    /// Whether its cursor (if any) comes from a list in its order.
    pub fn cursor_fits(&self) -> bool {
        matches!(
            (&self.sort, &self.after),
            (_, None)
                | (DeviceSort::Serial, Some(DeviceCursor::Serial(_)))
                | (DeviceSort::LastSeen, Some(DeviceCursor::LastSeen(..)))
                | (DeviceSort::Created, Some(DeviceCursor::Created(_)))
        )
    }

    /// Whether it takes every device (no filter set).
    pub fn filters_nothing(&self) -> bool {
        self.status.is_none()
            && self.group_id.is_none()
            && self.version.is_none()
            && self.chip.is_none()
            && self.seen_before.is_none()
            && self.seen_after.is_none()
            && self.serial_prefix.as_deref().is_none_or(str::is_empty)
            && self.search.as_deref().is_none_or(str::is_empty)
    }

    /// The cursor that continues after `device` in this query's order.
    pub fn cursor_after(&self, device: &Device) -> DeviceCursor {
        match self.sort {
            DeviceSort::Serial => DeviceCursor::Serial(device.serial.clone()),
            DeviceSort::LastSeen => {
                DeviceCursor::LastSeen(device.telemetry.last_seen.unwrap_or(0), device.id)
            }
            DeviceSort::Created => DeviceCursor::Created(device.id),
        }
    }
}

/// How many devices of a product are in each group, on each version, with each status (one
/// row per combination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTally {
    pub group_id: Id,
    pub status: DeviceStatus,
    pub version: Option<String>,
    pub count: i64,
}

/// A row of a device import: created, or brought to these values when its serial exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedDevice {
    pub serial: String,
    pub group_id: Id,
    pub status: DeviceStatus,
    /// Argon2id PHC string; `None` keeps what the device has.
    pub password_hash: Option<String>,
    /// PEM; `None` keeps what the device has.
    pub public_key: Option<String>,
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ImportOutcome {
    /// Rows read.
    pub rows: u64,
    pub created: u64,
    /// Rows whose serial existed (their values set again).
    pub updated: u64,
}

/// What a cache generation covers: what check-ins read besides devices (products, groups,
/// firmware), or the devices too (a write that changed many device rows at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    Settings,
    Devices,
}

impl CacheScope {
    /// Its row in `cache_generation`.
    pub fn row(self) -> i64 {
        match self {
            CacheScope::Settings => 1,
            CacheScope::Devices => 2,
        }
    }
}

/// One change to every device a filter takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkChange {
    Status(DeviceStatus),
    Group(Id),
    Delete,
}

/// One stage of a planned rollout, as its dry run shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlannedStage {
    pub count: i64,
    /// Members not running the rollout's version (they will download it).
    pub updating: i64,
    /// The first members, in the plan's order.
    pub serials: Vec<String>,
}

#[cfg(test)]
mod stage_size_tests {
    use super::StageSize;

    #[test]
    fn stage_sizes_read_as_people_write_them() {
        assert_eq!("10".parse(), Ok(StageSize::Count(10)));
        assert_eq!(" 5% ".parse(), Ok(StageSize::Percent(5.0)));
        assert_eq!("Rest".parse(), Ok(StageSize::Rest));
        for bad in ["", "-3", "ten", "%", "1e999%", "3.5"] {
            let err = bad.parse::<StageSize>().unwrap_err();
            assert!(err.contains(&format!("{:?}", bad.trim())), "{bad}: {err}");
        }
    }
}

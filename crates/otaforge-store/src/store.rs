//! The `Store` trait: every query the server makes, one implementation per backend.

use async_trait::async_trait;

use crate::error::Result;
use crate::model::*;
use otaforge_domain::rollout_plan::FleetOrder;

/// Persistent state of the fleet. Implemented once per database backend
/// (`SqliteStore`, `PgStore`); the server holds an `Arc<dyn Store>` chosen at start-up.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    async fn create_user(&self, username: &str, password_hash: &str, role: Role) -> Result<User>;
    /// Every operator account, by name.
    async fn list_users(&self) -> Result<Vec<User>>;
    async fn set_user_role(&self, id: Id, role: Role) -> Result<User>;
    /// Sets the password; the account's browser sessions end.
    async fn set_user_password(&self, id: Id, password_hash: &str) -> Result<()>;
    /// Deletes the account with its tokens and sessions.
    async fn delete_user(&self, id: Id) -> Result<()>;
    async fn user_by_name(&self, username: &str) -> Result<Option<User>>;
    async fn user_by_id(&self, id: Id) -> Result<Option<User>>;
    async fn count_users(&self) -> Result<i64>;
    async fn create_token(&self, digest: &str, user_id: Id, expires_at: Millis) -> Result<()>;
    /// The user of a token that exists and has not expired.
    async fn user_by_token(&self, digest: &str) -> Result<Option<User>>;
    /// Tokens of one user (`None`: of everyone), oldest first.
    async fn list_tokens(&self, user_id: Option<Id>) -> Result<Vec<TokenInfo>>;
    /// Revokes the token with this id (restricted to one user's tokens when `user_id` is
    /// set); false when there is none.
    async fn revoke_token(&self, id: &str, user_id: Option<Id>) -> Result<bool>;

    /// Creates the product and its undeletable Default group in one transaction.
    async fn create_product(&self, name: &str, api_key_digest: &str) -> Result<Product>;
    async fn list_products(&self) -> Result<Vec<Product>>;
    async fn get_product(&self, id: Id) -> Result<Product>;
    async fn product_by_key_digest(&self, digest: &str) -> Result<Option<Product>>;
    async fn set_product_key(&self, id: Id, api_key_digest: &str) -> Result<Product>;
    /// Conflict when another product has the name.
    async fn rename_product(&self, id: Id, name: &str) -> Result<Product>;
    /// Deletes the product with its groups, devices, firmware, resources and rollouts.
    async fn delete_product(&self, id: Id) -> Result<()>;

    async fn create_group(&self, product_id: Id, name: &str) -> Result<Group>;
    async fn list_groups(&self, product_id: Id) -> Result<Vec<Group>>;
    async fn get_group(&self, product_id: Id, id: Id) -> Result<Group>;
    async fn update_group(&self, product_id: Id, id: Id, patch: GroupPatch) -> Result<Group>;
    /// Refuses the Default group; the group's devices move to Default.
    async fn delete_group(&self, product_id: Id, id: Id) -> Result<()>;

    async fn create_device(&self, new: NewDevice) -> Result<Device>;
    async fn list_devices(&self, product_id: Id) -> Result<Vec<Device>>;
    /// One page of a product's devices: the query's filters, order and cursor, at most its
    /// limit (1 to 10,000).
    async fn device_page(&self, product_id: Id, query: &DeviceQuery) -> Result<Vec<Device>>;
    /// How many devices the query's filters take (its order, cursor and limit ignored).
    async fn count_devices(&self, product_id: Id, query: &DeviceQuery) -> Result<i64>;
    /// Creates or updates these devices (by serial) in one transaction: all or nothing.
    async fn import_devices(
        &self,
        product_id: Id,
        rows: &[ImportedDevice],
    ) -> Result<ImportOutcome>;
    /// Applies `change` to every device of the product the filter takes (its order, cursor
    /// and limit ignored); how many it changed. A group must be the product's.
    async fn bulk_devices(
        &self,
        product_id: Id,
        filter: &DeviceQuery,
        change: BulkChange,
    ) -> Result<u64>;
    /// Says a management write happened (every process forgets what `scope` covers); the
    /// new value.
    async fn bump_cache_generation(&self, scope: CacheScope) -> Result<i64>;
    async fn cache_generation(&self, scope: CacheScope) -> Result<i64>;
    /// Says these devices' rows changed (every process forgets them); entries older than a
    /// minute are dropped.
    async fn add_device_changes(&self, devices: &[(Id, String)]) -> Result<()>;
    /// Device changes after `seq`, oldest first (at most 10,000).
    async fn device_changes_since(&self, seq: i64) -> Result<Vec<(i64, Id, String)>>;
    /// The sequence number of the newest device change (0 when none).
    async fn last_device_change(&self) -> Result<i64>;
    /// A product's devices counted by group, status and version.
    async fn device_tally(&self, product_id: Id) -> Result<Vec<DeviceTally>>;
    async fn find_device(&self, product_id: Id, serial: &str) -> Result<Option<Device>>;
    async fn get_device(&self, product_id: Id, serial: &str) -> Result<Device>;
    async fn update_device(
        &self,
        product_id: Id,
        serial: &str,
        patch: DevicePatch,
    ) -> Result<Device>;
    async fn delete_device(&self, product_id: Id, serial: &str) -> Result<()>;
    /// The device, added to the Default group as New when the server has not seen it yet.
    async fn register_device(&self, product_id: Id, serial: &str) -> Result<Device>;
    /// Applies a batch of check-in reports in one transaction. Unknown ids are skipped.
    async fn record_telemetry(&self, batch: &[(Id, Telemetry)]) -> Result<()>;

    /// Refuses a second firmware with the same version in a product.
    async fn create_firmware(&self, new: NewFirmware) -> Result<Firmware>;
    async fn list_firmware(&self, product_id: Id) -> Result<Vec<Firmware>>;
    /// A page of a product's firmware, newest first, below the id `before`, filtered by
    /// version, format and chip (the image's own `metadata.chip`).
    async fn firmware_page(
        &self,
        product_id: Id,
        filter: &FirmwareFilter,
        before: Option<Id>,
        limit: i64,
    ) -> Result<Vec<Firmware>>;
    async fn get_firmware(&self, product_id: Id, id: Id) -> Result<Firmware>;
    /// Refuses a firmware still assigned to a group or a device, or the target of a rollout.
    async fn delete_firmware(&self, product_id: Id, id: Id) -> Result<()>;
    /// Whether any firmware or resource row still refers to the blob with this SHA-256.
    async fn blob_in_use(&self, sha256: &str) -> Result<bool>;

    /// Adds a resource to a group, replacing one of the same name.
    async fn create_resource(&self, new: NewResource) -> Result<Resource>;
    async fn list_resources(&self, group_id: Id) -> Result<Vec<Resource>>;
    async fn resource_by_fk(&self, product_id: Id, fk: &str) -> Result<Option<Resource>>;
    async fn delete_resource(&self, group_id: Id, id: Id) -> Result<Resource>;

    async fn create_session(&self, digest: &str, session: &Session) -> Result<()>;
    /// The session, if it exists and has not expired.
    async fn session(&self, digest: &str) -> Result<Option<Session>>;
    async fn delete_session(&self, digest: &str) -> Result<()>;
    /// Ends every session of a user or of a device (bot); returns how many ended.
    async fn delete_sessions_of(&self, user_id: Option<Id>, device_id: Option<Id>) -> Result<u64>;

    async fn device_by_id(&self, id: Id) -> Result<Device>;
    /// Devices of every product with this serial (bot login does not name the product).
    async fn devices_by_serial(&self, serial: &str) -> Result<Vec<Device>>;
    /// Assigns firmware to one device (`None` falls back to its group's).
    async fn set_device_firmware(&self, device_id: Id, firmware_id: Option<Id>) -> Result<()>;
    /// What a Linux device reported about itself (hawkBit configData, Mender inventory).
    async fn set_device_attributes(
        &self,
        device_id: Id,
        attributes: &serde_json::Value,
    ) -> Result<()>;
    /// The firmware whose offer the device closed without installing it (`None`: none).
    async fn set_device_closed_firmware(
        &self,
        device_id: Id,
        firmware_id: Option<Id>,
    ) -> Result<()>;
    /// Binds the device's public key if it has none yet; `false` when it already had one.
    async fn bind_device_key(&self, device_id: Id, public_key: &str) -> Result<bool>;
    /// The firmware a hawkBit client was offered and has not finished with (`None`: none).
    async fn set_device_open_firmware(&self, device_id: Id, firmware_id: Option<Id>) -> Result<()>;
    /// The public keys (PEM) the product's Linux artifacts must be signed with.
    async fn set_product_artifact_keys(&self, id: Id, keys: &[String]) -> Result<Product>;
    async fn set_product_firmware_keys(&self, id: Id, keys: &[String]) -> Result<Product>;
    async fn set_device_secrets(&self, device_id: Id, sealed: Option<&str>) -> Result<()>;

    async fn save_revision(
        &self,
        device_id: Id,
        fqbn: &str,
        files: &std::collections::BTreeMap<String, String>,
        author: &str,
    ) -> Result<SketchRevision>;
    /// Newest first.
    async fn list_revisions(&self, device_id: Id, limit: i64) -> Result<Vec<SketchRevision>>;
    async fn get_revision(&self, device_id: Id, id: Id) -> Result<SketchRevision>;

    async fn create_build(&self, new: NewBuild) -> Result<Build>;
    async fn get_build(&self, id: Id) -> Result<Build>;
    /// Newest first.
    async fn list_builds(&self, device_id: Id, limit: i64) -> Result<Vec<Build>>;
    /// A page of a device's builds, newest first, below the id `before`.
    async fn build_page(
        &self,
        device_id: Id,
        status: Option<BuildStatus>,
        before: Option<Id>,
        limit: i64,
    ) -> Result<Vec<Build>>;
    /// Takes a queued build for `worker`, if any: the oldest of the requester with the fewest
    /// builds running. Two workers never get the same one.
    async fn claim_build(&self, worker: &str) -> Result<Option<Build>>;
    /// Builds queued or running for this device or requested by this name.
    async fn count_pending_builds(&self, device_id: Option<Id>, requested_by: &str) -> Result<i64>;
    async fn append_build_log(&self, id: Id, text: &str) -> Result<()>;
    async fn finish_build(
        &self,
        id: Id,
        status: BuildStatus,
        diagnostics: &[Diagnostic],
        firmware_id: Option<Id>,
    ) -> Result<()>;
    /// Records an image the build exported (its bytes are the blob `sha256`); a second image
    /// of the same name replaces the first.
    async fn add_build_image(&self, build_id: Id, image: &BuildImage) -> Result<()>;
    /// By name.
    async fn list_build_images(&self, build_id: Id) -> Result<Vec<BuildImage>>;
    /// Marks builds left running by a worker that died (started before `before`) as failed.
    async fn fail_stale_builds(&self, before: Millis) -> Result<u64>;

    /// Creates the rollout and its members (device, stage, version it runs) in one transaction.
    async fn create_rollout(
        &self,
        new: NewRollout,
        members: &[(Id, i64, Option<String>)],
    ) -> Result<Rollout>;
    async fn get_rollout(&self, id: Id) -> Result<Rollout>;
    /// Creates a rollout with its members in one transaction, planned by the database: the
    /// devices `target` takes, in `order`, cut into stages of `sizes` (members beyond their
    /// sum are left out); each member keeps the version it ran.
    async fn create_planned_rollout(
        &self,
        new: NewRollout,
        target: &DeviceQuery,
        order: FleetOrder,
        sizes: &[u64],
    ) -> Result<Rollout>;
    /// The same plan without storing it: per stage its size, how many members do not run
    /// `version`, and its first `preview` serials.
    async fn preview_plan(
        &self,
        product_id: Id,
        target: &DeviceQuery,
        order: FleetOrder,
        sizes: &[u64],
        version: &str,
        preview: i64,
    ) -> Result<Vec<PlannedStage>>;
    /// Devices `target` takes that are members of a live rollout: how many, and one serial.
    async fn busy_devices(
        &self,
        product_id: Id,
        target: &DeviceQuery,
    ) -> Result<(i64, Option<String>)>;
    async fn list_rollouts(&self, product_id: Id) -> Result<Vec<Rollout>>;
    /// A page of a product's rollouts, newest first, below the id `before`.
    async fn rollout_page(
        &self,
        product_id: Id,
        state: Option<RolloutState>,
        before: Option<Id>,
        limit: i64,
    ) -> Result<Vec<Rollout>>;
    /// Rollouts not completed, of every product.
    async fn live_rollouts(&self) -> Result<Vec<Rollout>>;
    /// Saves state, stage, rolled-back stages and message.
    async fn update_rollout(&self, rollout: &Rollout) -> Result<()>;
    async fn rollout_members(&self, rollout_id: Id) -> Result<Vec<RolloutMember>>;
    /// Members in (stage, device) order after `after`, at most `limit`.
    async fn rollout_members_page(
        &self,
        rollout_id: Id,
        after: Option<(i64, Id)>,
        limit: i64,
    ) -> Result<Vec<RolloutMember>>;
    /// How many members are in each (stage, state), counted by the database.
    async fn member_counts(&self, rollout_id: Id) -> Result<Vec<(i64, MemberState, i64)>>;
    /// Moves a member from one of `from` to `to`; false when it was in none of them (so a
    /// transition is counted once, whatever retries and restarts happen).
    async fn move_member(
        &self,
        rollout_id: Id,
        device_id: Id,
        from: &[MemberState],
        to: MemberState,
        message: &str,
    ) -> Result<bool>;
    /// Members first offered at or after `since`.
    async fn offers_since(&self, rollout_id: Id, since: Millis) -> Result<i64>;
    /// One member as the database holds it now.
    async fn rollout_member(&self, rollout_id: Id, device_id: Id) -> Result<Option<RolloutMember>>;

    // ---- several nodes on one database ----
    /// Takes or renews the lease `name` for `holder` until `ttl_ms` from now; false while
    /// another holder's lease runs.
    async fn hold_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool>;
    /// Gives the lease up if `holder` has it (so another node takes over at once).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
    /// Counts one more use of `key` in its window (which starts at the first use and lasts
    /// `window_ms`) if fewer than `cap` were counted there; false when the window is full.
    async fn take_slot(&self, key: &str, window_ms: i64, cap: i64) -> Result<bool>;
    /// Takes one counted use of `key` back (`forget`: all of them).
    async fn give_back_slot(&self, key: &str, forget: bool) -> Result<()>;
    /// Removes windows that began before `before`.
    async fn prune_slots(&self, before: Millis) -> Result<u64>;

    async fn add_device_event(&self, device_id: Id, kind: &str, detail: &str) -> Result<()>;
    /// Newest first, older than `before` (an event id) when given.
    async fn device_events(
        &self,
        device_id: Id,
        before: Option<Id>,
        limit: i64,
    ) -> Result<Vec<DeviceEvent>>;
    async fn audit(&self, actor: &str, action: &str, subject: &str, detail: &str) -> Result<()>;
    /// Newest first, older than `before` (an entry id) when given.
    async fn audit_log(&self, before: Option<Id>, limit: i64) -> Result<Vec<AuditEntry>>;
}

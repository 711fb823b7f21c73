//! Staged rollouts at run time: the in-memory book of live rollouts and their members (read
//! on every check-in), the check-in hooks that offer the new firmware to released stages and
//! observe what devices come back running, the gate evaluator, and the management API.
//! Every member transition is a conditional database update, so a device is counted once
//! whatever retries, restarts or crashes happen; counts are always read from the rows.

use std::collections::HashMap;
use std::sync::RwLock;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use otaforge_store::model::*;
use otaforge_store::{Store, StoreError};
use serde::{Deserialize, Serialize};

use otaforge_protocol::UpdateResult;

use crate::AppState;
use crate::auth::Operator;
use crate::decision::{Family, Running, for_family, runs};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::page::Page;
use crate::rollout_plan::{self, Verdict};

#[derive(Debug, Clone)]
struct Member {
    rollout: Id,
    stage: i64,
    state: MemberState,
}

/// A member as the book keeps it, by rollout and device id: 8 bytes, so that a rollout of a
/// million devices costs a table of about 32 MB.
#[derive(Debug, Clone, Copy)]
struct Kept {
    stage: i32,
    state: MemberState,
}

#[derive(Default)]
struct Book {
    rollouts: HashMap<Id, Rollout>,
    /// Each rollout's release: its firmware, then the other families'.
    firmware: HashMap<Id, Vec<Firmware>>,
    /// Each rollout's members (a device is in at most one live rollout).
    members: HashMap<Id, HashMap<Id, Kept>>,
}

impl Book {
    fn member(&self, device: Id) -> Option<Member> {
        self.members.iter().find_map(|(rollout, members)| {
            members.get(&device).map(|k| Member {
                rollout: *rollout,
                stage: i64::from(k.stage),
                state: k.state,
            })
        })
    }

    fn kept_mut(&mut self, device: Id) -> Option<&mut Kept> {
        self.members.values_mut().find_map(|m| m.get_mut(&device))
    }

    fn forget(&mut self, rollout: Id) {
        self.rollouts.remove(&rollout);
        self.firmware.remove(&rollout);
        self.members.remove(&rollout);
    }
}

/// Live rollouts and their members, mirrored from the database. The database is the truth:
/// every node refreshes the rollouts twice a second (`refresh`), and a member's state here
/// is a hint that every transition checks against its row (`move_member` is conditional; a
/// move that finds another state reads the row back).
#[derive(Default)]
pub struct RolloutBook {
    book: RwLock<Book>,
    /// One refresh at a time (a new rollout's members are loaded once), and when the last
    /// one started: callers that asked while it ran take its answer.
    refreshing: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl RolloutBook {
    /// Brings the book up to date with the database: rollouts that are no longer live are
    /// dropped with their members, new ones are loaded with theirs (in pages, so a rollout
    /// of a million devices never sits in memory twice), and the others take their rows'
    /// state, stage and rolled-back stages. Cheap when nothing is new: one query of the
    /// live rollouts. When a rollout leaves the book, the catalog's products, groups and
    /// firmware are forgotten first: a completed rollout handed its release to its group
    /// before its row said so, and a member that no longer finds its rollout here must read
    /// the group anew (else it would be offered the group's old firmware until they expire).
    async fn refresh(
        &self,
        store: &dyn Store,
        catalog: &crate::catalog::Catalog,
    ) -> otaforge_store::Result<()> {
        let asked = std::time::Instant::now();
        let mut last = self.refreshing.lock().await;
        if last.is_some_and(|started| started > asked) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.refresh_now(store, catalog).await?;
        *last = Some(started);
        Ok(())
    }

    async fn refresh_now(
        &self,
        store: &dyn Store,
        catalog: &crate::catalog::Catalog,
    ) -> otaforge_store::Result<()> {
        let live: Vec<Rollout> = store
            .live_rollouts()
            .await?
            .into_iter()
            .filter(|r| r.state != RolloutState::Cancelled)
            .collect();
        let known: std::collections::HashSet<Id> = {
            let book = self.book.read().unwrap_or_else(|e| e.into_inner());
            book.rollouts.keys().copied().collect()
        };
        let mut loaded = Vec::new();
        for r in live.iter().filter(|r| !known.contains(&r.id)) {
            let mut release = vec![store.get_firmware(r.product_id, r.firmware_id).await?];
            for id in &r.other_firmware_ids {
                release.push(store.get_firmware(r.product_id, *id).await?);
            }
            // Sized at once from the rollout's own count: a table grown step by step holds
            // its old and new buckets at the same time.
            let total: i64 = store
                .member_counts(r.id)
                .await?
                .iter()
                .map(|(_, _, n)| n)
                .sum();
            let mut members = HashMap::with_capacity(usize::try_from(total).unwrap_or(0));
            let mut after = None;
            loop {
                let page = store.rollout_members_page(r.id, after, 10_000).await?;
                let Some(last) = page.last() else {
                    break;
                };
                after = Some((last.stage, last.device_id));
                members.extend(page.into_iter().map(|m| {
                    (
                        m.device_id,
                        Kept {
                            stage: i32::try_from(m.stage).unwrap_or(i32::MAX),
                            state: m.state,
                        },
                    )
                }));
            }
            loaded.push((r.id, release, members));
        }
        let mut book = self.book.write().unwrap_or_else(|e| e.into_inner());
        let ids: std::collections::HashSet<Id> = live.iter().map(|r| r.id).collect();
        let gone: Vec<Id> = book
            .rollouts
            .keys()
            .filter(|id| !ids.contains(id))
            .copied()
            .collect();
        if !gone.is_empty() {
            catalog.clear_settings();
        }
        for id in gone {
            book.forget(id);
        }
        for (id, release, members) in loaded {
            book.firmware.insert(id, release);
            book.members.insert(id, members);
        }
        for r in live {
            book.rollouts.insert(r.id, r);
        }
        Ok(())
    }

    /// A deleted device leaves the rollout it was in.
    pub fn forget_device(&self, device: Id) {
        let mut book = self.book.write().unwrap_or_else(|e| e.into_inner());
        for members in book.members.values_mut() {
            members.remove(&device);
        }
    }

    fn set_state(&self, device: Id, state: MemberState) {
        if let Some(m) = self
            .book
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .kept_mut(device)
        {
            m.state = state;
        }
    }

    fn put_rollout(&self, r: Rollout) {
        let mut book = self.book.write().unwrap_or_else(|e| e.into_inner());
        if r.state == RolloutState::Completed || r.state == RolloutState::Cancelled {
            book.forget(r.id);
        } else {
            book.rollouts.insert(r.id, r);
        }
    }
}

/// The rate cap's window of first offers, counted in the database so that every node
/// shares it.
fn offers_key(rollout: Id) -> String {
    format!("rollout:{rollout}:offers")
}

/// Room under the rate cap for one more first offer in this minute (and takes it).
async fn take_offer_slot(store: &dyn Store, rollout: &Rollout) -> otaforge_store::Result<bool> {
    match rollout.rate_per_minute {
        None => Ok(true),
        Some(cap) => store.take_slot(&offers_key(rollout.id), 60_000, cap).await,
    }
}

/// What a rollout says about one device's firmware.
enum Steer {
    /// Not in a live rollout, or returned to the previous firmware: the usual assignment.
    Usual,
    /// Serve this firmware.
    Serve(Box<Firmware>),
}

/// What a live rollout's membership means for what the device is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    /// Its stage is not released, or was rolled back: the usual assignment.
    Usual,
    /// Offered once: it keeps the offer (it may be mid-download), whatever the state.
    Keeps,
    /// Released and not offered yet: offered under the rate cap.
    Released,
}

fn membership(member: &Member, rollout: &Rollout) -> Membership {
    if rollout.rolled_back_stages.contains(&member.stage) {
        Membership::Usual
    } else if member.state != MemberState::Pending {
        Membership::Keeps
    } else if rollout.state == RolloutState::Running && member.stage <= rollout.current_stage {
        Membership::Released
    } else {
        Membership::Usual
    }
}

impl AppState {
    /// The device's live rollout membership, and the rollout's image for the family the
    /// device announces.
    fn steer(&self, device: &Device, chip: Option<Family>) -> Option<(Member, Rollout, Firmware)> {
        let book = self
            .inner
            .rollouts
            .book
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let member = book.member(device.id)?;
        let rollout = book.rollouts.get(&member.rollout)?.clone();
        let firmware = for_family(book.firmware.get(&member.rollout)?, chip)?.clone();
        Some((member, rollout, firmware))
    }

    /// Brings this node's book of live rollouts up to date with the database now.
    pub(crate) async fn refresh_rollouts(&self) -> otaforge_store::Result<()> {
        self.inner
            .rollouts
            .refresh(self.store(), &self.inner.catalog)
            .await
    }

    /// What a device's link serves now, as the pages show it: the steering of
    /// `target_firmware` for the family the device last announced, without taking an offer
    /// slot or moving its membership. `Some(rollout)` when a live rollout decides it (a
    /// released device that has not checked in yet is shown the image it will be offered).
    pub(crate) async fn link_serves(
        &self,
        device: &Device,
    ) -> otaforge_store::Result<Option<(Firmware, Option<Id>)>> {
        let chip = device.telemetry.chip.as_deref().and_then(Family::of_chip);
        if let Some((member, rollout, firmware)) = self.steer(device, chip)
            && membership(&member, &rollout) != Membership::Usual
        {
            return Ok(Some((firmware, Some(rollout.id))));
        }
        Ok(self
            .inner
            .catalog
            .assigned_firmware(self.store(), device, true, chip)
            .await?
            .map(|f| (f, None)))
    }

    /// The firmware a device should run now: a live rollout's for released stages (offering
    /// it for the first time under the rate cap), else the usual device or group assignment.
    /// Before the usual assignment moves a device off what it runs, the book catches up
    /// with the database: another node may have started the rollout, released the stage or
    /// offered the device its image a moment ago, and the old image must not be offered
    /// over the top of the new one.
    pub(crate) async fn target_firmware(
        &self,
        device: &Device,
        by_password: bool,
        chip: Option<Family>,
        running: &Running<'_>,
    ) -> otaforge_store::Result<Option<Firmware>> {
        let mut caught_up = false;
        loop {
            if let Steer::Serve(fw) = self.steer_device(device, chip).await? {
                return Ok(Some(*fw));
            }
            let usual = self
                .inner
                .catalog
                .assigned_firmware(self.store(), device, by_password, chip)
                .await?;
            let moves_off = usual.as_ref().is_some_and(|fw| !runs(fw, running));
            if caught_up || !moves_off {
                return Ok(usual);
            }
            self.refresh_rollouts().await?;
            caught_up = true;
        }
    }

    async fn steer_device(
        &self,
        device: &Device,
        chip: Option<Family>,
    ) -> otaforge_store::Result<Steer> {
        let Some((member, rollout, firmware)) = self.steer(device, chip) else {
            return Ok(Steer::Usual);
        };
        match membership(&member, &rollout) {
            Membership::Usual => return Ok(Steer::Usual),
            Membership::Keeps => return Ok(Steer::Serve(Box::new(firmware))),
            Membership::Released => {}
        }
        if take_offer_slot(self.store(), &rollout).await? {
            let moved = self
                .store()
                .move_member(
                    rollout.id,
                    device.id,
                    &[MemberState::Pending],
                    MemberState::Offered,
                    "",
                )
                .await?;
            if moved {
                self.inner
                    .rollouts
                    .set_state(device.id, MemberState::Offered);
                let _ = self
                    .store()
                    .add_device_event(
                        device.id,
                        "offered",
                        &format!("rollout {}: firmware {}", rollout.id, firmware.version),
                    )
                    .await;
                return Ok(Steer::Serve(Box::new(firmware)));
            }
            if rollout.rate_per_minute.is_some() {
                self.store()
                    .give_back_slot(&offers_key(rollout.id), false)
                    .await?;
            }
        }
        // Not offered by this node (the row was not pending, or the rate cap is full): another
        // node may have offered it already, which this node's book has not heard. The row says.
        match self.store().rollout_member(rollout.id, device.id).await? {
            Some(row) if row.state != MemberState::Pending => {
                self.inner.rollouts.set_state(device.id, row.state);
                Ok(Steer::Serve(Box::new(firmware)))
            }
            _ => Ok(Steer::Usual),
        }
    }

    /// After a check-in: what the device runs (and says) moves its rollout membership.
    /// `told`: the device said what it runs on this request (else `running` is what it last
    /// reported installed).
    pub(crate) async fn observe(
        &self,
        device: &Device,
        running: &Running<'_>,
        told: bool,
        feedback: Option<&str>,
        chip: Option<Family>,
    ) {
        if let Some(text) = feedback {
            let _ = self
                .store()
                .add_device_event(device.id, "feedback", text)
                .await;
        }
        let Some((mut member, rollout, firmware)) = self.steer(device, chip) else {
            return;
        };
        let result = feedback.and_then(|f| f.parse::<UpdateResult>().ok());
        let store = self.store();
        let runs_target = told.then(|| runs(&firmware, running));
        if member.state == MemberState::Pending && runs_target == Some(true) {
            // It runs the rollout's image while this node's book says it was never offered
            // it: another node did, and this node has not heard yet. The row says; without
            // this, the usual assignment would be offered to a device that just updated.
            if let Ok(Some(row)) = store.rollout_member(rollout.id, device.id).await
                && row.state != member.state
            {
                self.inner.rollouts.set_state(device.id, row.state);
                member.state = row.state;
            }
        }
        // Twice at most: when the row is in another state than this node's book says
        // (another node moved it), the transition is judged again from the row's state.
        for _ in 0..2 {
            let Some(transition) = rollout_plan::member_transition(
                member.state,
                runs_target,
                result.as_ref(),
                rollout.rolled_back_stages.contains(&member.stage),
            ) else {
                return;
            };
            let (from, to, kind) = (transition.from, transition.to, transition.event());
            let detail = match (&result, to) {
                (_, MemberState::Succeeded) => format!("running {}", firmware.version),
                (Some(UpdateResult::Failed { reason }), MemberState::Failed) => reason.clone(),
                _ => format!(
                    "back on {} after {}",
                    running.version.unwrap_or("?"),
                    firmware.version
                ),
            };
            match store
                .move_member(rollout.id, device.id, from, to, &detail)
                .await
            {
                Ok(true) => {
                    self.inner.rollouts.set_state(device.id, to);
                    let _ = store.add_device_event(device.id, kind, &detail).await;
                    return;
                }
                Ok(false) => match store.rollout_member(rollout.id, device.id).await {
                    Ok(Some(row)) if row.state != member.state => {
                        self.inner.rollouts.set_state(device.id, row.state);
                        member.state = row.state;
                    }
                    _ => return,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "recording a rollout transition failed");
                    return;
                }
            }
        }
    }

    /// The whole image of a rollout's firmware was served to the device.
    pub(crate) async fn served_whole(&self, device: &Device, firmware: &Firmware) {
        let Some((member, rollout, rollout_fw)) = self.steer(device, Family::of_firmware(firmware))
        else {
            return;
        };
        // This node's book may not know yet that another node offered it: the move is
        // conditional on the row.
        if rollout_fw.id != firmware.id
            || !matches!(member.state, MemberState::Pending | MemberState::Offered)
        {
            return;
        }
        if let Ok(true) = self
            .store()
            .move_member(
                rollout.id,
                device.id,
                &[MemberState::Offered],
                MemberState::Downloaded,
                "",
            )
            .await
        {
            self.inner
                .rollouts
                .set_state(device.id, MemberState::Downloaded);
            let _ = self
                .store()
                .add_device_event(device.id, "downloaded", &firmware.version)
                .await;
        }
    }

    /// One pass of the gates over every running rollout.
    pub async fn evaluate_rollouts(&self) -> otaforge_store::Result<()> {
        let store = self.store();
        for mut rollout in store.live_rollouts().await? {
            if rollout.state != RolloutState::Running {
                continue;
            }
            let Some(spec) = rollout.stages.get(rollout.current_stage as usize).cloned() else {
                continue;
            };
            let counts = rollout_plan::tally(store.member_counts(rollout.id).await?);
            let stage = counts
                .get(&rollout.current_stage)
                .copied()
                .unwrap_or_default();
            let elapsed = ((now_millis() - rollout.stage_started_at).max(0) / 1000) as u64;
            let action = match rollout_plan::evaluate(&spec, &stage, elapsed) {
                Verdict::Wait => continue,
                Verdict::Advance if (rollout.current_stage as usize) + 1 < rollout.stages.len() => {
                    rollout.current_stage += 1;
                    rollout.stage_started_at = now_millis();
                    format!("advanced to stage {}", rollout.current_stage + 1)
                }
                Verdict::Advance => {
                    rollout.state = RolloutState::Completed;
                    hand_over_to_group(store, &rollout).await?;
                    "completed".to_string()
                }
                Verdict::AwaitApproval => {
                    rollout.state = RolloutState::AwaitingApproval;
                    format!(
                        "stage {} passed; waiting for approval",
                        rollout.current_stage + 1
                    )
                }
                Verdict::Halt { rollback, reason } => {
                    rollout.state = RolloutState::Halted;
                    if rollback && !rollout.rolled_back_stages.contains(&rollout.current_stage) {
                        rollout.rolled_back_stages.push(rollout.current_stage);
                    }
                    rollout.message = reason.clone();
                    format!(
                        "halted in stage {}{}: {reason}",
                        rollout.current_stage + 1,
                        if rollback {
                            ", stage rolled back to the previous firmware"
                        } else {
                            ""
                        }
                    )
                }
            };
            store.update_rollout(&rollout).await?;
            store
                .audit("gates", &action, &format!("rollout {}", rollout.id), "")
                .await?;
            tracing::info!(rollout = rollout.id, "{action}");
            // The groups are forgotten before the rollout leaves the book: a member that no
            // longer finds it here reads its group (handed the release above) anew.
            self.inner.catalog.invalidate_settings();
            self.inner.rollouts.put_rollout(rollout);
        }
        Ok(())
    }
}

/// A completed rollout of a group leaves its release assigned to the group; the group's
/// images for families the rollout had none for stay.
async fn hand_over_to_group(store: &dyn Store, rollout: &Rollout) -> otaforge_store::Result<()> {
    let Some(group) = rollout.target.group_id else {
        return Ok(());
    };
    let product = rollout.product_id;
    let release = async |ids: Vec<Id>| -> otaforge_store::Result<Vec<Firmware>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match store.get_firmware(product, id).await {
                Ok(firmware) => out.push(firmware),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    };
    let current = store.get_group(product, group).await?;
    let old = release(
        current
            .firmware_id
            .into_iter()
            .chain(current.other_firmware_ids)
            .collect(),
    )
    .await?;
    let new = release(
        std::iter::once(rollout.firmware_id)
            .chain(rollout.other_firmware_ids.iter().copied())
            .collect(),
    )
    .await?;
    let mut ids = crate::decision::merge_release(&new, &old).into_iter();
    let patch = GroupPatch {
        firmware_id: Some(ids.next()),
        other_firmware_ids: Some(ids.collect()),
        ..GroupPatch::default()
    };
    store.update_group(product, group, patch).await?;
    Ok(())
}

// ---- management API ----

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/products/{product}/rollouts",
            get(list).post(create),
        )
        .route("/api/v1/products/{product}/rollouts/{rollout}", get(show))
        .route(
            "/api/v1/products/{product}/rollouts/{rollout}/devices",
            get(members),
        )
        .route(
            "/api/v1/products/{product}/rollouts/{rollout}/{action}",
            post(act),
        )
        .route(
            "/api/v1/products/{product}/devices/{serial}/events",
            get(events),
        )
        .route("/api/v1/audit", get(audit))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRolloutBody {
    pub(crate) firmware_id: Id,
    /// The firmware for target devices of other chip families than `firmware_id`'s, one
    /// image per family: one rollout across ESP32, ESP8266, SWUpdate and Mender devices.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub(crate) other_firmware_ids: Vec<Id>,
    #[serde(default)]
    pub(crate) target: RolloutTarget,
    pub(crate) stages: Vec<StageSpec>,
    pub(crate) rate_per_minute: Option<i64>,
    #[serde(default)]
    pub(crate) dry_run: bool,
    /// Orders the fleet into stages; the same request (and seed) gives the same stages, so a
    /// dry run shows exactly who the real run will pick.
    pub(crate) seed: Option<String>,
    /// Serials a dry run lists per stage (0 to 1000; 100 unless given); every stage's count
    /// and bytes are there whatever this says.
    #[schema(minimum = 0, maximum = 1000)]
    pub(crate) preview: Option<i64>,
}

/// The devices a rollout target takes, as a device filter.
fn target_filter(target: &RolloutTarget) -> otaforge_store::model::DeviceQuery {
    otaforge_store::model::DeviceQuery {
        group_id: target.group_id,
        status: target.status,
        version: target.version.clone(),
        ..Default::default()
    }
}

#[utoipa::path(post, path = "/api/v1/products/{product}/rollouts", tag = "rollouts",
    security(("bearer" = [])), params(("product" = i64, Path)), request_body = NewRolloutBody,
    responses((status = 201, body = Created), (status = 200, description = "a dry run", body = DryRun),
        crate::openapi::Refusals))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<NewRolloutBody>,
) -> ApiResult<Response> {
    Ok(
        match state.start_rollout(&op.actor()?, product, body).await? {
            Planned::DryRun(dry) => axum::Json(dry).into_response(),
            Planned::Started {
                rollout,
                total_bytes,
            } => {
                let out = Created {
                    rollout: RolloutBody::of(&state, &rollout).await?,
                    total_bytes,
                };
                (StatusCode::CREATED, axum::Json(out)).into_response()
            }
        },
    )
}

/// What `start_rollout` did: planned only (a dry run), or started.
pub(crate) enum Planned {
    DryRun(DryRun),
    Started { rollout: Rollout, total_bytes: i64 },
}

impl AppState {
    /// Plans a staged rollout and, unless it is a dry run, starts it: the one operation
    /// behind the REST call and the rollout form (its rules: stages, rate, release, target,
    /// no device in two live rollouts; audited).
    pub(crate) async fn start_rollout(
        &self,
        actor: &crate::core::fleet::Actor,
        product: Id,
        body: NewRolloutBody,
    ) -> ApiResult<Planned> {
        let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
        rollout_plan::check_stages(&body.stages).map_err(unprocessable)?;
        if body.rate_per_minute.is_some_and(|r| r < 1) {
            return Err(unprocessable("rate_per_minute must be at least 1".into()));
        }
        let preview = match body.preview {
            None => crate::page::DEFAULT_LIMIT,
            Some(n) if (0..=crate::page::MAX_LIMIT).contains(&n) => n,
            Some(n) => {
                return Err(unprocessable(format!(
                    "preview must be 0 to {}, not {n}",
                    crate::page::MAX_LIMIT
                )));
            }
        };
        let release = self
            .release(product, Some(body.firmware_id), &body.other_firmware_ids)
            .await?;
        let firmware = release[0].clone();
        if let Some(g) = body.target.group_id {
            self.store().get_group(product, g).await?;
        }
        // Reports still buffered are part of what the devices run.
        self.flush_telemetry().await?;
        let store = self.store();
        let filter = target_filter(&body.target);
        let total = store.count_devices(product, &filter).await?;
        let sizes = rollout_plan::stage_sizes(total.max(0) as u64, &body.stages);
        // A device is in at most one live rollout.
        let (busy, one_busy) = store.busy_devices(product, &filter).await?;
        if busy > 0 && !body.dry_run {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{busy} of these devices are already in a live rollout (e.g. {})",
                    one_busy.unwrap_or_default()
                ),
            ));
        }
        let seed = body.seed.clone().unwrap_or_else(|| {
            format!(
                "{product}:{}:{}",
                firmware.id,
                serde_json::to_string(&body.target).unwrap_or_default()
            )
        });
        let order = rollout_plan::FleetOrder::of_seed(&seed);
        let shown = if body.dry_run { preview } else { 0 };
        let planned = store
            .preview_plan(product, &filter, order, &sizes, &firmware.version, shown)
            .await?;
        let stage_previews: Vec<StagePreview> = planned
            .into_iter()
            .enumerate()
            .map(|(i, s)| StagePreview {
                stage: i + 1,
                count: s.count as usize,
                bytes: s.updating * firmware.size,
                devices: s.serials,
            })
            .collect();
        let total_bytes: i64 = stage_previews.iter().map(|s| s.bytes).sum();
        if body.dry_run {
            return Ok(Planned::DryRun(DryRun {
                dry_run: true,
                firmware: firmware.version.clone(),
                total_devices: total as usize,
                total_bytes,
                stages: stage_previews,
                already_in_rollouts: busy as usize,
            }));
        }
        let rollout = store
            .create_planned_rollout(
                NewRollout {
                    product_id: product,
                    firmware_id: firmware.id,
                    other_firmware_ids: body.other_firmware_ids,
                    target: body.target,
                    stages: body.stages,
                    rate_per_minute: body.rate_per_minute,
                    created_by: actor.name.clone(),
                },
                &filter,
                order,
                &sizes,
            )
            .await?;
        self.audited(
            actor,
            "started rollout",
            &format!("rollout {}", rollout.id),
            &format!("firmware {} to {total} devices", firmware.version),
        )
        .await;
        self.refresh_rollouts().await?;
        self.inner.catalog.invalidate_settings();
        Ok(Planned::Started {
            rollout,
            total_bytes,
        })
    }
}

/// One stage of a dry run: who is in it and how many bytes it will move.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StagePreview {
    pub(crate) stage: usize,
    /// Its first members in the plan's order (as many as `preview` asked).
    pub(crate) devices: Vec<String>,
    pub(crate) count: usize,
    pub(crate) bytes: i64,
}

/// What a rollout would do, without starting it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DryRun {
    pub(crate) dry_run: bool,
    pub(crate) firmware: String,
    pub(crate) total_devices: usize,
    pub(crate) total_bytes: i64,
    pub(crate) stages: Vec<StagePreview>,
    pub(crate) already_in_rollouts: usize,
}

/// One stage of a rollout and how its devices stand.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StageProgress {
    stage: usize,
    spec: StageSpec,
    devices: u64,
    pending: u64,
    offered: u64,
    downloaded: u64,
    succeeded: u64,
    rolled_back: u64,
    failed: u64,
    rolled_back_to_previous: bool,
}

/// A rollout with its stages' counts (read from the member rows).
#[derive(Serialize, utoipa::ToSchema)]
pub struct RolloutBody {
    id: Id,
    product_id: Id,
    firmware_id: Id,
    /// The other families' firmware.
    other_firmware_ids: Vec<Id>,
    target: RolloutTarget,
    state: RolloutState,
    /// 1-based.
    current_stage: i64,
    rate_per_minute: Option<i64>,
    message: String,
    created_by: String,
    created_at: Millis,
    updated_at: Millis,
    stages: Vec<StageProgress>,
}

/// A started rollout and the bytes it will move.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Created {
    #[serde(flatten)]
    rollout: RolloutBody,
    total_bytes: i64,
}

/// A member of a rollout.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MemberBody {
    serial: Option<String>,
    /// 1-based.
    stage: i64,
    state: MemberState,
    from_version: Option<String>,
    offered_at: Option<Millis>,
    updated_at: Millis,
    message: String,
}

impl RolloutBody {
    /// With the members counted per stage.
    pub fn counted(r: &Rollout, counts: &HashMap<i64, rollout_plan::StageCounts>) -> Self {
        let stages = r
            .stages
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let c = counts.get(&(i as i64)).copied().unwrap_or_default();
                StageProgress {
                    stage: i + 1,
                    spec: spec.clone(),
                    devices: c.total,
                    pending: c.pending,
                    offered: c.offered,
                    downloaded: c.downloaded,
                    succeeded: c.succeeded,
                    rolled_back: c.rolled_back,
                    failed: c.failed,
                    rolled_back_to_previous: r.rolled_back_stages.contains(&(i as i64)),
                }
            })
            .collect();
        RolloutBody {
            id: r.id,
            product_id: r.product_id,
            firmware_id: r.firmware_id,
            other_firmware_ids: r.other_firmware_ids.clone(),
            target: r.target.clone(),
            state: r.state,
            current_stage: r.current_stage + 1,
            rate_per_minute: r.rate_per_minute,
            message: r.message.clone(),
            created_by: r.created_by.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            stages,
        }
    }

    /// Counted by the database.
    async fn of(state: &AppState, r: &Rollout) -> ApiResult<Self> {
        let counts = rollout_plan::tally(state.store().member_counts(r.id).await?);
        Ok(Self::counted(r, &counts))
    }
}

/// A page of rollouts, newest first.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RolloutListQuery {
    /// Items per page (1 to 1000; 100 unless given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    /// Only rollouts in this state.
    state: Option<RolloutState>,
}

#[utoipa::path(get, path = "/api/v1/products/{product}/rollouts", tag = "rollouts",
    security(("bearer" = [])), params(("product" = i64, Path), RolloutListQuery),
    responses((status = 200, body = Page<RolloutBody>), crate::openapi::Refusals))]
pub async fn list(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiQuery(query): ApiQuery<RolloutListQuery>,
) -> ApiResult<axum::Json<Page<RolloutBody>>> {
    state.store().get_product(product).await?;
    let limit = crate::page::limit(query.limit)?;
    let before = crate::page::decode::<Id>(query.cursor.as_deref())?;
    let rows = state
        .store()
        .rollout_page(product, query.state, before, limit + 1)
        .await?;
    let page = crate::page::of(rows, limit, |r| r.id, |r| r);
    let mut items = Vec::with_capacity(page.items.len());
    for r in &page.items {
        items.push(RolloutBody::of(&state, r).await?);
    }
    Ok(axum::Json(Page {
        items,
        next: page.next,
        total: None,
    }))
}

async fn owned(state: &AppState, product: Id, rollout: Id) -> ApiResult<Rollout> {
    let r = state.store().get_rollout(rollout).await?;
    if r.product_id != product {
        return Err(StoreError::NotFound("rollout").into());
    }
    Ok(r)
}

#[utoipa::path(get, path = "/api/v1/products/{product}/rollouts/{rollout}", tag = "rollouts",
    security(("bearer" = [])), params(("product" = i64, Path), ("rollout" = i64, Path)),
    responses((status = 200, body = RolloutBody), crate::openapi::Refusals))]
pub async fn show(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, rollout)): ApiPath<(Id, Id)>,
) -> ApiResult<axum::Json<RolloutBody>> {
    let r = owned(&state, product, rollout).await?;
    Ok(axum::Json(RolloutBody::of(&state, &r).await?))
}

/// A page of a list ordered newest first or by position: `limit` and `cursor`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page (1 to 1000; 100 unless given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/products/{product}/rollouts/{rollout}/devices", tag = "rollouts",
    security(("bearer" = [])), params(("product" = i64, Path), ("rollout" = i64, Path), PageQuery),
    responses((status = 200, body = Page<MemberBody>), crate::openapi::Refusals))]
pub async fn members(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, rollout)): ApiPath<(Id, Id)>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<axum::Json<Page<MemberBody>>> {
    let r = owned(&state, product, rollout).await?;
    let limit = crate::page::limit(query.limit)?;
    let after = crate::page::decode::<(i64, Id)>(query.cursor.as_deref())?;
    let rows = state
        .store()
        .rollout_members_page(r.id, after, limit + 1)
        .await?;
    let mut serials = HashMap::new();
    for m in rows.iter().take(limit as usize) {
        if let Ok(d) = state.store().device_by_id(m.device_id).await {
            serials.insert(m.device_id, d.serial);
        }
    }
    Ok(axum::Json(crate::page::of(
        rows,
        limit,
        |m| (m.stage, m.device_id),
        |m| MemberBody {
            serial: serials.get(&m.device_id).cloned(),
            stage: m.stage + 1,
            state: m.state,
            from_version: m.from_version,
            offered_at: m.offered_at,
            updated_at: m.updated_at,
            message: m.message,
        },
    )))
}

/// pause, resume, cancel, approve.
pub async fn apply_action(
    state: &AppState,
    actor: &crate::core::fleet::Actor,
    product: Id,
    rollout: Id,
    action: &str,
) -> ApiResult<Rollout> {
    let mut r = owned(state, product, rollout).await?;
    use RolloutState::*;
    let conflict = |m: String| ApiError::new(StatusCode::CONFLICT, m);
    r.state = match (action, r.state) {
        ("pause", Running | AwaitingApproval) => Paused,
        ("resume", Paused | Halted) => {
            r.message.clear();
            Running
        }
        ("approve", AwaitingApproval) => {
            if (r.current_stage as usize) + 1 < r.stages.len() {
                r.current_stage += 1;
                r.stage_started_at = now_millis();
                Running
            } else {
                hand_over_to_group(state.store(), &r).await?;
                Completed
            }
        }
        ("cancel", Running | AwaitingApproval | Paused | Halted) => Cancelled,
        ("pause" | "resume" | "approve" | "cancel", s) => {
            return Err(conflict(format!("cannot {action} a rollout that is {s}")));
        }
        _ => {
            return Err(ApiError::not_found(format!(
                "no action {action:?}: pause, resume, approve or cancel"
            )));
        }
    };
    state.store().update_rollout(&r).await?;
    state
        .audited(
            actor,
            action,
            &format!("rollout {}", r.id),
            &format!("now {}", r.state),
        )
        .await;
    state.inner.rollouts.put_rollout(r.clone());
    if r.state == Cancelled {
        // Members of a cancelled rollout keep what they run; nobody new is offered anything.
        state.refresh_rollouts().await?;
    }
    state.inner.catalog.invalidate_settings();
    Ok(r)
}

#[utoipa::path(post, path = "/api/v1/products/{product}/rollouts/{rollout}/{action}", tag = "rollouts",
    security(("bearer" = [])),
    params(("product" = i64, Path), ("rollout" = i64, Path),
        ("action" = String, Path, description = "pause, resume, approve or cancel")),
    responses((status = 200, body = RolloutBody), crate::openapi::Refusals))]
pub async fn act(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, rollout, action)): ApiPath<(Id, Id, String)>,
) -> ApiResult<axum::Json<RolloutBody>> {
    let r = apply_action(&state, &op.actor()?, product, rollout, &action).await?;
    Ok(axum::Json(RolloutBody::of(&state, &r).await?))
}

#[utoipa::path(get, path = "/api/v1/products/{product}/devices/{serial}/events", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path), ("serial" = String, Path), PageQuery),
    responses((status = 200, body = Page<DeviceEvent>), crate::openapi::Refusals))]
pub async fn events(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<axum::Json<Page<DeviceEvent>>> {
    let device = state.store().get_device(product, &serial).await?;
    let limit = crate::page::limit(query.limit)?;
    let before = crate::page::decode::<Id>(query.cursor.as_deref())?;
    let rows = state
        .store()
        .device_events(device.id, before, limit + 1)
        .await?;
    Ok(axum::Json(crate::page::of(rows, limit, |e| e.id, |e| e)))
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = Page<AuditEntry>), crate::openapi::Refusals))]
pub async fn audit(
    State(state): State<AppState>,
    _op: Operator,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<axum::Json<Page<AuditEntry>>> {
    let limit = crate::page::limit(query.limit)?;
    let before = crate::page::decode::<Id>(query.cursor.as_deref())?;
    let rows = state.store().audit_log(before, limit + 1).await?;
    Ok(axum::Json(crate::page::of(rows, limit, |e| e.id, |e| e)))
}

//! Rollouts as plain functions: who is in which stage (deterministic, visible before the
//! start) and what a stage's gates say. No I/O, no clock: time comes in as numbers.

use std::collections::HashMap;

use otaforge_protocol::UpdateResult;

use crate::model::{Id, MemberState, StageSize, StageSpec};
use sha2::{Digest, Sha256};

/// The prime the fleet order is taken modulo: larger than any device id (ids are below 2^32).
pub const ORDER_PRIME: i64 = 4_294_967_311;

/// The order a rollout's seed puts devices in: by `(id * multiplier + offset) % ORDER_PRIME`,
/// then id. A permutation of the ids (the multiplier is below the prime), different for each
/// seed, and one the database computes with integer arithmetic both SQLite and PostgreSQL
/// have (the multiplier is below 2^31, so nothing overflows for ids below 2^32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetOrder {
    pub multiplier: i64,
    pub offset: i64,
}

impl FleetOrder {
    pub fn of_seed(seed: &str) -> FleetOrder {
        let h = Sha256::digest(seed.as_bytes());
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or([0; 8]));
        FleetOrder {
            multiplier: 1 + (word(0) % ((1u64 << 31) - 1)) as i64,
            offset: (word(8) % ORDER_PRIME as u64) as i64,
        }
    }

    /// A device's place (smaller first; ties by id).
    pub fn key(self, id: Id) -> i64 {
        ((id as i128 * self.multiplier as i128 + self.offset as i128) % ORDER_PRIME as i128) as i64
    }
}

/// How many of `total` devices each stage takes, in order: counts and percentages of the
/// fleet as far as devices remain, "rest" what remains.
pub fn stage_sizes(total: u64, stages: &[StageSpec]) -> Vec<u64> {
    let mut next = 0u64;
    stages
        .iter()
        .map(|stage| {
            let remaining = total - next;
            let want = match stage.size {
                StageSize::Count(n) => n,
                StageSize::Percent(p) => {
                    ((p.clamp(0.0, 100.0) / 100.0) * total as f64).ceil() as u64
                }
                StageSize::Rest => remaining,
            }
            .min(remaining);
            next += want;
            want
        })
        .collect()
}

/// Splits devices into stages: the fleet in the seed's order (`FleetOrder`), cut by
/// `stage_sizes`. The database plans real rollouts the same way; this is its reference.
/// Returns, per stage, the chosen device ids (stages may be empty).
pub fn plan(seed: &str, devices: &[(Id, String)], stages: &[StageSpec]) -> Vec<Vec<Id>> {
    let order = FleetOrder::of_seed(seed);
    let mut ids: Vec<(i64, Id)> = devices
        .iter()
        .map(|(id, _)| (order.key(*id), *id))
        .collect();
    ids.sort();
    let mut next = 0usize;
    stage_sizes(ids.len() as u64, stages)
        .into_iter()
        .map(|n| {
            let stage = ids[next..next + n as usize]
                .iter()
                .map(|(_, id)| *id)
                .collect();
            next += n as usize;
            stage
        })
        .collect()
}

/// Checks a stage list before a rollout starts; the message names the problem.
pub fn check_stages(stages: &[StageSpec]) -> Result<(), String> {
    if stages.is_empty() || stages.len() > 20 {
        return Err("a rollout has 1 to 20 stages".into());
    }
    for (i, s) in stages.iter().enumerate() {
        let n = i + 1;
        if let StageSize::Percent(p) = s.size
            && !(p > 0.0 && p <= 100.0)
        {
            return Err(format!("stage {n}: percent must be in (0, 100]"));
        }
        if let StageSize::Count(0) = s.size {
            return Err(format!("stage {n}: count must be at least 1"));
        }
        if matches!(s.size, StageSize::Rest) && n != stages.len() {
            return Err(format!("stage {n}: \"rest\" can only be the last stage"));
        }
        for (name, v) in [
            ("success_threshold", s.success_threshold),
            ("failure_threshold", s.failure_threshold),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("stage {n}: {name} must be between 0 and 1"));
            }
        }
        if s.failure_threshold == 0.0 {
            return Err(format!(
                "stage {n}: failure_threshold 0 would halt before any device updates"
            ));
        }
        if s.window_secs > 30 * 24 * 3600 {
            return Err(format!("stage {n}: window_secs is at most 30 days"));
        }
    }
    Ok(())
}

/// Member counts of one stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageCounts {
    pub total: u64,
    pub pending: u64,
    pub offered: u64,
    pub downloaded: u64,
    pub succeeded: u64,
    pub rolled_back: u64,
    pub failed: u64,
}

impl StageCounts {
    pub fn add(&mut self, state: MemberState) {
        self.add_many(state, 1);
    }

    /// `n` members in `state`.
    pub fn add_many(&mut self, state: MemberState, n: u64) {
        self.total += n;
        *match state {
            MemberState::Pending => &mut self.pending,
            MemberState::Offered => &mut self.offered,
            MemberState::Downloaded => &mut self.downloaded,
            MemberState::Succeeded => &mut self.succeeded,
            MemberState::RolledBack => &mut self.rolled_back,
            MemberState::Failed => &mut self.failed,
        } += n;
    }

    pub fn bad(&self) -> u64 {
        self.rolled_back + self.failed
    }
}

/// Counts per stage from members' (stage, state).
pub fn count(members: impl IntoIterator<Item = (i64, MemberState)>) -> HashMap<i64, StageCounts> {
    tally(members.into_iter().map(|(stage, state)| (stage, state, 1)))
}

/// Counts per stage from (stage, state, how many), as the database counts them.
pub fn tally(rows: impl IntoIterator<Item = (i64, MemberState, i64)>) -> HashMap<i64, StageCounts> {
    let mut out: HashMap<i64, StageCounts> = HashMap::new();
    for (stage, state, n) in rows {
        out.entry(stage)
            .or_default()
            .add_many(state, n.max(0) as u64);
    }
    out
}

/// What the gates of the running stage say.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Keep going.
    Wait,
    /// Gates passed: move to the next stage (or finish after the last).
    Advance,
    /// Gates passed but the stage wants an operator's approval.
    AwaitApproval,
    /// Too many failures: stop, rolling the stage back if it says so.
    Halt { rollback: bool, reason: String },
}

/// Judges a stage: halt when rolled-back plus failed devices reach the failure threshold;
/// advance when the success share is reached and the stage has run for its window. An empty
/// stage passes at once.
pub fn evaluate(spec: &StageSpec, counts: &StageCounts, elapsed_secs: u64) -> Verdict {
    if counts.total == 0 {
        return if spec.auto_advance {
            Verdict::Advance
        } else {
            Verdict::AwaitApproval
        };
    }
    let total = counts.total as f64;
    let bad = counts.bad() as f64 / total;
    if bad >= spec.failure_threshold {
        return Verdict::Halt {
            rollback: spec.auto_rollback,
            reason: format!(
                "{} of {} devices rolled back or failed ({:.0}% >= {:.0}%)",
                counts.bad(),
                counts.total,
                bad * 100.0,
                spec.failure_threshold * 100.0
            ),
        };
    }
    let good = counts.succeeded as f64 / total;
    if good >= spec.success_threshold && elapsed_secs >= spec.window_secs {
        if spec.auto_advance {
            Verdict::Advance
        } else {
            Verdict::AwaitApproval
        }
    } else {
        Verdict::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: StageSize) -> StageSpec {
        StageSpec {
            size,
            success_threshold: 0.9,
            failure_threshold: 0.2,
            window_secs: 60,
            auto_advance: true,
            auto_rollback: true,
        }
    }

    fn fleet(n: usize) -> Vec<(Id, String)> {
        (0..n).map(|i| (i as Id, format!("dev{i}"))).collect()
    }

    #[test]
    fn ten_then_three_hundred_then_the_rest() {
        let stages = [
            spec(StageSize::Count(10)),
            spec(StageSize::Count(300)),
            spec(StageSize::Rest),
        ];
        let plan1 = plan("r1", &fleet(2000), &stages);
        assert_eq!(
            plan1.iter().map(Vec::len).collect::<Vec<_>>(),
            [10, 300, 1690]
        );
        let mut all: Vec<Id> = plan1.concat();
        all.sort();
        assert_eq!(
            all,
            (0..2000).collect::<Vec<Id>>(),
            "every device exactly once"
        );
        // Deterministic, and a different rollout picks a different first ten.
        assert_eq!(plan("r1", &fleet(2000), &stages), plan1);
        assert_ne!(plan("r2", &fleet(2000), &stages)[0], plan1[0]);
        // Small fleets: stages shrink, none overflows.
        let small = plan("r1", &fleet(15), &stages);
        assert_eq!(small.iter().map(Vec::len).collect::<Vec<_>>(), [10, 5, 0]);
        let pct = plan(
            "r1",
            &fleet(1000),
            &[
                spec(StageSize::Percent(1.0)),
                spec(StageSize::Percent(25.0)),
                spec(StageSize::Rest),
            ],
        );
        assert_eq!(pct.iter().map(Vec::len).collect::<Vec<_>>(), [10, 250, 740]);
    }

    #[test]
    fn gates() {
        let s = spec(StageSize::Count(10));
        let mut c = StageCounts {
            total: 10,
            succeeded: 9,
            pending: 1,
            ..Default::default()
        };
        assert_eq!(
            evaluate(&s, &c, 30),
            Verdict::Wait,
            "the window has not passed"
        );
        assert_eq!(evaluate(&s, &c, 60), Verdict::Advance);
        c.succeeded = 7;
        c.rolled_back = 2;
        c.pending = 1;
        assert!(matches!(
            evaluate(&s, &c, 0),
            Verdict::Halt { rollback: true, .. }
        ));
        let manual = StageSpec {
            auto_advance: false,
            ..s.clone()
        };
        let ok = StageCounts {
            total: 10,
            succeeded: 10,
            ..Default::default()
        };
        assert_eq!(evaluate(&manual, &ok, 100), Verdict::AwaitApproval);
        assert_eq!(evaluate(&s, &StageCounts::default(), 0), Verdict::Advance);
    }

    #[test]
    fn stage_checks() {
        assert!(check_stages(&[spec(StageSize::Rest), spec(StageSize::Count(1))]).is_err());
        assert!(check_stages(&[spec(StageSize::Percent(0.0))]).is_err());
        assert!(check_stages(&[spec(StageSize::Count(0))]).is_err());
        assert!(check_stages(&[]).is_err());
        assert!(check_stages(&[spec(StageSize::Count(10)), spec(StageSize::Rest)]).is_ok());
    }
}

/// A member's move, as a conditional update: from one of `from` to `to`, so that however
/// often a device reports the same thing it is counted once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: &'static [MemberState],
    pub to: MemberState,
}

impl Transition {
    /// The timeline event this move writes.
    pub fn event(&self) -> &'static str {
        match self.to {
            MemberState::Succeeded => "installed",
            MemberState::RolledBack => "rolled-back",
            MemberState::Failed => "failed",
            MemberState::Offered => "offered",
            MemberState::Downloaded => "downloaded",
            MemberState::Pending => "pending",
        }
    }
}

/// What a member's check-in means for it: running the rollout's firmware is a success (from
/// any offered state, also after a rollback); a device that says it rolled back, or comes
/// back on the old firmware after the whole new image was served (its stage not returned to
/// the previous firmware on purpose), rolled back; one that says it failed, failed.
/// `runs_target`: `None` when the device did not say what it runs (a hawkBit poll or
/// progress feedback between download and its closing report): that is no sign of a
/// rollback.
pub fn member_transition(
    state: MemberState,
    runs_target: Option<bool>,
    result: Option<&UpdateResult>,
    stage_rolled_back: bool,
) -> Option<Transition> {
    use MemberState::*;
    let t = if runs_target == Some(true) {
        Transition {
            from: &[Offered, Downloaded, RolledBack, Failed],
            to: Succeeded,
        }
    } else if matches!(result, Some(UpdateResult::RolledBack { .. }))
        || (state == Downloaded && runs_target == Some(false) && !stage_rolled_back)
    {
        Transition {
            from: &[Offered, Downloaded],
            to: RolledBack,
        }
    } else if matches!(result, Some(UpdateResult::Failed { .. })) {
        Transition {
            from: &[Offered, Downloaded],
            to: Failed,
        }
    } else {
        return None;
    };
    (state != t.to && t.from.contains(&state)).then_some(t)
}

#[cfg(test)]
mod transition_tests {
    use super::*;
    use MemberState::*;

    #[test]
    fn the_member_table() {
        let failed = UpdateResult::Failed {
            reason: "md5".into(),
        };
        let back = UpdateResult::RolledBack {
            version: "1.0".into(),
        };
        let to = |s, runs, r: Option<&UpdateResult>, rb| {
            member_transition(s, Some(runs), r, rb).map(|t| t.to)
        };
        assert_eq!(
            member_transition(Downloaded, None, None, false).map(|t| t.to),
            None,
            "a device that does not say what it runs has not come back on the old firmware"
        );
        assert_eq!(
            member_transition(Downloaded, None, Some(&failed), false).map(|t| t.to),
            Some(Failed)
        );
        assert_eq!(to(Offered, true, None, false), Some(Succeeded));
        assert_eq!(to(RolledBack, true, None, false), Some(Succeeded));
        assert_eq!(to(Succeeded, true, None, false), None, "counted once");
        assert_eq!(to(Pending, true, None, false), None, "never offered");
        assert_eq!(to(Downloaded, false, None, false), Some(RolledBack));
        assert_eq!(
            to(Downloaded, false, None, true),
            None,
            "returned on purpose"
        );
        assert_eq!(to(Offered, false, Some(&back), false), Some(RolledBack));
        assert_eq!(to(Offered, false, Some(&failed), false), Some(Failed));
        assert_eq!(to(Offered, false, None, false), None, "still downloading");
        assert_eq!(to(Failed, false, Some(&failed), false), None);
        assert_eq!(
            member_transition(Offered, Some(true), None, false)
                .unwrap()
                .event(),
            "installed"
        );
    }
}

//! The launcher's state machine: every state with the data it carries, and every transition,
//! as pure functions (no I/O, no clock: the caller passes `now`). The supervisor asks
//! [`step`] what an input means in the current state, performs the effects it names (stop or
//! resume the app's tree, start a job), and only then takes the new state; a refusal leaves the
//! state as it was and says why with a [`Refusal`] code the plugin decides on.
//!
//! ```text
//!                 freeze                   checkpoint                 ok, not --leave-running
//!   Running ───────────────▶ Frozen ───────────────▶ Checkpointing ─────────────────▶ Checkpointed
//!     ▲  │ checkpoint          │ thaw/rollback/        │ failed, or --leave-running      │
//!     │  └─────────────────────┼─ lease expired ───────┼──▶ back where it came from      │
//!     └────────────────────────┴───────────────────────┴─────────────────────────────────┘
//!                                                         rollback / lease expired
//!   Waiting/Failed ──receive──▶ Restoring ──▶ Running (restored) | Failed | Running (fresh)
//! ```
//! A frozen app is held by a [`Hold`]: open (thaw or rollback resumes it), a lease (it resumes
//! by itself at that instant unless renewed or committed) or committed (the migration moved it;
//! this copy is stale and only an explicit rollback resumes it, never a thaw or a lease).

use std::time::{Duration, Instant};

use migrate_format::{LauncherState, Refusal};

/// How the app now supervised came to life; a resumed app goes back to this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Started fresh from the image's command.
    Fresh,
    /// Restored from a checkpoint.
    Restored,
}

/// What keeps a frozen app frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Until `thaw` or `rollback` (a freeze without a lease, or `checkpoint` alone).
    Open,
    /// Until `until`, unless renewed or committed: then it resumes by itself. Renewals never
    /// carry it past `limit`, the longest the app may stay frozen (what its liveness probes
    /// allow): a driver that keeps renewing, or that died, cannot keep it frozen until the
    /// kubelet restarts the container and its state is lost.
    Lease {
        until: Instant,
        limit: Option<Instant>,
    },
    /// The migration is committed: never resumes on its own.
    Committed,
    /// A lease that ran out while a checkpoint job held the app: the job was told to stop,
    /// and the app resumes as soon as it ended.
    Expired,
}

/// The launcher's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started with `--wait-for-checkpoint`: no app yet.
    Waiting,
    /// The last restore failed; `receive` may be tried again.
    Failed,
    /// A restore job runs; `at_start` when it was asked at start (`--restore-from`).
    Restoring { at_start: bool },
    /// The app runs (or, restored from a frozen checkpoint, waits for `thaw`).
    Running { origin: Origin },
    /// The app's tree is stopped by `freeze`.
    Frozen { origin: Origin, hold: Hold },
    /// A checkpoint job runs. `frozen` is the hold of a freeze that came before it.
    Checkpointing {
        origin: Origin,
        frozen: Option<Hold>,
        leave_running: bool,
    },
    /// The app is frozen after a checkpoint; its state is in the archive.
    Checkpointed { origin: Origin, hold: Hold },
}

/// What happens to the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Freeze {
        lease: Option<Duration>,
        /// The longest the app may stay frozen, whatever the renewals, unless committed.
        limit: Option<Duration>,
    },
    Renew {
        lease: Duration,
    },
    Commit,
    Thaw,
    /// `committed`: also resume a copy whose migration committed (`rollback --committed`),
    /// which the plugin asks only once the target provably holds no copy of the app.
    Rollback {
        committed: bool,
    },
    Checkpoint {
        leave_running: bool,
    },
    Receive,
    /// The checkpoint job ended: `ok` with a confirmed archive; `died` when it ended without
    /// a word (the app's state is then unknown to it, so it must be resumed).
    CheckpointEnded {
        ok: bool,
        died: bool,
    },
    /// The restore job ended. `fresh_on_failure`: `--on-restore-failure=fresh`.
    RestoreEnded {
        ok: bool,
        fresh_on_failure: bool,
    },
    /// Time passed (a lease may have expired).
    Tick,
}

/// Something the supervisor must do for a transition to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// SIGSTOP the app's whole tree (the transition is refused if that fails).
    StopTree,
    /// SIGCONT the app's whole tree.
    ResumeTree,
    /// Tell the running checkpoint job to stop writing its archive now.
    CancelCheckpoint,
    /// Start a checkpoint job (the transition is refused if it cannot start).
    StartCheckpoint {
        leave_running: bool,
        was_frozen: bool,
    },
    /// Start a restore job from the received stream.
    StartRestore,
    /// Start the app fresh from the image's command (after a failed restore).
    StartFresh,
    /// Exit with the restore-failed code: a restore asked at start failed.
    ExitRestoreFailed,
    /// Record in the pod that its app moved away (`moved`): a restarted container of this
    /// pod must not start it fresh.
    RecordMoved,
    /// Remove that record: the committed copy resumed and holds the app again.
    ClearMoved,
    /// Hold the stopped app under ptrace, so that no SIGCONT resumes a checkpointed or
    /// committed copy (`crate::hold`). A commit is refused if any process of the app runs
    /// again.
    HoldTree,
}

/// What an input leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The state once the effects are done.
    pub next: State,
    pub effects: Vec<Effect>,
    /// `Err` for a refused request (then `next` is the current state).
    pub answer: Result<(), Refusal>,
}

impl Step {
    fn to(next: State, effects: Vec<Effect>) -> Self {
        Step {
            next,
            effects,
            answer: Ok(()),
        }
    }

    fn refuse(state: State, refusal: Refusal) -> Self {
        Step {
            next: state,
            effects: Vec::new(),
            answer: Err(refusal),
        }
    }
}

impl State {
    /// The state as `status` reports it.
    pub fn reported(self) -> LauncherState {
        match self {
            State::Waiting => LauncherState::Waiting,
            State::Failed => LauncherState::Failed,
            State::Restoring { .. } => LauncherState::Restoring,
            State::Running {
                origin: Origin::Fresh,
            } => LauncherState::Running,
            State::Running {
                origin: Origin::Restored,
            } => LauncherState::Restored,
            State::Frozen { .. } => LauncherState::Frozen,
            State::Checkpointing { .. } => LauncherState::Checkpointing,
            State::Checkpointed { .. } => LauncherState::Checkpointed,
        }
    }

    /// The hold on a frozen app, if it is held.
    pub fn hold(self) -> Option<Hold> {
        match self {
            State::Frozen { hold, .. } | State::Checkpointed { hold, .. } => Some(hold),
            State::Checkpointing { frozen, .. } => frozen,
            _ => None,
        }
    }

    /// When the app resumes by itself, if a lease holds it.
    pub fn lease(self) -> Option<Instant> {
        match self.hold() {
            Some(Hold::Lease { until, .. }) => Some(until),
            _ => None,
        }
    }

    /// Whether the migration holding the app is committed.
    pub fn committed(self) -> bool {
        self.hold() == Some(Hold::Committed)
    }

    /// Whether a job (checkpoint or restore) runs.
    pub fn busy(self) -> bool {
        matches!(self, State::Checkpointing { .. } | State::Restoring { .. })
    }
}

/// How a freeze ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeEnd {
    /// Its migration committed; the copy was resumed on the way back (`rollback --committed`).
    Committed,
    /// Without a commit: thawed, rolled back, its lease or limit ran out, its checkpoint died.
    /// Its migration can never commit any more.
    Uncommitted,
}

/// Whether the transition from `before` to `after` ended a freeze (the app held frozen runs
/// again), and how.
pub fn freeze_ended(before: State, after: State) -> Option<FreezeEnd> {
    match (before.hold(), after) {
        (Some(hold), State::Running { .. }) => Some(if hold == Hold::Committed {
            FreezeEnd::Committed
        } else {
            FreezeEnd::Uncommitted
        }),
        _ => None,
    }
}

/// What `input` does in `state` at `now`.
pub fn step(state: State, input: Input, now: Instant) -> Step {
    use State as S;
    match (state, input) {
        // ----- requests that need a running app -------------------------------------------
        (S::Running { origin }, Input::Freeze { lease, limit }) => Step::to(
            S::Frozen {
                origin,
                hold: held(lease, limit, now),
            },
            vec![Effect::StopTree],
        ),
        (S::Running { origin }, Input::Checkpoint { leave_running }) => Step::to(
            S::Checkpointing {
                origin,
                frozen: None,
                leave_running,
            },
            vec![Effect::StartCheckpoint {
                leave_running,
                was_frozen: false,
            }],
        ),
        (S::Frozen { origin, hold }, Input::Checkpoint { leave_running }) => {
            if expired(hold, now) {
                return Step::refuse(state, Refusal::LeaseExpired);
            }
            // A committed copy is stale: nothing may be taken from it (and a checkpoint job
            // that dies would otherwise resume it).
            if hold == Hold::Committed {
                return Step::refuse(state, Refusal::Committed);
            }
            Step::to(
                S::Checkpointing {
                    origin,
                    frozen: Some(hold),
                    leave_running,
                },
                vec![Effect::StartCheckpoint {
                    leave_running,
                    was_frozen: true,
                }],
            )
        }
        // ----- a frozen app: lease, commit, thaw, rollback --------------------------------
        (S::Frozen { origin, hold }, Input::Renew { lease }) => match renewed(hold, lease, now) {
            Ok(hold) => Step::to(S::Frozen { origin, hold }, vec![]),
            Err(refusal) => Step::refuse(state, refusal),
        },
        (S::Checkpointed { origin, hold }, Input::Renew { lease }) => {
            match renewed(hold, lease, now) {
                Ok(hold) => Step::to(S::Checkpointed { origin, hold }, vec![]),
                Err(refusal) => Step::refuse(state, refusal),
            }
        }
        (
            S::Checkpointing {
                origin,
                frozen: Some(hold),
                leave_running,
            },
            Input::Renew { lease },
        ) => match renewed(hold, lease, now) {
            Ok(hold) => Step::to(
                S::Checkpointing {
                    origin,
                    frozen: Some(hold),
                    leave_running,
                },
                vec![],
            ),
            Err(refusal) => Step::refuse(state, refusal),
        },
        (S::Frozen { origin, hold }, Input::Commit) => {
            if expired(hold, now) {
                return Step::refuse(state, Refusal::LeaseExpired);
            }
            Step::to(
                S::Frozen {
                    origin,
                    hold: Hold::Committed,
                },
                vec![Effect::HoldTree, Effect::RecordMoved],
            )
        }
        (S::Checkpointed { origin, hold }, Input::Commit) => {
            if expired(hold, now) {
                return Step::refuse(state, Refusal::LeaseExpired);
            }
            Step::to(
                S::Checkpointed {
                    origin,
                    hold: Hold::Committed,
                },
                vec![Effect::HoldTree, Effect::RecordMoved],
            )
        }
        // Post-copy (`--lazy`): the checkpoint job serves the app's memory until the target
        // has all of it, which is after the migration commits. CRIU holds the app meanwhile;
        // PID 1 holds it once the job ended.
        (
            S::Checkpointing {
                origin,
                frozen: Some(hold),
                leave_running,
            },
            Input::Commit,
        ) => {
            if expired(hold, now) {
                return Step::refuse(state, Refusal::LeaseExpired);
            }
            Step::to(
                S::Checkpointing {
                    origin,
                    frozen: Some(Hold::Committed),
                    leave_running,
                },
                vec![Effect::RecordMoved],
            )
        }
        (
            S::Frozen {
                hold: Hold::Committed,
                ..
            },
            Input::Thaw,
        ) => Step::refuse(state, Refusal::Committed),
        (S::Frozen { origin, .. }, Input::Thaw) | (S::Running { origin }, Input::Thaw) => {
            Step::to(S::Running { origin }, vec![Effect::ResumeTree])
        }
        // A committed copy is stale while the target holds the app: resuming it would make two.
        (
            S::Frozen {
                hold: Hold::Committed,
                ..
            }
            | S::Checkpointed {
                hold: Hold::Committed,
                ..
            },
            Input::Rollback { committed: false },
        ) => Step::refuse(state, Refusal::Committed),
        (S::Frozen { origin, hold } | S::Checkpointed { origin, hold }, Input::Rollback { .. }) => {
            let mut effects = vec![Effect::ResumeTree];
            if hold == Hold::Committed {
                effects.push(Effect::ClearMoved);
            }
            Step::to(S::Running { origin }, effects)
        }
        // A committed post-copy job serves the memory the target's app runs on: only the way
        // back (`--committed`, once the target holds no copy) may stop it.
        (
            S::Checkpointing {
                frozen: Some(Hold::Committed),
                ..
            },
            Input::Rollback { committed: false },
        ) => Step::refuse(state, Refusal::Committed),
        (S::Checkpointing { .. }, Input::Rollback { .. }) => Step {
            next: state,
            effects: vec![Effect::CancelCheckpoint],
            answer: Err(Refusal::Busy),
        },
        // ----- a lease that ran out --------------------------------------------------------
        (S::Frozen { origin, hold } | S::Checkpointed { origin, hold }, Input::Tick)
            if expired(hold, now) =>
        {
            Step::to(S::Running { origin }, vec![Effect::ResumeTree])
        }
        // During a checkpoint too (its driver died mid-transfer): the job is told to stop, and
        // the app resumes when it ended, before a liveness probe would restart it.
        (
            S::Checkpointing {
                origin,
                frozen: Some(hold),
                leave_running,
            },
            Input::Tick,
        ) if expired(hold, now) && hold != Hold::Expired => Step::to(
            S::Checkpointing {
                origin,
                frozen: Some(Hold::Expired),
                leave_running,
            },
            vec![Effect::CancelCheckpoint],
        ),
        (_, Input::Tick) => Step::to(state, vec![]),
        // ----- jobs ending ------------------------------------------------------------------
        (
            S::Checkpointing {
                origin,
                frozen,
                leave_running,
            },
            Input::CheckpointEnded { ok, died },
        ) => {
            if died {
                // Never leave the app frozen without a confirmed archive, unless it is a
                // committed copy: that one is stale, and stays frozen.
                if frozen == Some(Hold::Committed) {
                    return Step::to(
                        S::Frozen {
                            origin,
                            hold: Hold::Committed,
                        },
                        vec![Effect::HoldTree],
                    );
                }
                return Step::to(S::Running { origin }, vec![Effect::ResumeTree]);
            }
            match (ok && !leave_running, frozen) {
                // Checkpointed: held from now on, so that what the archive holds is what the
                // app is until it is given up or its way back asked.
                (true, hold) => Step::to(
                    S::Checkpointed {
                        origin,
                        hold: hold.unwrap_or(Hold::Open),
                    },
                    vec![Effect::HoldTree],
                ),
                // A failed or leave-running checkpoint returns to where it came from; the job
                // resumed what it stopped itself (a frozen app stays frozen, as before; a
                // committed post-copy's is held).
                (false, Some(hold)) => Step::to(
                    S::Frozen { origin, hold },
                    if hold == Hold::Committed {
                        vec![Effect::HoldTree]
                    } else {
                        vec![]
                    },
                ),
                (false, None) => Step::to(S::Running { origin }, vec![]),
            }
        }
        (
            S::Restoring { at_start },
            Input::RestoreEnded {
                ok,
                fresh_on_failure,
            },
        ) => match (ok, fresh_on_failure, at_start) {
            (true, _, _) => Step::to(
                S::Running {
                    origin: Origin::Restored,
                },
                vec![],
            ),
            (false, true, _) => Step::to(
                S::Running {
                    origin: Origin::Fresh,
                },
                vec![Effect::StartFresh],
            ),
            (false, false, true) => Step::to(S::Failed, vec![Effect::ExitRestoreFailed]),
            (false, false, false) => Step::to(S::Failed, vec![]),
        },
        // ----- receive ----------------------------------------------------------------------
        (S::Waiting | S::Failed, Input::Receive) => {
            Step::to(S::Restoring { at_start: false }, vec![Effect::StartRestore])
        }
        // ----- everything else is refused, with the reason's code ------------------------------
        (_, input) => Step::refuse(state, refusal(state, input)),
    }
}

/// The hold of a freeze at `now`: a lease of `lease`, never past `limit`; open with neither.
fn held(lease: Option<Duration>, limit: Option<Duration>, now: Instant) -> Hold {
    let limit = limit.map(|l| now + l);
    match (lease.map(|l| now + l), limit) {
        (None, None) => Hold::Open,
        (Some(until), limit) => Hold::Lease {
            until: limit.map_or(until, |limit| until.min(limit)),
            limit,
        },
        (None, Some(limit)) => Hold::Lease {
            until: limit,
            limit: Some(limit),
        },
    }
}

/// Whether `hold` is a lease that has run out at `now`.
fn expired(hold: Hold, now: Instant) -> bool {
    match hold {
        Hold::Lease { until, .. } => now >= until,
        Hold::Expired => true,
        Hold::Open | Hold::Committed => false,
    }
}

/// `hold` renewed for `lease` from `now`, never past its limit.
fn renewed(hold: Hold, lease: Duration, now: Instant) -> Result<Hold, Refusal> {
    match hold {
        Hold::Lease { until, .. } if now >= until => Err(Refusal::LeaseExpired),
        Hold::Expired => Err(Refusal::LeaseExpired),
        Hold::Lease { limit, .. } => Ok(Hold::Lease {
            until: limit.map_or(now + lease, |limit| (now + lease).min(limit)),
            limit,
        }),
        Hold::Open | Hold::Committed => Err(Refusal::NoLease),
    }
}

/// Why `input` is refused in `state` (for the pairs [`step`] does not accept).
fn refusal(state: State, input: Input) -> Refusal {
    match input {
        _ if state.busy() => Refusal::Busy,
        Input::Rollback { .. } => Refusal::NothingToRollBack,
        Input::Receive => Refusal::NotWaiting,
        Input::Renew { .. } => Refusal::NoLease,
        Input::Thaw if state.committed() => Refusal::Committed,
        Input::Freeze { .. } if state.committed() => Refusal::Committed,
        _ => Refusal::WrongState,
    }
}

/// The sentence that goes with a refusal, for people.
pub fn explain(refusal: Refusal, request: &str, state: State) -> String {
    let state = state_name(state.reported());
    match refusal {
        Refusal::Busy => format!(
            "cannot {request}: the launcher is {state}; another checkpoint or restore is in progress, ask again once it ends"
        ),
        Refusal::NothingToRollBack => format!(
            "nothing to roll back: the launcher is {state}; rollback resumes an app frozen by `checkpoint` without --leave-running or by `freeze`"
        ),
        Refusal::WrongState if request == "commit" => format!(
            "cannot commit: the launcher is {state}, nothing is frozen (the freeze's lease expired and the app resumed, or it was never frozen)"
        ),
        Refusal::WrongState => format!(
            "cannot {request}: the launcher is {state} (freeze and checkpoint need a running app; commit a frozen one; thaw a frozen or restored one)"
        ),
        Refusal::LeaseExpired => format!(
            "cannot {request}: the freeze's lease expired and the app resumed (the migration took longer than --lease, or its driver was gone)"
        ),
        Refusal::NoLease => {
            format!("cannot {request}: no lease to renew (the launcher is {state})")
        }
        Refusal::Committed => format!(
            "cannot {request}: the migration that froze this app is committed, so this copy is stale (the target holds the app's state); only `rollback --committed` resumes it, and only once the target holds no copy (`kubectl migrate resume --from-source POD` checks that and does it)"
        ),
        Refusal::NotWaiting => format!(
            "cannot {request}: this launcher is {state} and not waiting for a checkpoint; start the target container with --wait-for-checkpoint"
        ),
        Refusal::BadRequest | Refusal::NotAllowed | Refusal::Failed | Refusal::Unreachable => {
            format!("cannot {request}: the launcher is {state}")
        }
    }
}

/// A state's name as `status` prints it.
pub fn state_name(state: LauncherState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: State = State::Running {
        origin: Origin::Fresh,
    };
    const RESTORED: State = State::Running {
        origin: Origin::Restored,
    };
    const MINUTE: Duration = Duration::from_secs(60);

    fn lease(until: Instant) -> Hold {
        Hold::Lease { until, limit: None }
    }

    fn frozen(hold: Hold) -> State {
        State::Frozen {
            origin: Origin::Fresh,
            hold,
        }
    }

    fn checkpointed(hold: Hold) -> State {
        State::Checkpointed {
            origin: Origin::Fresh,
            hold,
        }
    }

    fn checkpointing(frozen: Option<Hold>, leave_running: bool) -> State {
        State::Checkpointing {
            origin: Origin::Fresh,
            frozen,
            leave_running,
        }
    }

    /// Asserts `input` is refused in `state` with `refusal`, leaving it unchanged.
    fn refused(state: State, input: Input, refusal: Refusal, now: Instant) {
        let step = step(state, input, now);
        assert_eq!(step.answer, Err(refusal), "{input:?} in {state:?}");
        assert_eq!(step.next, state, "a refusal changed the state");
    }

    #[test]
    fn freeze_stops_a_running_app_with_or_without_a_lease() {
        let now = Instant::now();
        let with = step(
            FRESH,
            Input::Freeze {
                lease: Some(MINUTE),
                limit: None,
            },
            now,
        );
        assert_eq!(with.next, frozen(lease(now + MINUTE)));
        assert_eq!(with.effects, vec![Effect::StopTree]);
        let without = step(
            RESTORED,
            Input::Freeze {
                lease: None,
                limit: None,
            },
            now,
        );
        assert_eq!(
            without.next,
            State::Frozen {
                origin: Origin::Restored,
                hold: Hold::Open
            }
        );
        assert_eq!(without.next.reported(), LauncherState::Frozen);
    }

    #[test]
    fn freeze_is_refused_unless_the_app_runs() {
        let now = Instant::now();
        let freeze = Input::Freeze {
            lease: None,
            limit: None,
        };
        refused(frozen(Hold::Open), freeze, Refusal::WrongState, now);
        refused(frozen(Hold::Committed), freeze, Refusal::Committed, now);
        refused(checkpointing(None, false), freeze, Refusal::Busy, now);
        refused(State::Waiting, freeze, Refusal::WrongState, now);
        refused(
            State::Restoring { at_start: false },
            freeze,
            Refusal::Busy,
            now,
        );
    }

    #[test]
    fn a_lease_renews_until_it_expires_then_resumes_the_app() {
        let now = Instant::now();
        let held = frozen(lease(now + MINUTE));
        let later = now + Duration::from_secs(30);
        let renewed = step(held, Input::Renew { lease: MINUTE }, later);
        assert_eq!(renewed.next, frozen(lease(later + MINUTE)));
        assert!(renewed.effects.is_empty());
        // Not yet expired: a tick changes nothing.
        assert_eq!(step(held, Input::Tick, later).next, held);
        // Expired: the tick resumes the app, renew and commit are refused.
        let after = now + MINUTE;
        let tick = step(held, Input::Tick, after);
        assert_eq!(tick.next, FRESH);
        assert_eq!(tick.effects, vec![Effect::ResumeTree]);
        refused(
            held,
            Input::Renew { lease: MINUTE },
            Refusal::LeaseExpired,
            after,
        );
        refused(held, Input::Commit, Refusal::LeaseExpired, after);
        refused(
            held,
            Input::Checkpoint {
                leave_running: false,
            },
            Refusal::LeaseExpired,
            after,
        );
        // A checkpointed app's lease too.
        let tick = step(checkpointed(lease(now)), Input::Tick, after);
        assert_eq!(tick.next, FRESH);
        assert_eq!(tick.effects, vec![Effect::ResumeTree]);
    }

    #[test]
    fn a_freeze_that_ends_without_a_commit_is_told_apart_from_a_committed_one() {
        let now = Instant::now();
        let held = frozen(lease(now));
        let expired = step(held, Input::Tick, now + MINUTE).next;
        assert_eq!(freeze_ended(held, expired), Some(FreezeEnd::Uncommitted));
        // A checkpoint that died under a lease resumes the app: that freeze ended too.
        let dumping = State::Checkpointing {
            origin: Origin::Fresh,
            frozen: Some(lease(now + MINUTE)),
            leave_running: false,
        };
        let died = step(
            dumping,
            Input::CheckpointEnded {
                ok: false,
                died: true,
            },
            now,
        )
        .next;
        assert_eq!(freeze_ended(dumping, died), Some(FreezeEnd::Uncommitted));
        // The way back from a committed copy is not an abandoned migration.
        let committed = frozen(Hold::Committed);
        let back = step(committed, Input::Rollback { committed: true }, now).next;
        assert_eq!(freeze_ended(committed, back), Some(FreezeEnd::Committed));
        // Still frozen, or never frozen: nothing ended.
        assert_eq!(
            freeze_ended(held, step(held, Input::Commit, now).next),
            None
        );
        let plain = step(
            FRESH,
            Input::Checkpoint {
                leave_running: true,
            },
            now,
        )
        .next;
        assert_eq!(freeze_ended(plain, FRESH), None);
    }

    #[test]
    fn renewals_never_carry_a_lease_past_the_freeze_limit() {
        let now = Instant::now();
        let limit = Duration::from_secs(4);
        let freeze = step(
            FRESH,
            Input::Freeze {
                lease: Some(MINUTE),
                limit: Some(limit),
            },
            now,
        );
        let capped = Hold::Lease {
            until: now + limit,
            limit: Some(now + limit),
        };
        assert_eq!(freeze.next, frozen(capped), "the lease starts capped");
        let renewed = step(freeze.next, Input::Renew { lease: MINUTE }, now + limit / 2);
        assert_eq!(
            renewed.next,
            frozen(capped),
            "a renewal does not pass the limit"
        );
        // A short renewal still shortens it (a driver that stops renewing is noticed).
        let short = step(
            freeze.next,
            Input::Renew {
                lease: Duration::from_secs(1),
            },
            now + Duration::from_secs(1),
        );
        assert_eq!(short.next.lease(), Some(now + Duration::from_secs(2)));
        // At the limit the app resumes by itself, renewed or not; commit is refused.
        let tick = step(renewed.next, Input::Tick, now + limit);
        assert_eq!(tick.next, FRESH);
        assert_eq!(tick.effects, vec![Effect::ResumeTree]);
        refused(
            renewed.next,
            Input::Commit,
            Refusal::LeaseExpired,
            now + limit,
        );
        // A limit alone is a lease of that length; a commit within it ends it for good.
        let alone = step(
            FRESH,
            Input::Freeze {
                lease: None,
                limit: Some(limit),
            },
            now,
        );
        assert_eq!(alone.next, frozen(capped));
        let committed = step(alone.next, Input::Commit, now + Duration::from_secs(1));
        assert_eq!(committed.next, frozen(Hold::Committed));
        assert_eq!(
            step(committed.next, Input::Tick, now + MINUTE).next,
            committed.next
        );
    }

    #[test]
    fn a_limit_that_passes_mid_checkpoint_stops_the_job_then_resumes_the_app() {
        let now = Instant::now();
        let limit = Duration::from_secs(4);
        let hold = Hold::Lease {
            until: now + limit,
            limit: Some(now + limit),
        };
        let dumping = checkpointing(Some(hold), false);
        assert_eq!(step(dumping, Input::Tick, now + limit / 2).next, dumping);
        let stop = step(dumping, Input::Tick, now + limit);
        assert_eq!(stop.next, checkpointing(Some(Hold::Expired), false));
        assert_eq!(stop.effects, vec![Effect::CancelCheckpoint]);
        assert_eq!(stop.next.lease(), None, "no deadline left to wake up for");
        // Told once; the job's end brings the app back, whether it finished or not.
        assert!(
            step(stop.next, Input::Tick, now + limit * 2)
                .effects
                .is_empty()
        );
        refused(stop.next, Input::Commit, Refusal::LeaseExpired, now + limit);
        for ok in [true, false] {
            let ended = step(
                stop.next,
                Input::CheckpointEnded { ok, died: false },
                now + limit,
            );
            let tick = step(ended.next, Input::Tick, now + limit);
            assert_eq!(tick.next, FRESH, "ok: {ok}");
            assert_eq!(tick.effects, vec![Effect::ResumeTree]);
        }
        // A committed post-copy checkpoint is never cut.
        let serving = checkpointing(Some(Hold::Committed), false);
        assert_eq!(step(serving, Input::Tick, now + limit * 10).next, serving);
    }

    #[test]
    fn no_lease_to_renew_without_one_or_after_the_commit() {
        let now = Instant::now();
        let renew = Input::Renew { lease: MINUTE };
        refused(frozen(Hold::Open), renew, Refusal::NoLease, now);
        refused(frozen(Hold::Committed), renew, Refusal::NoLease, now);
        refused(FRESH, renew, Refusal::NoLease, now);
        refused(checkpointing(None, false), renew, Refusal::Busy, now);
    }

    #[test]
    fn a_lease_is_renewed_during_the_checkpoint_it_holds() {
        let now = Instant::now();
        let state = checkpointing(Some(lease(now + MINUTE)), false);
        let step = step(state, Input::Renew { lease: MINUTE }, now + MINUTE / 2);
        assert_eq!(
            step.next,
            checkpointing(Some(lease(now + MINUTE / 2 + MINUTE)), false)
        );
        // Before it runs out, a tick during the checkpoint changes nothing.
        let tick = super::step(state, Input::Tick, now + MINUTE / 2);
        assert_eq!(tick.next, state);
    }

    #[test]
    fn a_post_copy_checkpoint_takes_the_commit_and_a_failure_after_it_stays_frozen() {
        let now = Instant::now();
        let hold = lease(now + Duration::from_secs(30));
        let serving = checkpointing(Some(hold), false);
        let step = step(serving, Input::Commit, now);
        assert_eq!(step.answer, Ok(()));
        assert_eq!(step.next, checkpointing(Some(Hold::Committed), false));
        // Every page served: a committed, checkpointed copy.
        let ok = super::step(
            step.next,
            Input::CheckpointEnded {
                ok: true,
                died: false,
            },
            now,
        );
        assert_eq!(ok.next, checkpointed(Hold::Committed));
        // CRIU held the app while it served; PID 1 holds it from then on.
        assert_eq!(ok.effects, vec![Effect::HoldTree]);
        // The serving failed: still frozen and committed; only an explicit rollback resumes.
        let failed = super::step(
            step.next,
            Input::CheckpointEnded {
                ok: false,
                died: false,
            },
            now,
        );
        assert_eq!(failed.next, frozen(Hold::Committed));
        assert_eq!(failed.effects, vec![Effect::HoldTree]);
        // No commit without a freeze's hold (busy), nor after its lease ran out.
        refused(
            checkpointing(None, false),
            Input::Commit,
            Refusal::Busy,
            now,
        );
        let expired = checkpointing(Some(lease(now)), false);
        refused(expired, Input::Commit, Refusal::LeaseExpired, now);
    }

    #[test]
    fn commit_ends_the_lease_for_good() {
        let now = Instant::now();
        let committed = step(frozen(lease(now + MINUTE)), Input::Commit, now);
        assert_eq!(committed.next, frozen(Hold::Committed));
        assert_eq!(
            committed.effects,
            vec![Effect::HoldTree, Effect::RecordMoved],
            "held so that no SIGCONT resumes it, and a restart of this container must not start the app fresh"
        );
        assert!(committed.next.committed());
        // Idempotent, and no lease expiry resumes it.
        assert_eq!(
            step(committed.next, Input::Commit, now).next,
            committed.next
        );
        assert_eq!(
            step(committed.next, Input::Tick, now + MINUTE * 10).next,
            committed.next
        );
        let after_checkpoint = step(checkpointed(lease(now + MINUTE)), Input::Commit, now);
        assert_eq!(after_checkpoint.next, checkpointed(Hold::Committed));
        refused(FRESH, Input::Commit, Refusal::WrongState, now);
    }

    #[test]
    fn a_committed_copy_resumes_only_by_an_explicit_rollback() {
        let now = Instant::now();
        refused(
            frozen(Hold::Committed),
            Input::Checkpoint {
                leave_running: false,
            },
            Refusal::Committed,
            now,
        );
        // Nor is the post-copy job serving its memory stopped by a plain rollback.
        refused(
            checkpointing(Some(Hold::Committed), false),
            Input::Rollback { committed: false },
            Refusal::Committed,
            now,
        );
        // Had a checkpoint of it started, a dying job would not resume it either.
        let died = step(
            checkpointing(Some(Hold::Committed), false),
            Input::CheckpointEnded {
                ok: false,
                died: true,
            },
            now,
        );
        assert_eq!(died.next, frozen(Hold::Committed));
        assert_eq!(died.effects, vec![Effect::HoldTree]);
        refused(
            frozen(Hold::Committed),
            Input::Thaw,
            Refusal::Committed,
            now,
        );
        // A plain rollback (an undo that lost a race, a user) is refused: two copies would run.
        for state in [frozen(Hold::Committed), checkpointed(Hold::Committed)] {
            refused(
                state,
                Input::Rollback { committed: false },
                Refusal::Committed,
                now,
            );
            let rollback = step(state, Input::Rollback { committed: true }, now);
            assert_eq!(rollback.next, FRESH);
            assert_eq!(
                rollback.effects,
                vec![Effect::ResumeTree, Effect::ClearMoved],
                "the pod holds the app again: a restart may start it"
            );
        }
    }

    #[test]
    fn thaw_resumes_a_frozen_or_restored_app() {
        let now = Instant::now();
        let thaw = step(frozen(lease(now + MINUTE)), Input::Thaw, now);
        assert_eq!(thaw.next, FRESH);
        assert_eq!(thaw.effects, vec![Effect::ResumeTree]);
        // A restored app (from a frozen checkpoint) is thawed and stays "restored".
        let restored = step(RESTORED, Input::Thaw, now);
        assert_eq!(restored.next, RESTORED);
        assert_eq!(restored.effects, vec![Effect::ResumeTree]);
        refused(State::Waiting, Input::Thaw, Refusal::WrongState, now);
        refused(
            checkpointed(Hold::Open),
            Input::Thaw,
            Refusal::WrongState,
            now,
        );
        refused(checkpointing(None, false), Input::Thaw, Refusal::Busy, now);
    }

    #[test]
    fn rollback_resumes_what_a_freeze_or_checkpoint_stopped() {
        let now = Instant::now();
        for state in [frozen(Hold::Open), checkpointed(lease(now))] {
            let step = step(state, Input::Rollback { committed: false }, now);
            assert_eq!(step.next, FRESH);
            assert_eq!(step.effects, vec![Effect::ResumeTree]);
        }
        refused(
            FRESH,
            Input::Rollback { committed: false },
            Refusal::NothingToRollBack,
            now,
        );
        refused(
            State::Waiting,
            Input::Rollback { committed: false },
            Refusal::NothingToRollBack,
            now,
        );
    }

    #[test]
    fn rollback_during_a_checkpoint_cancels_its_writing_and_says_busy() {
        let now = Instant::now();
        let state = checkpointing(Some(lease(now + MINUTE)), false);
        let step = step(state, Input::Rollback { committed: false }, now);
        assert_eq!(step.answer, Err(Refusal::Busy));
        assert_eq!(step.next, state);
        assert_eq!(step.effects, vec![Effect::CancelCheckpoint]);
    }

    #[test]
    fn checkpoint_outcomes() {
        let now = Instant::now();
        let start = step(
            FRESH,
            Input::Checkpoint {
                leave_running: false,
            },
            now,
        );
        assert_eq!(start.next, checkpointing(None, false));
        assert_eq!(
            start.effects,
            vec![Effect::StartCheckpoint {
                leave_running: false,
                was_frozen: false
            }]
        );
        let hold = lease(now + MINUTE);
        let from_frozen = step(
            frozen(hold),
            Input::Checkpoint {
                leave_running: false,
            },
            now,
        );
        assert_eq!(from_frozen.next, checkpointing(Some(hold), false));
        let ended = |state, ok, died| step(state, Input::CheckpointEnded { ok, died }, now);
        // Success keeps the app frozen, with the freeze's hold.
        assert_eq!(
            ended(checkpointing(Some(hold), false), true, false).next,
            checkpointed(hold)
        );
        assert_eq!(
            ended(checkpointing(None, false), true, false).next,
            checkpointed(Hold::Open)
        );
        // --leave-running, or a failure: back where it came from.
        assert_eq!(ended(checkpointing(None, true), true, false).next, FRESH);
        assert_eq!(
            ended(checkpointing(Some(hold), false), false, false).next,
            frozen(hold)
        );
        // A job that died without a word: the app is resumed, whatever it was.
        let died = ended(checkpointing(Some(hold), false), false, true);
        assert_eq!(died.next, FRESH);
        assert_eq!(died.effects, vec![Effect::ResumeTree]);
        refused(
            checkpointing(None, false),
            Input::Checkpoint {
                leave_running: false,
            },
            Refusal::Busy,
            now,
        );
        refused(
            State::Waiting,
            Input::Checkpoint {
                leave_running: false,
            },
            Refusal::WrongState,
            now,
        );
    }

    #[test]
    fn receive_and_restore_outcomes() {
        let now = Instant::now();
        for waiting in [State::Waiting, State::Failed] {
            let step = step(waiting, Input::Receive, now);
            assert_eq!(step.next, State::Restoring { at_start: false });
            assert_eq!(step.effects, vec![Effect::StartRestore]);
        }
        refused(FRESH, Input::Receive, Refusal::NotWaiting, now);
        refused(
            State::Restoring { at_start: false },
            Input::Receive,
            Refusal::Busy,
            now,
        );
        let ended = |at_start, ok, fresh_on_failure| {
            step(
                State::Restoring { at_start },
                Input::RestoreEnded {
                    ok,
                    fresh_on_failure,
                },
                now,
            )
        };
        assert_eq!(ended(false, true, false).next, RESTORED);
        let fresh = ended(true, false, true);
        assert_eq!(fresh.next, FRESH);
        assert_eq!(fresh.effects, vec![Effect::StartFresh]);
        let at_start = ended(true, false, false);
        assert_eq!(at_start.next, State::Failed);
        assert_eq!(at_start.effects, vec![Effect::ExitRestoreFailed]);
        let again = ended(false, false, false);
        assert_eq!(again.next, State::Failed);
        assert!(again.effects.is_empty(), "waits for another receive");
    }

    #[test]
    fn every_refusal_has_a_sentence_naming_the_request() {
        for refusal in [
            Refusal::Busy,
            Refusal::WrongState,
            Refusal::LeaseExpired,
            Refusal::NoLease,
            Refusal::Committed,
            Refusal::NotWaiting,
        ] {
            assert!(explain(refusal, "commit", FRESH).contains("cannot commit"));
        }
        assert!(
            explain(Refusal::NothingToRollBack, "rollback", FRESH)
                .contains("nothing to roll back: the launcher is running")
        );
    }
}

//! Elastic training: keep going when ranks are lost, and take in new ones,
//! without restarting the job.
//!
//! The group is re-formed per membership *epoch*. Epoch `e`'s rendezvous
//! uses store keys under `kolo/e<e>/`, and its communicator id is derived
//! from the job and the epoch ([`comm_id`]), so a hello or frame from an
//! older epoch is refused by the id check every connection and frame already
//! has. Membership is agreed through the launcher's store
//! ([`membership`]), never by one rank's local view: the survivors keep
//! their relative order, rank 0 is the oldest survivor, new members come last.
//!
//! ```no_run
//! use kolo::elastic::{self, State};
//! use kolo::ReduceOp;
//! let mut state = State::new();
//! state.put("w", &[0.0f32; 4]);
//! elastic::run(&mut state, |comm, state| {
//!     while state.counter("step") < 100 {
//!         let mut w = state.get::<f32>("w").unwrap();
//!         comm.allreduce(&mut w, ReduceOp::Avg)?; // a lost peer ends the body here
//!         state.put("w", &w);
//!         state.set_counter("step", state.counter("step") + 1);
//!         state.commit(comm)?; // also notices members the launcher added
//!     }
//!     Ok(())
//! })?;
//! # Ok::<(), kolo::Error>(())
//! ```

pub mod launch;
pub mod membership;
pub mod state;
#[cfg(feature = "torch")]
mod torch;

pub use membership::{Member, Membership};
pub use state::{State, SyncStats};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::rendezvous::StoreClient;
use crate::{Communicator, ReduceOp};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The communicator id of `epoch` in the job tagged `job`: the job's upper
/// 32 bits and the epoch in the lower 32, so two epochs never share an id
/// and an error can name the epoch a stray frame came from.
///
/// ```
/// let (a, b) = (kolo::elastic::comm_id(0xabcd_0000_1234, 0), kolo::elastic::comm_id(0xabcd_0000_1234, 1));
/// assert_ne!(a, b);
/// assert_eq!(kolo::elastic::epoch_of(b), 1);
/// ```
pub fn comm_id(job: u64, epoch: u64) -> u64 {
    (job & 0xffff_ffff_0000_0000) | (epoch & 0xffff_ffff)
}

/// The epoch encoded in an elastic communicator id (see [`comm_id`]).
pub fn epoch_of(comm_id: u64) -> u64 {
    comm_id & 0xffff_ffff
}

fn random_tag() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish() | (1 << 63)
}

/// Settings of an elastic member (from `KOLO_*` variables kolorun sets).
#[derive(Debug, Clone)]
pub struct Options {
    /// Everything else (store address, timeouts); rank and size are ignored.
    pub base: Config,
    /// This member's stable id (`KOLO_MEMBER_ID`, else `KOLO_RANK`).
    pub member_id: u64,
    /// Rank at launch, for the first epoch's order (`KOLO_RANK`; new members: none).
    pub launch_rank: Option<u64>,
    /// Fewest members the job may continue with (`KOLO_MIN_NP`, default 1).
    pub min_np: usize,
    /// How long an epoch's registration stays open for members the launcher
    /// lists as alive but that have not registered (`KOLO_ELASTIC_TIMEOUT`, 30 s).
    pub register_timeout: Duration,
    /// Deadline for connecting an epoch's mesh (`KOLO_ELASTIC_CONNECT_TIMEOUT`, 10 s);
    /// a member lost during the change is noticed within it.
    pub connect_timeout: Duration,
    /// Give up after this many epochs in a row fail to form (default 20).
    pub max_epoch_attempts: usize,
    /// Print one line per membership change on stderr (`KOLO_ELASTIC_QUIET` unset).
    pub verbose: bool,
}

impl Options {
    /// Read the environment (see [`Options::from_vars`]).
    pub fn from_env() -> Result<Options> {
        Options::from_vars(|k| std::env::var(k).ok())
    }

    /// Read `KOLO_MEMBER_ID`, `KOLO_MIN_NP`, `KOLO_ELASTIC_TIMEOUT`,
    /// `KOLO_ELASTIC_CONNECT_TIMEOUT` and the store settings of [`Config`].
    ///
    /// ```
    /// let o = kolo::elastic::Options::from_vars(|k| match k {
    ///     "KOLO_RANK" => Some("2".into()),
    ///     "KOLO_SIZE" => Some("4".into()),
    ///     "KOLO_MIN_NP" => Some("2".into()),
    ///     _ => None,
    /// })?;
    /// assert_eq!((o.member_id, o.min_np), (2, 2));
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Options> {
        let vars = crate::config::Vars(&get);
        let num =
            |k: &str| -> Result<Option<u64>> { Ok(vars.int(k, 0, usize::MAX)?.map(|x| x as u64)) };
        let max = crate::config::MAX_WAIT_S;
        let secs = |k: &str, d: f64| -> Result<Duration> {
            Ok(vars.secs(k, max)?.unwrap_or(Duration::from_secs_f64(d)))
        };
        let launch_rank = num("KOLO_RANK")?;
        let member_id = num("KOLO_MEMBER_ID")?.or(launch_rank).ok_or_else(|| {
            Error::Config(
                "elastic: set KOLO_MEMBER_ID (or KOLO_RANK); start under kolorun --min-np".into(),
            )
        })?;
        // Rank and size change per epoch; the base config takes the rest.
        let base = Config::from_vars(|k| match k {
            "KOLO_RANK" | "KOLO_LOCAL_RANK" => Some("0".into()),
            "KOLO_SIZE" | "KOLO_LOCAL_SIZE" => Some("1".into()),
            _ => get(k),
        })?;
        let min_np = vars
            .int("KOLO_MIN_NP", 1, crate::config::MAX_RANKS)?
            .unwrap_or(1);
        let new_member = get("KOLO_ELASTIC_NEW").is_some_and(|v| v.trim() == "1");
        Ok(Options {
            base,
            member_id,
            launch_rank: if new_member { None } else { launch_rank },
            min_np,
            register_timeout: secs("KOLO_ELASTIC_TIMEOUT", 30.0)?,
            connect_timeout: secs("KOLO_ELASTIC_CONNECT_TIMEOUT", 10.0)?,
            max_epoch_attempts: 20,
            verbose: get("KOLO_ELASTIC_QUIET").is_none(),
        })
    }

    fn master(&self) -> String {
        format!("{}:{}", self.base.master_addr, self.base.master_port)
    }
}

/// The communicator of one epoch, handed to the body of [`run`]. It derefs to
/// [`Communicator`] for the collectives.
pub struct Comm {
    comm: Communicator,
    membership: Membership,
    client: Mutex<StoreClient>,
}

impl std::ops::Deref for Comm {
    type Target = Communicator;
    fn deref(&self) -> &Communicator {
        &self.comm
    }
}

impl Comm {
    /// The epoch of this group.
    pub fn epoch(&self) -> u64 {
        self.membership.epoch
    }
    /// The members in rank order.
    pub fn members(&self) -> &[Member] {
        &self.membership.members
    }
    /// This member's stable id.
    pub fn member_id(&self) -> u64 {
        self.membership.members[self.membership.rank].id
    }

    /// Collective: fail with [`Error::MembershipChanged`] on every rank when
    /// any rank sees a registration for the next epoch (a lost member's
    /// survivors or a new member), so all leave at the same step.
    pub fn check_membership(&self) -> Result<()> {
        let next = self.epoch() + 1;
        let local = {
            let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
            membership::next_requested(&mut c, next)?
        };
        let mut flag = [local as u8];
        self.comm.allreduce(&mut flag, ReduceOp::Max)?;
        if flag[0] > 0 {
            return Err(Error::MembershipChanged {
                rank: self.rank(),
                epoch: self.epoch(),
                detail: format!("members registered for epoch {next}"),
            });
        }
        Ok(())
    }

    /// `e` as [`Error::MembershipChanged`] when it means a member was lost
    /// (a lost peer, a timeout, an abort); other errors pass through. A frame
    /// of another epoch is named as such.
    pub fn membership_error(&self, e: Error) -> Error {
        into_membership_error(e, self.rank(), self.epoch())
    }
}

fn into_membership_error(e: Error, rank: usize, epoch: u64) -> Error {
    match e {
        Error::PeerLost { .. } | Error::Timeout { .. } | Error::Aborted { .. } => {
            Error::MembershipChanged {
                rank,
                epoch,
                detail: e.to_string(),
            }
        }
        Error::Protocol { rank, peer, detail } => Error::Protocol {
            rank,
            peer,
            detail: explain_foreign(&detail),
        },
        other => other,
    }
}

/// Name the epochs in a "frame for communicator X, this one is Y" message.
pub fn explain_foreign(detail: &str) -> String {
    let ids: Vec<u64> = detail
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter_map(|w| w.strip_prefix("0x"))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect();
    match ids.as_slice() {
        [theirs, ours, ..] if theirs >> 32 == ours >> 32 && theirs != ours => format!(
            "{detail} (a frame from membership epoch {} reached epoch {}; refused)",
            epoch_of(*theirs),
            epoch_of(*ours)
        ),
        _ => detail.to_string(),
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Config of `m`'s group for this member.
fn epoch_config(opts: &Options, m: &Membership) -> Config {
    let mut cfg = opts.base.clone();
    cfg.rank = m.rank;
    cfg.size = m.members.len();
    let host = &m.members[m.rank].host;
    cfg.local_size = m.members.iter().filter(|x| &x.host == host).count();
    cfg.local_rank = m.members[..m.rank]
        .iter()
        .filter(|x| &x.host == host)
        .count();
    cfg.serve_store = false;
    cfg.start_timeout = opts.connect_timeout;
    cfg
}

fn recoverable(e: &Error) -> bool {
    matches!(
        e,
        Error::PeerLost { .. }
            | Error::Timeout { .. }
            | Error::Aborted { .. }
            | Error::MembershipChanged { .. }
    )
}

/// [`run_with`] with [`Options::from_env`].
pub fn run<R>(state: &mut State, body: impl FnMut(&Comm, &mut State) -> Result<R>) -> Result<R> {
    run_with(&Options::from_env()?, state, body)
}

/// Run `body` in an elastic group, as `hvd.elastic.run` does: form the group
/// of the current epoch, bring every rank to the same committed `state`
/// (new members receive it), and call `body`. When the body fails because
/// the membership changed (a lost peer, a timeout, an abort, or
/// [`Error::MembershipChanged`] from [`State::commit`]), restore the last
/// commit, form the next epoch's group and call `body` again. Other errors
/// end the run; so does the group falling below `min_np` (a
/// [`Error::Rendezvous`] that says so, on every member).
pub fn run_with<R>(
    opts: &Options,
    state: &mut State,
    mut body: impl FnMut(&Comm, &mut State) -> Result<R>,
) -> Result<R> {
    let who = opts.member_id as usize;
    let mut client = StoreClient::connect_with(
        &opts.master(),
        who,
        opts.base.secret.as_ref(),
        Instant::now() + opts.base.start_timeout,
    )?;
    let job = membership::job_tag(&mut client, who, Instant::now() + opts.base.start_timeout)?;
    let mut me = Member {
        id: opts.member_id,
        age: if opts.launch_rank.is_some() {
            0
        } else {
            u64::MAX
        },
        prev_rank: opts.launch_rank.unwrap_or(u64::MAX),
        host: hostname(),
    };
    let mut epoch = membership::first_epoch(&mut client);
    let mut failed_forms = 0;
    let mut changed_at: Option<Instant> = None;
    loop {
        let m = membership::form(&mut client, opts, epoch, &mut me)?;
        epoch = m.epoch + 1;
        let cfg = epoch_config(opts, &m);
        let prefix = format!("kolo/e{}", m.epoch);
        let comm = match Communicator::init_group(cfg, &prefix, Some(comm_id(job, m.epoch))) {
            Ok(c) => c,
            Err(e) if recoverable(&e) || matches!(e, Error::Rendezvous { .. }) => {
                failed_forms += 1;
                if failed_forms >= opts.max_epoch_attempts {
                    return Err(e);
                }
                if opts.verbose {
                    eprintln!(
                        "kolo: elastic: member {}: epoch {} did not connect ({e}); trying epoch {epoch}",
                        me.id, m.epoch
                    );
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        failed_forms = 0;
        me.prev_rank = m.rank as u64;
        let ec = Comm {
            comm,
            membership: m,
            client: Mutex::new(client),
        };
        let res = state
            .sync(&ec)
            .map(|_| ())
            .and_then(|()| {
                if opts.verbose {
                    let ids: Vec<String> = ec.members().iter().map(|m| m.id.to_string()).collect();
                    let since = changed_at
                        .take()
                        .map(|t| format!(", {:.3}s after the change", t.elapsed().as_secs_f64()))
                        .unwrap_or_default();
                    let sync = state.last_sync().expect("synced");
                    eprintln!(
                        "kolo: elastic: member {} is rank {} of {} in epoch {} (members {}; state commit {}{}{})",
                        ec.member_id(),
                        ec.rank(),
                        ec.size(),
                        ec.epoch(),
                        ids.join(","),
                        sync.serial,
                        if sync.received {
                            format!(", received {} bytes from ranks {:?}", sync.bytes, sync.sources)
                        } else {
                            String::new()
                        },
                        since
                    );
                }
                body(&ec, state)
            })
            .map_err(|e| ec.membership_error(e));
        let Comm {
            comm,
            client: c,
            membership: m,
        } = ec;
        client = c.into_inner().unwrap_or_else(|p| p.into_inner());
        match res {
            Ok(r) => {
                // A member started just now must not begin the job again alone.
                let _ = client.set(membership::DONE_KEY, me.id.to_string().as_bytes());
                return Ok(r);
            }
            Err(e) if recoverable(&e) => {
                changed_at = Some(Instant::now());
                if opts.verbose {
                    eprintln!(
                        "kolo: elastic: member {} leaves epoch {}: {e}; restoring commit {}",
                        me.id,
                        m.epoch,
                        state.serial()
                    );
                }
                drop(comm); // closes every socket, so peers still waiting notice at once
                state.restore();
            }
            Err(e) => return Err(e),
        }
    }
}

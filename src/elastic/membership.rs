//! Membership agreement through the store: who belongs to epoch `e`, in which
//! rank order. Every member registers under `kolo/e<e>/`; exactly one of them
//! (the first to increment the close counter, so no compare-and-set is
//! needed) writes the closed list, and every member reads that one list, so
//! all of them agree even when their local views of who failed differ.
//!
//! Store keys (all values are text):
//!
//! | key | written by | meaning |
//! |---|---|---|
//! | `kolo/elastic/alive` | the launcher | member ids of the processes running now, `0,1,3` |
//! | `kolo/elastic/latest` | the closer | the newest closed epoch |
//! | `kolo/elastic/job` | the first registrant | random job tag (the comm ids derive from it) |
//! | `kolo/e<e>/count` | each registrant (`add`) | registrations so far |
//! | `kolo/e<e>/reg/<k>` | registrant number k | its [`Member`] record |
//! | `kolo/e<e>/close` | candidates (`add`) | the one that reads 1 closes the epoch |
//! | `kolo/e<e>/members` | the closer | `ok` and the members in rank order, or `fail` and why |
//!
//! Closing rule: a registrant closes the epoch once every member the launcher
//! lists as alive has registered (and at least `min_np` have), or once the
//! registration window has passed. A member missing from the closed list (it
//! came too late) registers for the next epoch, which the others notice at
//! their next [`crate::elastic::State::commit`].

use super::Options;
use crate::error::{Error, Result};
use crate::rendezvous::StoreClient;
use std::time::{Duration, Instant};

/// How often a registrant re-reads the store while an epoch is open.
const POLL: Duration = Duration::from_millis(20);

/// Store key of the launcher's list of live member ids.
pub const ALIVE_KEY: &str = "kolo/elastic/alive";
/// Store key of the newest closed epoch.
pub const LATEST_KEY: &str = "kolo/elastic/latest";
/// Store key set by members whose run finished: nobody may start the job over.
pub const DONE_KEY: &str = "kolo/elastic/done";
const JOB_KEY: &str = "kolo/elastic/job";
const JOB_LOCK_KEY: &str = "kolo/elastic/job_lock";

/// One member as it registers for an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable id across epochs (kolorun's `KOLO_MEMBER_ID`).
    pub id: u64,
    /// The epoch this member first registered for (smaller is older).
    pub age: u64,
    /// Its rank in the last epoch it belonged to (`u64::MAX`: none yet).
    pub prev_rank: u64,
    /// Host name, for local ranks and sizes.
    pub host: String,
}

impl Member {
    fn encode(&self) -> String {
        format!("{},{},{},{}", self.id, self.age, self.prev_rank, self.host)
    }
    fn decode(s: &str) -> Option<Member> {
        let mut it = s.splitn(4, ',');
        Some(Member {
            id: it.next()?.parse().ok()?,
            age: it.next()?.parse().ok()?,
            prev_rank: it.next()?.parse().ok()?,
            host: it.next()?.to_string(),
        })
    }
}

/// The agreed group of one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The epoch number.
    pub epoch: u64,
    /// Members in rank order: oldest survivors first, in their previous
    /// relative order, new members last.
    pub members: Vec<Member>,
    /// This member's rank (index in `members`).
    pub rank: usize,
}

/// Rank order: older members first; among equals, their previous rank; then id.
pub fn order(members: &mut [Member]) {
    members.sort_by_key(|m| (m.age, m.prev_rank, m.id));
}

fn key(epoch: u64, what: &str) -> String {
    format!("kolo/e{epoch}/{what}")
}

fn rdv(rank: usize, detail: String) -> Error {
    Error::Rendezvous { rank, detail }
}

/// Read an integer counter without changing it (absent = 0).
fn peek(c: &mut StoreClient, k: &str) -> Result<i64> {
    c.add(k, 0)
}

/// A key's value if it exists now (waits at most `wait`).
fn try_get(c: &mut StoreClient, k: &str, wait: Duration) -> Option<Vec<u8>> {
    c.get(k, Instant::now() + wait).ok()
}

/// The epoch a member that is not in any group should register for first.
pub fn first_epoch(c: &mut StoreClient) -> u64 {
    try_get(c, LATEST_KEY, Duration::ZERO)
        .and_then(|v| String::from_utf8(v).ok()?.trim().parse::<u64>().ok())
        .map_or(0, |e| e + 1)
}

/// The job tag: drawn once by the first member to ask, then read by all.
pub fn job_tag(c: &mut StoreClient, me: usize, deadline: Instant) -> Result<u64> {
    if c.add(JOB_LOCK_KEY, 1)? == 1 {
        c.set(JOB_KEY, &super::random_tag().to_le_bytes())?;
    }
    let raw = c.get(JOB_KEY, deadline)?;
    Ok(u64::from_le_bytes(raw.as_slice().try_into().map_err(
        |_| rdv(me, format!("malformed {JOB_KEY} in the store")),
    )?))
}

/// Whether anyone has registered for `epoch` (the next one): a member was
/// lost, or the launcher started a new one.
pub fn next_requested(c: &mut StoreClient, epoch: u64) -> Result<bool> {
    Ok(peek(c, &key(epoch, "count"))? > 0)
}

/// The launcher's list of live member ids, if it publishes one.
fn alive(c: &mut StoreClient) -> Option<Vec<u64>> {
    let v = try_get(c, ALIVE_KEY, Duration::ZERO)?;
    let s = String::from_utf8(v).ok()?;
    Some(
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .filter_map(|x| x.trim().parse().ok())
            .collect(),
    )
}

/// Registrations 1..=n of `epoch` that exist within `wait` (a registrant
/// that died between its increment and its record is left out).
fn registrations(c: &mut StoreClient, epoch: u64, n: i64, wait: Duration) -> Vec<Member> {
    let until = Instant::now() + wait;
    (1..=n)
        .filter_map(|k| {
            let left = until.saturating_duration_since(Instant::now());
            try_get(c, &key(epoch, &format!("reg/{k}")), left)
        })
        .filter_map(|v| Member::decode(std::str::from_utf8(&v).ok()?))
        .collect()
}

/// Register `me` for `epoch` and return the closed membership, registering
/// for later epochs while `me` is left out. `me.age` is updated to the first
/// epoch registered for when it is `u64::MAX` (a new member).
pub fn form(
    c: &mut StoreClient,
    opts: &Options,
    mut epoch: u64,
    me: &mut Member,
) -> Result<Membership> {
    let who = me.id as usize;
    for _attempt in 0..opts.max_epoch_attempts {
        if me.age == u64::MAX {
            me.age = epoch;
        }
        let k = c.add(&key(epoch, "count"), 1)?;
        c.set(&key(epoch, &format!("reg/{k}")), me.encode().as_bytes())?;
        let window = Instant::now() + opts.register_timeout;
        let members_key = key(epoch, "members");
        let closed = loop {
            if let Some(v) = try_get(c, &members_key, Duration::ZERO) {
                break v;
            }
            if let Some(by) = try_get(c, DONE_KEY, Duration::ZERO) {
                return Err(rdv(
                    who,
                    format!(
                        "member {}: the job already finished (member {} completed its run); \
                         not starting it over",
                        me.id,
                        String::from_utf8_lossy(&by)
                    ),
                ));
            }
            let n = peek(c, &key(epoch, "count"))?;
            let regs = registrations(c, epoch, n, Duration::from_millis(200));
            let live = alive(c);
            let everyone = match &live {
                Some(ids) => ids.iter().all(|id| regs.iter().any(|m| m.id == *id)),
                None => false,
            };
            let too_few_alive = live
                .as_ref()
                .is_some_and(|ids| ids.len() < opts.min_np && regs.len() >= ids.len());
            let now = Instant::now();
            if (everyone && regs.len() >= opts.min_np) || too_few_alive || now >= window {
                if c.add(&key(epoch, "close"), 1)? == 1 {
                    // The closer: snapshot every registration made so far.
                    let n = peek(c, &key(epoch, "count"))?;
                    let mut regs = registrations(c, epoch, n, Duration::from_secs(2));
                    order(&mut regs);
                    let value = if regs.len() < opts.min_np {
                        format!(
                            "fail\nonly {} member(s) registered for epoch {epoch} ({}) within {:.1}s, \
                             below the minimum of {} (--min-np); the job cannot continue",
                            regs.len(),
                            regs.iter()
                                .map(|m| m.id.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                            opts.register_timeout.as_secs_f64(),
                            opts.min_np
                        )
                    } else {
                        let mut s = String::from("ok\n");
                        for m in &regs {
                            s.push_str(&m.encode());
                            s.push('\n');
                        }
                        s
                    };
                    c.set(&members_key, value.as_bytes())?;
                    c.set(LATEST_KEY, epoch.to_string().as_bytes())?;
                    break value.into_bytes();
                }
                // Someone else closes; wait for its list.
                break c.get(&members_key, Instant::now() + opts.register_timeout + Duration::from_secs(5))
                    .map_err(|e| rdv(who, format!(
                        "epoch {epoch}: the member closing the registration did not publish the list: {e}"
                    )))?;
            }
            std::thread::sleep(POLL.min(window.saturating_duration_since(now)));
        };
        let text = String::from_utf8_lossy(&closed).into_owned();
        let (status, rest) = text.split_once('\n').unwrap_or((text.as_str(), ""));
        if status == "fail" {
            return Err(rdv(who, format!("member {}: {rest}", me.id)));
        }
        let members: Vec<Member> = rest.lines().filter_map(Member::decode).collect();
        if let Some(rank) = members.iter().position(|m| m.id == me.id) {
            return Ok(Membership {
                epoch,
                members,
                rank,
            });
        }
        // Closed without us: the next epoch takes us in.
        epoch += 1;
    }
    Err(rdv(
        who,
        format!(
            "member {}: gave up after {} epochs without forming a group",
            me.id, opts.max_epoch_attempts
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, age: u64, prev: u64) -> Member {
        Member {
            id,
            age,
            prev_rank: prev,
            host: "h".into(),
        }
    }

    #[test]
    fn order_keeps_survivors_and_puts_new_members_last() {
        // Epoch 3: ids 7 (was rank 1), 4 (was rank 0), 9 (new), 5 (was rank 2, joined in epoch 1).
        let mut v = vec![m(9, 3, u64::MAX), m(7, 0, 1), m(5, 1, 2), m(4, 0, 0)];
        order(&mut v);
        let ids: Vec<u64> = v.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![4, 7, 5, 9]);
    }

    #[test]
    fn member_record_round_trips() {
        let a = Member {
            id: 3,
            age: 2,
            prev_rank: u64::MAX,
            host: "node-1,x".into(),
        };
        assert_eq!(Member::decode(&a.encode()), Some(a));
        assert_eq!(Member::decode("x,1,2,h"), None);
    }
}

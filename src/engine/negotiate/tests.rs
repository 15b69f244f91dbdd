//! Unit tests of the negotiation state machine, over simulated ranks.

use super::*;

#[test]
fn packed_flags_count_like_the_sum() {
    let mut x = 12345u64;
    for n in 1..=6 {
        for len in [0, 1, 2, 63, 64, 65, 130, 1000] {
            let vs: Vec<Vec<i32>> = (0..n)
                .map(|_| {
                    (0..len)
                        .map(|_| {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                            (x >> 63) as i32
                        })
                        .collect()
                })
                .collect();
            let all: Vec<u8> = vs.iter().flat_map(|v| pack_flags(v)).collect();
            let want: Vec<i32> = (0..len).map(|i| vs.iter().map(|v| v[i]).sum()).collect();
            assert_eq!(count_flags(&all, n, len), want, "n={n} len={len}");
        }
    }
}

fn spec(name: &str, len: u64) -> Spec {
    Spec {
        name: name.into(),
        coll: Coll::Allreduce,
        dtype: crate::DType::F32.code(),
        op: crate::ReduceOp::Sum.code(),
        root: 0,
        shape: Shape::flat(len),
        group: None,
        compression: String::new(),
    }
}

/// Run one round over `n` simulated ranks given each rank's local view
/// and contribution; returns every rank's outcome.
fn round(states: &mut [State], locals: &[Local], contribs: &[Contribution]) -> Vec<Outcome> {
    let n = states.len();
    let vs: Vec<Vec<i32>> = (0..n).map(|r| states[r].vector(r, &locals[r])).collect();
    let mut sum = vec![0i32; vs[0].len()];
    for v in &vs {
        assert_eq!(v.len(), sum.len(), "vector lengths agree on every rank");
        for (s, x) in sum.iter_mut().zip(v) {
            *s += x;
        }
    }
    let ex = State::exchange_needed(&sum);
    states
        .iter_mut()
        .map(|s| s.apply(&sum, ex.then_some(contribs)))
        .collect()
}

fn names(o: &Outcome) -> Vec<String> {
    o.ready.iter().map(|r| r.spec().name.to_string()).collect()
}

#[test]
fn announce_then_cache() {
    let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
    let a = |name: &str| Contribution {
        announce: vec![spec(name, 4)],
        ..Default::default()
    };
    let local = || Local {
        has_content: true,
        ..Default::default()
    };
    // Ranks 0 and 1 announce "x"; rank 2 not yet: nothing ready.
    let o = round(
        &mut st,
        &[local(), local(), Local::default()],
        &[a("x"), a("x"), Contribution::default()],
    );
    assert!(o.iter().all(|o| o.ready.is_empty()));
    // Rank 2 announces: ready everywhere, then cached.
    let o = round(
        &mut st,
        &[Local::default(), Local::default(), local()],
        &[Contribution::default(), Contribution::default(), a("x")],
    );
    assert!(o.iter().all(|o| names(o) == ["x"]));
    let slot = st[0].cached(0, &spec("x", 4)).expect("cached");
    // Next step: all hold slot 0, no exchange needed.
    let held = || Local {
        held: [slot].into(),
        ..Default::default()
    };
    let o = round(&mut st, &[held(), held(), held()], &[]);
    assert!(o
        .iter()
        .all(|o| names(o) == ["x"] && o.ready[0].contributors == 3));
    // Only two hold it: not ready.
    let o = round(&mut st, &[held(), held(), Local::default()], &[]);
    assert!(o.iter().all(|o| o.ready.is_empty()));
}

#[test]
fn mismatch_reaches_every_rank_and_names_both() {
    let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
    let c = |len| Contribution {
        announce: vec![spec("w", len)],
        ..Default::default()
    };
    let l = || Local {
        has_content: true,
        ..Default::default()
    };
    let o = round(
        &mut st,
        &[l(), l(), Local::default()],
        &[c(4), c(5), Contribution::default()],
    );
    for o in &o {
        let (name, ranks, f) = &o.failed[0];
        assert_eq!(&**name, "w");
        assert_eq!(ranks, &[0, 1]);
        match f {
            Failure::Mismatch(0, 1, m) => {
                assert!(
                    m.contains("shape") && m.contains("[4]") && m.contains("[5]"),
                    "{m}"
                )
            }
            f => panic!("{f:?}"),
        }
    }
    // The late rank gets the same error, then the name is free again.
    let o = round(
        &mut st,
        &[Local::default(), Local::default(), l()],
        &[Contribution::default(), Contribution::default(), c(4)],
    );
    assert!(o
        .iter()
        .all(|o| o.failed.len() == 1 && o.failed[0].1 == [2]));
    assert_eq!(st[0].waiting().count(), 0);
}

/// A rank told of a failure that resubmits the name before a late rank
/// has announced its old submission must not be handed the old error.
#[test]
fn resubmission_waits_for_the_failed_entry_to_clear() {
    let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
    let c = |len| Contribution {
        announce: vec![spec("w", len)],
        ..Default::default()
    };
    let none = Contribution::default;
    let l = |news: bool| Local {
        has_content: news,
        ..Default::default()
    };
    let o = round(
        &mut st,
        &[l(true), l(true), l(false)],
        &[c(4), c(5), none()],
    );
    assert!(o.iter().all(|o| o.failed.len() == 1));
    // Rank 0 resubmits correctly while rank 2's old submission is late.
    let o = round(
        &mut st,
        &[l(true), l(false), l(false)],
        &[c(4), none(), none()],
    );
    assert!(o.iter().all(|o| o.failed.is_empty() && o.ready.is_empty()));
    // Rank 2's old one arrives: only rank 2 fails; rank 0's new one is
    // admitted afresh and a round follows.
    let o = round(
        &mut st,
        &[l(false), l(false), l(true)],
        &[none(), none(), c(4)],
    );
    assert!(o
        .iter()
        .all(|o| o.failed.len() == 1 && o.failed[0].1 == [2]));
    assert!(st.iter().all(|s| s.needs_round()));
    // Ranks 1 and 2 resubmit: it runs on all three.
    let o = round(
        &mut st,
        &[l(false), l(true), l(true)],
        &[none(), c(4), c(4)],
    );
    assert!(o
        .iter()
        .all(|o| o.failed.is_empty() && names(o) == ["w"] && o.ready[0].contributors == 3));
}

#[test]
fn changed_shape_evicts_the_cache_entry() {
    let mut st: Vec<State> = (0..2).map(|_| State::new(2, 8)).collect();
    let c = |len| Contribution {
        announce: vec![spec("b", len)],
        ..Default::default()
    };
    let l = || Local {
        has_content: true,
        ..Default::default()
    };
    round(&mut st, &[l(), l()], &[c(4), c(4)]);
    let slot = st[0].cached(0, &spec("b", 4)).unwrap();
    // Rank 0 holds the cached form, rank 1 announces a new shape.
    let held = Local {
        held: [slot].into(),
        ..Default::default()
    };
    let o = round(&mut st, &[held, l()], &[Contribution::default(), c(6)]);
    assert!(o
        .iter()
        .all(|o| o.ready.is_empty() && o.evicted.len() == 1 && &*o.evicted[0] == "b"));
    assert_eq!(st[1].cached(1, &spec("b", 4)), None);
    // Rank 0 re-announces its (old) shape: a mismatch on both.
    let o = round(
        &mut st,
        &[l(), Local::default()],
        &[c(4), Contribution::default()],
    );
    assert!(o
        .iter()
        .all(|o| matches!(o.failed[0].2, Failure::Mismatch(..))));
}

#[test]
fn join_lets_the_others_finish_and_counts_contributors() {
    let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
    let l = || Local {
        has_content: true,
        ..Default::default()
    };
    let join = Contribution {
        join: true,
        ..Default::default()
    };
    let a = Contribution {
        announce: vec![spec("g", 2)],
        ..Default::default()
    };
    // Rank 2 joins while ranks 0 and 1 announce g.
    let o = round(
        &mut st,
        &[l(), l(), l()],
        &[a.clone(), a.clone(), join.clone()],
    );
    assert!(o.iter().all(|o| o.ready.is_empty()));
    assert!(st.iter().all(|s| s.is_joined(2) && s.needs_round()));
    // The next round needs no news: g runs with two contributors, rank 2
    // standing in.
    let quiet = || Local::default();
    let none = Contribution::default;
    let o = round(
        &mut st,
        &[quiet(), quiet(), quiet()],
        &[none(), none(), none()],
    );
    for o in &o {
        assert_eq!(names(o), ["g"]);
        assert_eq!(o.ready[0].contributors, 2);
        assert_eq!(o.ready[0].specs[2], None);
    }
    // Ranks 0 and 1 join too; the round after completes the join, naming
    // the last rank to join.
    round(&mut st, &[l(), l(), quiet()], &[join.clone(), join, none()]);
    assert!(st.iter().all(State::needs_round));
    let o = round(
        &mut st,
        &[quiet(), quiet(), quiet()],
        &[none(), none(), none()],
    );
    assert!(o.iter().all(|o| o.join_done == Some(1)));
    assert!(st.iter().all(|s| !s.is_joined(0) && !s.needs_round()));
}

#[test]
fn groups_wait_for_all_members() {
    let mut st: Vec<State> = (0..2).map(|_| State::new(2, 8)).collect();
    let g = |name: &str| Spec {
        group: Some(("grp".into(), 2)),
        ..spec(name, 1)
    };
    let l = || Local {
        has_content: true,
        ..Default::default()
    };
    let o = round(
        &mut st,
        &[l(), l()],
        &[
            Contribution {
                announce: vec![g("a"), g("b")],
                ..Default::default()
            },
            Contribution {
                announce: vec![g("a")],
                ..Default::default()
            },
        ],
    );
    assert!(o.iter().all(|o| o.ready.is_empty()));
    let o = round(
        &mut st,
        &[Local::default(), l()],
        &[
            Contribution::default(),
            Contribution {
                announce: vec![g("b")],
                ..Default::default()
            },
        ],
    );
    assert!(o.iter().all(|o| names(o) == ["a", "b"]));
}

#[test]
fn census_names_missing_ranks_and_cancel_fails_them() {
    let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
    let l = |census| Local {
        has_content: true,
        wants_census: census,
        ..Default::default()
    };
    let c = Contribution {
        announce: vec![spec("s", 1)],
        pending: Some(vec!["s".into()]),
        ..Default::default()
    };
    let quiet = Contribution {
        pending: Some(vec![]),
        ..Default::default()
    };
    let o = round(
        &mut st,
        &[l(true), l(false), Local::default()],
        &[c.clone(), c.clone(), quiet.clone()],
    );
    for o in &o {
        let s = &o.stalls.as_ref().unwrap()[0];
        assert_eq!(
            (s.name.as_str(), &s.have[..], &s.missing[..]),
            ("s", &[0, 1][..], &[2][..])
        );
    }
    let cancel = Contribution {
        pending: Some(vec!["s".into()]),
        cancel: vec!["s".into()],
        ..Default::default()
    };
    let again = Contribution {
        pending: Some(vec!["s".into()]),
        ..Default::default()
    };
    let o = round(
        &mut st,
        &[l(true), Local::default(), Local::default()],
        &[cancel, again, quiet],
    );
    for o in &o {
        assert!(matches!(&o.failed[0], (n, r, Failure::Stalled(_)) if &**n == "s" && r == &[0, 1]));
    }
    // The name stays fenced for rank 2, whose next "s" is the stalled one.
    assert_eq!(st[2].waiting().collect::<Vec<_>>(), ["s"]);
}

/// What rank `r` sends for a new submission of `s`, as its worker would: the
/// cache slot that holds it, or else an announcement.
fn submission(st: &State, r: usize, s: Spec) -> (Local, Contribution) {
    match st.cached(r, &s) {
        Some(slot) => (
            Local {
                held: vec![slot],
                ..Default::default()
            },
            Contribution::default(),
        ),
        None => (
            Local {
                has_content: true,
                ..Default::default()
            },
            Contribution {
                announce: vec![s],
                ..Default::default()
            },
        ),
    }
}

/// Issue 23 item 8: ranks 0 and 2 give step N of "w" up after the stall
/// shutdown and submit step N+1; rank 1's late step N must fail alone, not
/// pair with their step N+1, whether "w" was cached or not.
#[test]
fn stall_cancel_fences_the_late_rank_old_step() {
    for cached in [true, false] {
        let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
        let quiet = || (Local::default(), Contribution::default());
        let go = |st: &mut [State], v: Vec<(Local, Contribution)>| {
            let (l, c): (Vec<Local>, Vec<Contribution>) = v.into_iter().unzip();
            round(st, &l, &c)
        };
        if cached {
            let v = (0..3)
                .map(|r| submission(&st[r], r, spec("w", 4)))
                .collect();
            assert!(go(&mut st, v).iter().all(|o| names(o) == ["w"]));
        }
        // Ranks 0 and 2 submit (step N, then N+1), rank 1 is late.
        let all_but_1 = |st: &[State]| -> Vec<_> {
            (0..3)
                .map(|r| match r {
                    1 => quiet(),
                    _ => submission(&st[r], r, spec("w", 4)),
                })
                .collect()
        };
        let v = all_but_1(&st);
        assert!(go(&mut st, v).iter().all(|o| o.ready.is_empty()));
        // Rank 0's stall shutdown: a census and a cancel.
        let mut v = all_but_1(&st);
        for (r, (l, c)) in v.iter_mut().enumerate() {
            l.has_content = r == 0;
            l.wants_census = r == 0;
            c.announce.clear();
            c.pending = Some(if r == 1 { vec![] } else { vec!["w".into()] });
            c.cancel = if r == 0 { vec!["w".into()] } else { vec![] };
        }
        for o in go(&mut st, v) {
            assert!(o.ready.is_empty(), "cached={cached}");
            assert!(
                matches!(&o.failed[..], [(n, r, Failure::Stalled(_))] if &**n == "w" && r == &[0, 2]),
                "cached={cached}: {:?}",
                o.failed
            );
        }
        // Step N+1 on ranks 0 and 2 (told of the failure).
        let v = all_but_1(&st);
        // What ranks 0 and 2 mark each round while it waits, as a worker does.
        let held: Vec<Vec<usize>> = v.iter().map(|(l, _)| l.held.clone()).collect();
        let o = go(&mut st, v);
        assert!(o.iter().all(|o| o.ready.is_empty() && o.failed.is_empty()));
        let with_1 = |late: (Local, Contribution)| -> Vec<_> {
            let wait = |q: usize| {
                let l = Local {
                    held: held[q].clone(),
                    ..Default::default()
                };
                (l, Contribution::default())
            };
            vec![wait(0), late, wait(2)]
        };
        // Rank 1's step N arrives: it fails, on rank 1 only, naming who gave up.
        let v = with_1(submission(&st[1], 1, spec("w", 4)));
        for o in go(&mut st, v) {
            assert!(o.ready.is_empty(), "cached={cached}: late step N paired");
            match &o.failed[..] {
                [(n, r, Failure::Stalled(s))] if &**n == "w" && r == &[1] => {
                    assert_eq!((&s.have[..], &s.missing[..]), (&[0, 2][..], &[1][..]))
                }
                f => panic!("cached={cached}: {f:?}"),
            }
        }
        // Rank 1's step N+1 pairs with theirs.
        let v = with_1(submission(&st[1], 1, spec("w", 4)));
        for o in go(&mut st, v) {
            assert!(o.failed.is_empty(), "cached={cached}: {:?}", o.failed);
            assert_eq!(names(&o), ["w"], "cached={cached}");
            assert_eq!(o.ready[0].contributors, 3);
        }
        assert!(st.iter().all(|s| s.waiting().count() == 0));
    }
}

/// A rank late past two stall shutdowns owes two cancelled steps: both fail
/// on it, and only its third submission pairs with the others' third.
#[test]
fn a_rank_late_past_two_stalls_fails_both_old_steps() {
    let mut st: Vec<State> = (0..3).map(|_| State::new(3, 0)).collect();
    let announce = |ranks: &[usize]| -> (Vec<Local>, Vec<Contribution>) {
        (0..3)
            .map(|r| match ranks.contains(&r) {
                // Nothing is cached (capacity 0): every submission announces.
                true => submission(&State::new(3, 0), r, spec("w", 4)),
                false => (Local::default(), Contribution::default()),
            })
            .unzip()
    };
    // Rank 0 cancels what ranks 0 and 2 have pending; rank 1 has nothing.
    let cancel = |st: &mut [State]| {
        let (mut l, mut c): (Vec<Local>, Vec<Contribution>) =
            (0..3).map(|_| Default::default()).unzip();
        l[0].has_content = true;
        l[0].wants_census = true;
        for (r, c) in c.iter_mut().enumerate() {
            c.pending = Some(if r == 1 { vec![] } else { vec!["w".into()] });
        }
        c[0].cancel = vec!["w".into()];
        for o in round(st, &l, &c) {
            assert!(matches!(&o.failed[..], [(_, r, Failure::Stalled(_))] if r == &[0, 2]));
        }
    };
    for _ in 0..2 {
        let (l, c) = announce(&[0, 2]);
        assert!(round(&mut st, &l, &c).iter().all(|o| o.ready.is_empty()));
        cancel(&mut st);
    }
    let (l, c) = announce(&[0, 2]);
    round(&mut st, &l, &c);
    for _ in 0..2 {
        let (l, c) = announce(&[1]);
        for o in round(&mut st, &l, &c) {
            assert!(o.ready.is_empty(), "an old step of rank 1 paired");
            assert!(matches!(&o.failed[..], [(_, r, Failure::Stalled(_))] if r == &[1]));
        }
    }
    let (l, c) = announce(&[1]);
    for o in round(&mut st, &l, &c) {
        assert!(o.failed.is_empty() && names(&o) == ["w"] && o.ready[0].contributors == 3);
    }
}

/// One round over four uncached ranks: `announce` submit "w"; with
/// `cancel`, rank 0 gives "w" up, which the ranks in it have pending.
fn four(st: &mut [State], announce: &[usize], cancel: Option<&[usize]>) -> Vec<Outcome> {
    let (mut l, mut c): (Vec<Local>, Vec<Contribution>) = (0..4)
        .map(|r| match announce.contains(&r) {
            true => submission(&st[r], r, spec("w", 4)),
            false => Default::default(),
        })
        .unzip();
    if let Some(have) = cancel {
        l[0].has_content = true;
        l[0].wants_census = true;
        c[0].cancel = vec!["w".into()];
        for (r, c) in c.iter_mut().enumerate() {
            c.pending = Some(have.contains(&r).then(|| "w".into()).into_iter().collect());
        }
    }
    round(st, &l, &c)
}

/// A round of [`four`]: who announces, who has "w" pending when rank 0
/// gives it up (if it does), and who fails.
type Step<'a> = (&'a [usize], Option<&'a [usize]>, &'a [usize]);

/// Ranks 2 and 3 are late; rank 2 catches up on step N only before ranks 0
/// and 1 give step N+1 up too. Every late step fails on its own rank, and
/// step N+2 runs on all four.
#[test]
fn each_late_rank_owes_every_step_given_up_since_it_was_told() {
    let mut st: Vec<State> = (0..4).map(|_| State::new(4, 0)).collect();
    let steps: [Step; 8] = [
        (&[0, 1], None, &[]),
        (&[], Some(&[0, 1]), &[0, 1]), // step N given up
        (&[2], None, &[2]),            // rank 2's step N
        (&[0, 1], None, &[]),
        (&[], Some(&[0, 1]), &[0, 1]), // step N+1 given up
        (&[2], None, &[2]),            // rank 2's step N+1
        (&[3], None, &[3]),            // rank 3's step N
        (&[3], None, &[3]),            // rank 3's step N+1
    ];
    for (i, (announce, cancel, fail)) in steps.into_iter().enumerate() {
        for o in four(&mut st, announce, cancel) {
            assert!(o.ready.is_empty(), "round {i}: {:?}", names(&o));
            let failed: Vec<&[usize]> = o.failed.iter().map(|f| &f.1[..]).collect();
            let want: Vec<&[usize]> = if fail.is_empty() { vec![] } else { vec![fail] };
            assert_eq!(failed, want, "round {i}");
        }
    }
    for o in four(&mut st, &[0, 1, 2, 3], None) {
        assert!(o.failed.is_empty() && names(&o) == ["w"] && o.ready[0].contributors == 4);
    }
}

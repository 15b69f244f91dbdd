//! The timing simulator against closed forms, against itself at every small
//! world size, and against the bytes the real transport puts on the wire.

mod common;

use kolo::algo::cost::Algo;
use kolo::algo::{cost, doubling, ring, Schedule};
use kolo::simulate::{bytes_per_rank, simulate, simulate_allreduce, Link, Network, Plan};
use kolo::ReduceOp;

const HEADER: f64 = kolo::transport::frame::HEADER_LEN as f64;

fn uniform(alpha: f64, bytes_per_s: f64, gamma: f64) -> Network {
    Network::uniform(
        Link {
            latency_s: alpha,
            bytes_per_s,
        },
        gamma,
    )
}

#[test]
fn ring_matches_the_closed_form_on_a_uniform_network() {
    let (alpha, bw, gamma) = (25e-6, 10e9 / 8.0, 1.0 / 8e9);
    let (beta, net) = (1.0 / bw, uniform(alpha, bw, gamma));
    for n in [2usize, 3, 4, 7, 16, 64] {
        for s in [1usize << 20, 3_000_000, 16 << 20] {
            let count = s / 4;
            let (nf, sf) = (n as f64, (count * 4) as f64);
            let want = 2.0 * (nf - 1.0) * (alpha + sf / nf * beta) + (nf - 1.0) * sf / nf * gamma;
            let got = simulate_allreduce(&net, Plan::Ring, n, count, 4)
                .unwrap()
                .time_s;
            let err = (got - want).abs() / want;
            assert!(err < 0.01, "n={n} S={s}: {got} vs {want} ({err})");
            // Headers and chunk rounding are all that separate them.
            let slack = 2.0 * (nf - 1.0) * (HEADER + 4.0) * beta + (nf - 1.0) * 4.0 * gamma;
            assert!(
                got >= want - 1e-12 && got <= want + slack + 1e-12,
                "n={n} S={s}"
            );
        }
    }
    // The explicit-schedule path gives the same answer.
    let n = 5;
    let scheds: Vec<Schedule> = (0..n).map(|r| ring::allreduce(r, n, 250_000)).collect();
    let a = simulate(&net, &scheds, 4).unwrap();
    let b = simulate_allreduce(&net, Plan::Ring, n, 250_000, 4).unwrap();
    assert_eq!(a, b);
}

#[test]
fn ring_sends_two_n_minus_one_over_n_of_the_buffer() {
    let net = uniform(1e-5, 1e9, 1e-10);
    for n in [1usize, 2, 3, 5, 8, 13, 100] {
        for count in [0usize, 1, 999, 100_003, 1 << 20] {
            let elem = 4;
            let rep = simulate_allreduce(&net, Plan::Ring, n, count, elem).unwrap();
            let ideal = 2.0 * (n as f64 - 1.0) / n as f64 * (count * elem) as f64;
            let msgs = 2 * (n - 1) as u64;
            for (r, &(payload, wire)) in rep.bytes.iter().enumerate() {
                // Up to one element of rounding per chunk sent.
                let slack = 2.0 * (n as f64 - 1.0) * elem as f64;
                assert!(
                    (payload as f64 - ideal).abs() <= slack,
                    "n={n} count={count} rank={r}: {payload} vs {ideal}"
                );
                assert_eq!(wire, payload + msgs * HEADER as u64);
            }
            if n <= 13 {
                let scheds: Vec<Schedule> = (0..n).map(|r| ring::allreduce(r, n, count)).collect();
                assert_eq!(rep.bytes, bytes_per_rank(&scheds, elem));
            }
        }
    }
}

/// Sent-bytes delta of one allreduce per rank, on real ranks over loopback.
fn wire_bytes(n: usize, count: usize, small: usize, slice: usize, algo: Option<Algo>) -> Vec<u64> {
    common::run_ranks_with(
        n,
        |cfg| {
            cfg.small_bytes = small;
            cfg.slice_bytes = slice;
            cfg.algo = algo;
            // The built-in model, as Plan::kolo uses for a config without one.
            cfg.calibrate = false;
        },
        |comm| {
            let mut v = vec![1.0f32; count];
            let before = comm.bytes_on_wire().0;
            comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
            let after = comm.bytes_on_wire().0;
            assert!(v.iter().all(|&x| x == n as f32));
            after - before
        },
    )
}

#[test]
fn predicted_bytes_equal_what_the_transport_sends() {
    let net = uniform(25e-6, 1.25e9, 1.0 / 8e9);
    let (small, slice) = (4096, 64 << 10); // bytes
    for n in [3usize, 4] {
        // 100_003 f32 is above small_bytes: the sliced ring, as comm.rs builds it.
        let count = 100_003;
        assert!(count * 4 > small);
        let scheds: Vec<Schedule> = (0..n)
            .map(|r| ring::allreduce_sliced(r, n, count, ring::slice_len(slice, n, 4)))
            .collect();
        let sim = simulate(&net, &scheds, 4).unwrap();
        assert_eq!(sim.bytes, bytes_per_rank(&scheds, 4));
        let real = wire_bytes(n, count, small, slice, Some(Algo::Ring));
        for (r, (&got, want)) in real.iter().zip(&sim.bytes).enumerate() {
            assert_eq!(got, want.1, "ring n={n} rank={r}");
        }
        assert_eq!(real.len(), n);
        let lazy = simulate_allreduce(
            &net,
            Plan::RingSliced {
                slice: ring::slice_len(slice, n, 4),
            },
            n,
            count,
            4,
        )
        .unwrap();
        assert_eq!(lazy.bytes, sim.bytes);
        // And the plan the Communicator picks by itself (the tree, for up to
        // 4 ranks on one host) sends what the simulator predicts for it.
        let mut cfg = kolo::Config::local(0, n, 0);
        cfg.small_bytes = small;
        cfg.slice_bytes = slice;
        let plan = Plan::kolo(&cfg, count, 4);
        assert!(matches!(plan, Plan::Tree { .. }), "{plan:?}");
        let auto = simulate_allreduce(&net, plan, n, count, 4).unwrap();
        let real = wire_bytes(n, count, small, slice, None);
        for (r, (&got, want)) in real.iter().zip(&auto.bytes).enumerate() {
            assert_eq!(got, want.1, "auto (tree) n={n} rank={r}");
        }

        // 100 f32 is within small_bytes: recursive doubling.
        let count = 100;
        let scheds: Vec<Schedule> = (0..n).map(|r| doubling::allreduce(r, n, count)).collect();
        let sim = simulate(&net, &scheds, 4).unwrap();
        let real = wire_bytes(n, count, small, slice, None);
        for (r, (&got, want)) in real.iter().zip(&sim.bytes).enumerate() {
            assert_eq!(got, want.1, "rd n={n} rank={r}");
        }
        assert_eq!(real.len(), n);
        assert_eq!(Plan::kolo(&cfg, count, 4), Plan::Rd);
    }
}

#[test]
fn no_algorithm_deadlocks_at_any_small_size() {
    let flat = uniform(10e-6, 1e9, 1e-10);
    let hosted = Network {
        ranks_per_host: 4,
        intra: Link {
            latency_s: 2e-6,
            bytes_per_s: 5e9,
        },
        ..flat
    };
    for n in 1..=33usize {
        for count in [0usize, 1, 7, 1000] {
            let plans = [
                Plan::Ring,
                Plan::RingSliced { slice: 64 },
                Plan::Tree { seg: 16 },
                Plan::Rhd,
                Plan::Rd,
                Plan::Binomial,
            ];
            for plan in plans {
                for net in [&flat, &hosted] {
                    let rep = simulate_allreduce(net, plan, n, count, 4)
                        .unwrap_or_else(|e| panic!("{plan:?} n={n} count={count}: {e}"));
                    assert!(rep.time_s.is_finite());
                    assert_eq!(rep.time_s > 0.0, n > 1, "{plan:?} n={n} count={count}");
                }
            }
        }
    }
}

#[test]
fn waiting_on_dependencies_costs_more_than_the_per_rank_model_says() {
    // cost::predict flatters the tree at small sizes (a leaf runs few rounds
    // but waits for the whole pipeline); the simulator sees the waiting.
    let (alpha, bw, gamma) = (25e-6, 1.25e9, 1.0 / 8e9);
    let net = uniform(alpha, bw, gamma);
    let model = cost::Model {
        alpha_s: alpha,
        beta_s_per_byte: 1.0 / bw,
        gamma_s_per_byte: gamma,
    };
    let (n, count, seg) = (64, 1 << 16, 1 << 12);
    let predicted = cost::predict(&model, cost::Algo::Tree, n, count, 4, seg);
    let simulated = simulate_allreduce(&net, Plan::Tree { seg }, n, count, 4)
        .unwrap()
        .time_s;
    assert!(
        simulated > predicted * 1.2,
        "simulated {simulated} vs predicted {predicted}"
    );
    // For rd every rank is busy every round: the two agree up to headers.
    let predicted = cost::predict(&model, cost::Algo::Rd, n, 2, 4, seg);
    let simulated = simulate_allreduce(&net, Plan::Rd, n, 2, 4).unwrap().time_s;
    let headers = 6.0 * HEADER / bw;
    assert!(
        (simulated - predicted - headers).abs() < 1e-9,
        "{simulated} {predicted}"
    );
}

//! kolo-sim: predict allreduce times of kolo's algorithms on a modelled
//! cluster with the discrete-event simulator in `kolo::simulate`, printed as
//! an nccl-tests-like table. Run `kolo-sim --help` for the options.

use kolo::algo::cost::Algo;
use kolo::simulate::{simulate_allreduce, Link, Network, Plan};
use kolo::DType;
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "\
usage: kolo-sim -n N [options]

Simulates one allreduce per message size and algorithm on N ranks and prints
the predicted time, algbw and busbw like nccl-tests (no network is used).

  -n, --ranks N          number of ranks (required, 1 ..= 1048576)
  -H, --ranks-per-host R consecutive ranks per host (default 1); ranks on one
                         host talk over the intra link, others over the inter
                         link and share their host's NIC
      --algo LIST        comma-separated: ring, tree, rhd, rd, binomial, kolo
                         (what Communicator::allreduce's auto choice runs
                         with the inter-host link and --gamma-gbps as its
                         cost model), or all
                         (= ring,tree,rhd,rd; the default)
  -b, --minbytes SIZE    smallest message size (default 8)
  -e, --maxbytes SIZE    largest message size (default 256M)
  -f, --stepfactor F     multiply the size by F each step (default 4, >= 2)
  -d, --datatype T       element type: uint8, int32, int64, half, bfloat16,
                         float, double (default float)
      --alpha-us US      inter-host latency per message, microseconds (default 25)
      --gbps G           inter-host bandwidth, Gbit/s (default 10)
      --intra-alpha-us US  intra-host latency, microseconds (default 5)
      --intra-gbps G     intra-host bandwidth, Gbit/s (default 50)
      --gamma-gbps G     reduction throughput, GB/s (gigaBYTES; default 8)
      --seg SIZE         tree pipeline segment, bytes (default 512K, kolo's
                         KOLO_SEGMENT_BYTES default)
      --slice-bytes SIZE ring slice of the kolo plan (default 512K)
  -h, --help             this text

SIZE takes an optional K, M or G suffix (powers of 1024). Sizes run from -b,
multiplied by -f while below -e, then -e itself; each is rounded down to whole
elements. Every message also carries kolo's 48-byte header.
busbw = algbw * 2(N-1)/N. The fastest algorithm of each size is marked '*'
and summarised at the end.

Model (see the kolo::simulate docs): rounds start when the previous round is
done; a message takes latency + bytes/bandwidth; each rank's sends and
receives are serialised on its own egress/ingress, inter-host messages also
on the hosts' NICs; received data is reduced after arrival at the gamma rate.
";

/// Every flag that takes a value.
const FLAGS: &[&str] = &[
    "-n",
    "--ranks",
    "-H",
    "--ranks-per-host",
    "--algo",
    "-b",
    "--minbytes",
    "-e",
    "--maxbytes",
    "-f",
    "--stepfactor",
    "-d",
    "--datatype",
    "--alpha-us",
    "--gbps",
    "--intra-alpha-us",
    "--intra-gbps",
    "--gamma-gbps",
    "--seg",
    "--slice-bytes",
];

/// Most ranks accepted (memory grows linearly, time with the messages).
const MAX_RANKS: usize = 1 << 20;

struct Opts {
    n: usize,
    per_host: usize,
    plans: Vec<String>,
    min: usize,
    max: usize,
    factor: usize,
    dtype: DType,
    alpha_us: f64,
    gbps: f64,
    intra_alpha_us: f64,
    intra_gbps: f64,
    gamma_gbps: f64,
    seg: usize,
    slice: usize,
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let t = s
        .strip_suffix("iB")
        .or_else(|| s.strip_suffix('B'))
        .unwrap_or(s);
    let (num, mul) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1usize << 10),
        'm' | 'M' => (&t[..t.len() - 1], 1 << 20),
        'g' | 'G' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mul)
}

fn parse_pos_f64(s: &str, zero_ok: bool) -> Option<f64> {
    let v: f64 = s.trim().parse().ok()?;
    (v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0))).then_some(v)
}

fn parse(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts {
        n: 0,
        per_host: 1,
        plans: ["ring", "tree", "rhd", "rd"].map(String::from).to_vec(),
        min: 8,
        max: 256 << 20,
        factor: 4,
        dtype: DType::F32,
        alpha_us: 25.0,
        gbps: 10.0,
        intra_alpha_us: 5.0,
        intra_gbps: 50.0,
        gamma_gbps: 8.0,
        seg: 512 << 10,
        slice: 512 << 10,
    };
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
        // --flag=value or --flag value
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a, None),
        };
        if !FLAGS.contains(&flag) {
            return Err(format!("unknown option {a:?}"));
        }
        let val = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))?
            }
        };
        let bad = || format!("bad value for {flag}: {val:?}");
        match flag {
            "-n" | "--ranks" => {
                o.n = val
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&n| (1..=MAX_RANKS).contains(&n))
                    .ok_or_else(bad)?;
            }
            "-H" | "--ranks-per-host" => {
                o.per_host = val
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(bad)?;
            }
            "--algo" => {
                let mut v = Vec::new();
                for name in val.split(',').map(|s| s.trim().to_ascii_lowercase()) {
                    match name.as_str() {
                        "all" => v.extend(["ring", "tree", "rhd", "rd"].map(String::from)),
                        "kolo" => v.push(name),
                        _ if Algo::parse(&name).is_some() => v.push(name),
                        _ => return Err(format!("unknown algorithm {name:?}")),
                    }
                }
                let mut seen = std::collections::HashSet::new();
                v.retain(|x| seen.insert(x.clone()));
                if v.is_empty() {
                    return Err(bad());
                }
                o.plans = v;
            }
            "-b" | "--minbytes" => o.min = parse_size(&val).ok_or_else(bad)?,
            "-e" | "--maxbytes" => o.max = parse_size(&val).ok_or_else(bad)?,
            "-f" | "--stepfactor" => {
                o.factor = val
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&f| f >= 2)
                    .ok_or_else(bad)?;
            }
            "-d" | "--datatype" => o.dtype = DType::parse(val.trim()).ok_or_else(bad)?,
            "--alpha-us" => o.alpha_us = parse_pos_f64(&val, true).ok_or_else(bad)?,
            "--gbps" => o.gbps = parse_pos_f64(&val, false).ok_or_else(bad)?,
            "--intra-alpha-us" => o.intra_alpha_us = parse_pos_f64(&val, true).ok_or_else(bad)?,
            "--intra-gbps" => o.intra_gbps = parse_pos_f64(&val, false).ok_or_else(bad)?,
            "--gamma-gbps" => o.gamma_gbps = parse_pos_f64(&val, false).ok_or_else(bad)?,
            "--seg" => o.seg = parse_size(&val).filter(|&s| s > 0).ok_or_else(bad)?,
            "--slice-bytes" => o.slice = parse_size(&val).ok_or_else(bad)?,
            _ => return Err(format!("unknown option {a:?}")),
        }
        i += 1;
    }
    if o.n == 0 {
        return Err("-n N is required".into());
    }
    if o.min > o.max {
        return Err(format!("-b {} is above -e {}", o.min, o.max));
    }
    Ok(Some(o))
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kolo-sim: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let elem = o.dtype.size();
    let net = Network {
        ranks_per_host: o.per_host,
        intra: Link {
            latency_s: o.intra_alpha_us * 1e-6,
            bytes_per_s: o.intra_gbps * 1e9 / 8.0,
        },
        inter: Link {
            latency_s: o.alpha_us * 1e-6,
            bytes_per_s: o.gbps * 1e9 / 8.0,
        },
        gamma_s_per_byte: 1.0 / (o.gamma_gbps * 1e9),
    };
    let n = o.n;
    let hosts = n.div_ceil(o.per_host);
    println!(
        "# kolo-sim: {n} ranks, {} per host ({hosts} host{}), dtype {} ({elem} B)",
        o.per_host,
        if hosts == 1 { "" } else { "s" },
        o.dtype.name()
    );
    println!(
        "# inter-host {} us {} Gbit/s, intra-host {} us {} Gbit/s, reduce {} GB/s, \
         tree segment {} B",
        o.alpha_us, o.gbps, o.intra_alpha_us, o.intra_gbps, o.gamma_gbps, o.seg
    );
    println!("#");
    println!(
        "# {:>12} {:>12} {:>8} {:>9} {:>14} {:>11} {:>11}",
        "size", "count", "type", "algo", "time(us)", "algbw(GB/s)", "busbw(GB/s)"
    );
    let started = Instant::now();
    let mut best_by_size: Vec<(usize, String)> = Vec::new();
    let mut size = o.min;
    loop {
        let count = size / elem;
        let bytes = count * elem;
        let mut rows: Vec<(String, f64)> = Vec::new();
        for name in &o.plans {
            let plan = if name == "kolo" {
                let mut cfg = kolo::Config::local(0, n, 0);
                cfg.local_size = o.per_host.min(n);
                cfg.alpha_us = Some(o.alpha_us);
                cfg.beta_gbps = Some(o.gbps / 8.0);
                cfg.gamma_gbps = Some(o.gamma_gbps);
                cfg.slice_bytes = o.slice;
                cfg.segment_bytes = o.seg;
                Plan::kolo(&cfg, count, elem)
            } else {
                let algo = Algo::parse(name).expect("names were checked when parsing");
                Plan::from_algo(algo, (o.seg / elem).max(1))
            };
            match simulate_allreduce(&net, plan, n, count, elem) {
                Ok(rep) => rows.push((name.clone(), rep.time_s)),
                Err(e) => {
                    eprintln!("kolo-sim: {name} at {bytes} bytes: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let best = rows
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|r| r.0.clone())
            .unwrap_or_default();
        for (name, t) in &rows {
            let algbw = if *t > 0.0 {
                bytes as f64 / t / 1e9
            } else {
                0.0
            };
            let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
            println!(
                "  {:>12} {:>12} {:>8} {:>9} {:>14.2} {:>11.3} {:>11.3}{}",
                bytes,
                count,
                o.dtype.name(),
                name,
                t * 1e6,
                algbw,
                busbw,
                if *name == best && rows.len() > 1 {
                    " *"
                } else {
                    ""
                }
            );
        }
        best_by_size.push((bytes, best));
        // Then size * F while it stays below -e, and -e itself last.
        match size.checked_mul(o.factor) {
            _ if size >= o.max => break,
            Some(next) if next < o.max && size > 0 => size = next,
            _ => size = o.max,
        }
    }
    // Fastest algorithm per size, as runs of consecutive sizes.
    println!("#");
    println!("# fastest:");
    let mut i = 0;
    while i < best_by_size.len() {
        let mut j = i;
        while j + 1 < best_by_size.len() && best_by_size[j + 1].1 == best_by_size[i].1 {
            j += 1;
        }
        let range = if i == j {
            human(best_by_size[i].0)
        } else {
            format!(
                "{} .. {}",
                human(best_by_size[i].0),
                human(best_by_size[j].0)
            )
        };
        println!("#   {range:<22} {}", best_by_size[i].1);
        i = j + 1;
    }
    println!("# simulated in {:.2} s", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}

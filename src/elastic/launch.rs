//! The launcher's side of elastic mode (`kolorun --min-np`): pure decisions,
//! kept here so they can be tested without processes.

use std::collections::HashMap;

/// Parse a host discovery script's output: one `host:slots` (or `host`,
/// one slot) per line; blank lines and `#` comments are skipped.
///
/// ```
/// let h = kolo::elastic::launch::parse_discovery("a:2\n# x\nb\n").unwrap();
/// assert_eq!(h, vec![("a".to_string(), 2), ("b".to_string(), 1)]);
/// ```
pub fn parse_discovery(text: &str) -> Result<Vec<(String, usize)>, String> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (host, slots) = match line.rsplit_once(':') {
            Some((h, n)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
                let n: usize = n.trim().parse().map_err(|_| {
                    format!("line {}: {line:?}: slots {n:?} is not a number", i + 1)
                })?;
                (h.trim().to_string(), n)
            }
            _ => (line.to_string(), 1),
        };
        crate::net::check_host(&host).map_err(|e| format!("line {}: {e}", i + 1))?;
        match out.iter_mut().find(|(h, _)| *h == host) {
            Some(e) => e.1 += slots,
            None => out.push((host, slots)),
        }
    }
    Ok(out)
}

/// Hosts to start new members on: free slots of usable hosts (those that
/// failed at most `max_host_failures` times), in the order given, until
/// `running` reaches `max_np`.
///
/// ```
/// use std::collections::HashMap;
/// let hosts = vec![("a".to_string(), 2), ("b".to_string(), 2)];
/// let used = HashMap::from([("a".to_string(), 1)]);
/// let failures = HashMap::from([("b".to_string(), 3)]);
/// // b failed 3 times, more than the 2 allowed: only a's free slot is used.
/// let new = kolo::elastic::launch::plan_spawns(&hosts, &used, &failures, 2, 1, 4);
/// assert_eq!(new, vec!["a".to_string()]);
/// ```
pub fn plan_spawns(
    hosts: &[(String, usize)],
    used: &HashMap<String, usize>,
    failures: &HashMap<String, usize>,
    max_host_failures: usize,
    running: usize,
    max_np: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut n = running;
    for (h, slots) in hosts {
        if failures.get(h).copied().unwrap_or(0) > max_host_failures {
            continue;
        }
        let free = slots.saturating_sub(used.get(h).copied().unwrap_or(0));
        for _ in 0..free {
            if n >= max_np {
                return out;
            }
            out.push(h.clone());
            n += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_output_forms() {
        assert_eq!(
            parse_discovery("h1:4\n  h2:1  \nh1:2\n\n[::1]:3\n").unwrap(),
            vec![("h1".into(), 6), ("h2".into(), 1), ("[::1]".into(), 3)]
        );
        assert!(parse_discovery("h:x\n").is_err());
        assert_eq!(parse_discovery("").unwrap(), vec![]);
    }

    #[test]
    fn spawns_respect_max_np_and_failed_hosts() {
        let hosts = vec![("a".to_string(), 2), ("b".to_string(), 3)];
        let none = HashMap::new();
        assert_eq!(
            plan_spawns(&hosts, &none, &none, 0, 0, 3),
            vec!["a", "a", "b"]
        );
        let used = HashMap::from([("a".to_string(), 2), ("b".to_string(), 1)]);
        assert_eq!(plan_spawns(&hosts, &used, &none, 0, 3, 4), vec!["b"]);
        let failed = HashMap::from([("b".to_string(), 1)]);
        assert!(plan_spawns(&hosts, &used, &failed, 0, 3, 4).is_empty());
        assert_eq!(plan_spawns(&hosts, &used, &failed, 1, 3, 4), vec!["b"]);
    }
}

//! Facts about this machine and time that go into manifests and `status`: kernel release,
//! architecture, a digest of the CPU flags, wall-clock time, random ids.

use std::io::Read as _;

use sha2::{Digest as _, Sha256};

/// The kernel release (`uname -r`).
pub fn kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The architecture as Rust names it (x86_64, aarch64, ...), compared between archives and hosts.
pub fn arch() -> &'static str {
    std::env::consts::ARCH
}

/// Hex SHA-256 over the sorted, de-duplicated CPU flags of /proc/cpuinfo (`flags` on x86,
/// `Features` on arm64). A different digest at the target means CPU features differ; CRIU's
/// `--cpu-cap` check decides whether that matters.
pub fn cpu_flags_digest() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut flags: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .flat_map(|l| {
            l.split_once(':')
                .map(|(_, v)| v)
                .unwrap_or("")
                .split_whitespace()
        })
        .collect();
    flags.sort_unstable();
    flags.dedup();
    hex::encode(Sha256::digest(flags.join(" ").as_bytes()))
}

/// Peak resident memory in KiB of this process (`job`) and of its largest waited-for child
/// (`criu`), as the kernel accounts them (`getrusage`; Linux reports `ru_maxrss` in KiB).
pub fn peak_rss_kib() -> std::collections::BTreeMap<String, u64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let mut peaks = std::collections::BTreeMap::new();
    for (name, who) in [
        ("job", UsageWho::RUSAGE_SELF),
        ("criu", UsageWho::RUSAGE_CHILDREN),
    ] {
        if let Ok(usage) = getrusage(who) {
            peaks.insert(name.to_string(), usage.max_rss().max(0) as u64);
        }
    }
    peaks
}

/// When the kernel booted, in seconds since the Unix epoch (`btime` of /proc/stat, which a
/// container sees unchanged: it is the node's).
pub fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    migrate_format::unix_ms()
}

/// RFC 3339 UTC timestamp of now, second precision.
pub fn now_rfc3339() -> String {
    let secs = (now_ms() / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A fresh id like `ck-20261122t030500-1a2b3c4d`: sortable by time, unique by randomness.
pub fn new_id(prefix: &str) -> String {
    let mut random = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random));
    let stamp: String = now_rfc3339()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!(
        "{prefix}-{}-{}",
        stamp.to_ascii_lowercase().trim_end_matches('z'),
        hex::encode(random)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn ids_are_unique_and_prefixed() {
        let (a, b) = (new_id("ck"), new_id("ck"));
        assert!(a.starts_with("ck-2") && a != b, "{a} {b}");
    }
}

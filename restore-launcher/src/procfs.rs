//! Reading /proc: the one module that parses it (processes, threads, their status fields).
//! A leaf: it uses nothing else of the launcher. The procfs crate would do the same; these
//! few fields do not need its parsers of everything else in the static binary.

use std::fs;

/// What /proc/ID/stat says of a process or thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The state letter: R, S, D, T (stopped), t (traced), Z, X …
    pub state: char,
    pub ppid: i32,
    /// The command name, which may hold spaces and parentheses.
    pub comm: String,
    /// When it started, in clock ticks since boot.
    pub start_ticks: u64,
}

/// The stat of process or thread `id`; None when it is gone.
pub fn stat(id: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{id}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let (head, rest) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        comm,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Every process of this PID namespace (the numeric entries of /proc).
pub fn pids() -> Vec<i32> {
    numbers("/proc")
}

/// The thread ids of process `pid` (none when it is gone).
pub fn threads(pid: i32) -> Vec<i32> {
    numbers(&format!("/proc/{pid}/task"))
}

fn numbers(dir: &str) -> Vec<i32> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The text of /proc/PID/status (`None`: this process's own).
pub fn status(pid: Option<i32>) -> Option<String> {
    match pid {
        Some(pid) => fs::read_to_string(format!("/proc/{pid}/status")).ok(),
        None => fs::read_to_string("/proc/self/status").ok(),
    }
}

/// The value of field `name` (`PPid`, `CapEff`, `Uid` …) in a status text, trimmed.
pub fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_is_read_whole() {
        let text = "42 (a) b (c)) T 7 42 42 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0";
        let stat = parse_stat(text).unwrap_or_else(|| panic!("not parsed"));
        assert_eq!(stat.comm, "a) b (c)");
        assert_eq!((stat.state, stat.ppid, stat.start_ticks), ('T', 7, 12345));
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let own = stat(std::process::id() as i32).unwrap_or_else(|| panic!("no stat"));
        assert_eq!(own.ppid, nix::unistd::getppid().as_raw());
        let status = status(None).unwrap_or_default();
        assert_eq!(
            field(&status, "Pid"),
            Some(std::process::id().to_string().as_str())
        );
        assert!(threads(std::process::id() as i32).contains(&(std::process::id() as i32)));
    }
}

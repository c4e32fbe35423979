//! The launcher's init duties, tested on the real binary: exit statuses, signal forwarding,
//! reaping, the PID floor, output relaying, option errors and static linking. Each behaviour
//! runs both as PID 1 of a fresh PID namespace and as a plain child (subreaper).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{Mode, Running, launcher, launcher_command, modes, python, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

fn run(mode: Mode, args: &[&str]) -> (i32, String, String) {
    let running = Running::start(mode, args);
    running.finish(LIMIT)
}

#[test]
fn exit_codes_and_deaths_by_signal_pass_through() {
    for mode in modes("exit_codes_and_deaths_by_signal_pass_through") {
        for code in [0, 1, 42, 255] {
            let script = format!("exit {code}");
            let (got, _, stderr) = run(mode, &["--", "sh", "-c", &script]);
            assert_eq!(got, code, "{mode:?}: `exit {code}` (stderr: {stderr})");
        }
        let (got, _, _) = run(mode, &["--", "sh", "-c", "kill -TERM $$"]);
        assert_eq!(got, 143, "{mode:?}: app killed by SIGTERM");
        let (got, _, _) = run(mode, &["--", "sh", "-c", "kill -KILL $$"]);
        assert_eq!(got, 137, "{mode:?}: app killed by SIGKILL");
    }
}

#[test]
fn commands_that_cannot_run_give_127_and_126_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("not-executable.sh");
    fs::write(&not_executable, "#!/bin/sh\necho should not run\n").unwrap();
    fs::set_permissions(&not_executable, fs::Permissions::from_mode(0o644)).unwrap();
    let not_executable = not_executable.to_str().unwrap();

    for mode in modes("commands_that_cannot_run_give_127_and_126_with_a_message") {
        let (got, stdout, stderr) = run(mode, &["--", "no-such-command-anywhere", "arg"]);
        assert_eq!(got, 127, "{mode:?}: missing command");
        assert!(stdout.is_empty());
        assert!(
            stderr.contains("no-such-command-anywhere") && stderr.contains("command not found"),
            "{mode:?}: message names the command: {stderr}"
        );
        let (got, _, stderr) = run(mode, &["--", "/no/such/dir/app"]);
        assert_eq!(got, 127, "{mode:?}: missing path: {stderr}");

        let (got, stdout, stderr) = run(mode, &["--", not_executable]);
        assert_eq!(got, 126, "{mode:?}: not executable");
        assert!(!stdout.contains("should not run"));
        assert!(
            stderr.contains("cannot execute") && stderr.contains("Permission denied"),
            "{mode:?}: message says why: {stderr}"
        );
    }
}

/// A Python app of three processes in one group (leader + two forked children); each records
/// every signal it gets, and on SIGTERM the children exit 0 and the leader exits 7.
const SIGNAL_APP: &str = r#"
import os, signal, sys, time
log, ready = sys.argv[1], sys.argv[2]
role, children = "leader", []
def record(signum, frame):
    with open(log, "a") as f:
        f.write(f"{signal.Signals(signum).name} {role} {os.getpid()} {os.getpgrp()}\n")
    if signum == signal.SIGTERM:
        if role == "leader":
            for c in children:
                os.waitpid(c, 0)
            sys.exit(7)
        os._exit(0)
for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(s, record)
for i in range(2):
    pid = os.fork()
    if pid == 0:
        role, children = f"child{i}", []
        break
    children.append(pid)
open(os.path.join(ready, role), "w").close()
while True:
    time.sleep(1)
"#;

#[test]
fn signals_reach_every_process_of_the_app_group() {
    for mode in modes("signals_reach_every_process_of_the_app_group") {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("app.py");
        fs::write(&script, SIGNAL_APP).unwrap();
        let log = dir.path().join("signals.log");
        let ready = dir.path().join("ready");
        fs::create_dir(&ready).unwrap();
        let python = python();
        let running = Running::start(
            mode,
            &[
                "--",
                python.to_str().unwrap(),
                script.to_str().unwrap(),
                log.to_str().unwrap(),
                ready.to_str().unwrap(),
            ],
        );
        wait_for("three app processes ready", LIMIT, || {
            (fs::read_dir(&ready).ok()?.count() == 3).then_some(())
        });

        let received = |name: &str| -> Vec<String> {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.split(' ').next() == Some(name))
                .map(String::from)
                .collect()
        };
        for signal in [
            Signal::SIGHUP,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGTERM,
        ] {
            running.signal(signal);
            let lines = wait_for(
                &format!("{signal} recorded by all three processes ({mode:?})"),
                LIMIT,
                || {
                    let lines = received(signal.as_str());
                    (lines.len() >= 3).then_some(lines)
                },
            );
            let mut roles: Vec<&str> = lines.iter().map(|l| l.split(' ').nth(1).unwrap()).collect();
            roles.sort();
            assert_eq!(
                roles,
                ["child0", "child1", "leader"],
                "{mode:?}: {signal} reached each process once"
            );
            // All three share one process group: the app's own, led by the leader.
            let groups: Vec<&str> = lines.iter().map(|l| l.split(' ').nth(3).unwrap()).collect();
            let leader_pid = lines
                .iter()
                .find(|l| l.contains(" leader "))
                .unwrap()
                .split(' ')
                .nth(2)
                .unwrap();
            assert!(
                groups.iter().all(|g| *g == leader_pid),
                "{mode:?}: one group led by the app: {lines:?}"
            );
        }
        let (code, _, stderr) = running.finish(LIMIT);
        assert_eq!(
            code, 7,
            "{mode:?}: the app's trapped-SIGTERM exit code is the launcher's (stderr: {stderr})"
        );
    }
}

#[test]
fn orphaned_grandchildren_are_reaped() {
    for mode in modes("orphaned_grandchildren_are_reaped") {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        // Five subshells each start a `sleep 1` and exit at once, orphaning it: the sleeps are
        // re-parented to the launcher (PID 1, or subreaper) and exit a second later.
        let script = format!(
            "for i in 1 2 3 4 5; do (sleep 1 &); done; touch {}; exec sleep 60",
            ready.display()
        );
        let running = Running::start(mode, &["--", "sh", "-c", &script]);
        let launcher_pid = running.launcher_pid();
        wait_for("the app to start its grandchildren", LIMIT, || {
            ready.exists().then_some(())
        });
        // Proves the orphans really were handed to the launcher (otherwise this test could not fail).
        let adopted = wait_for("five orphans adopted by the launcher", LIMIT, || {
            let sleeps: Vec<i32> = util::children_of(launcher_pid)
                .into_iter()
                .filter(|&c| util::state_of(c).is_some_and(|(_, name)| name == "sleep"))
                .collect();
            (sleeps.len() >= 6).then_some(sleeps) // five orphans + the app itself (exec'd sleep)
        });
        assert_eq!(adopted.len(), 6, "{mode:?}");
        std::thread::sleep(Duration::from_millis(1500));
        let zombies = util::zombies_of(launcher_pid);
        assert!(
            zombies.is_empty(),
            "{mode:?}: zombies left behind: {zombies:?}"
        );
        let children = util::children_of(launcher_pid);
        assert_eq!(
            children.len(),
            1,
            "{mode:?}: only the app is left: {children:?}"
        );
        running.signal(Signal::SIGTERM);
        let (code, _, _) = running.finish(LIMIT);
        assert_eq!(code, 143, "{mode:?}");
    }
}

#[test]
fn the_app_and_its_children_get_pids_above_the_floor() {
    if !util::root_or_skip("the_app_and_its_children_get_pids_above_the_floor") {
        return;
    }
    let script = "echo app=$$ parent=$PPID; sleep 0 & echo child=$!; wait";
    let parse = |stdout: &str| -> Vec<(String, i32)> {
        stdout
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    };
    let (code, stdout, _) = run(Mode::Pid1, &["--", "sh", "-c", script]);
    assert_eq!(code, 0);
    let pids = parse(&stdout);
    assert_eq!(
        pids[1],
        ("parent".into(), 1),
        "the launcher is PID 1: {stdout}"
    );
    assert!(
        pids[0].1 >= 1000 && pids[2].1 > pids[0].1,
        "default floor 1000: {stdout}"
    );

    let (code, stdout, _) = run(
        Mode::Pid1,
        &["--pid-floor", "5000", "--", "sh", "-c", script],
    );
    assert_eq!(code, 0);
    let pids = parse(&stdout);
    assert!(
        pids[0].1 >= 5000 && pids[2].1 >= 5000,
        "--pid-floor 5000: {stdout}"
    );

    let output = launcher_command(Mode::Pid1, ["--", "sh", "-c", script])
        .env("RESTORE_LAUNCHER_PID_FLOOR", "3000")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let pids = parse(&stdout);
    assert!(
        (3000..5000).contains(&pids[0].1),
        "RESTORE_LAUNCHER_PID_FLOOR=3000: {stdout}"
    );
}

/// Writes `size` bytes to stdout and to stderr, alternating 64 KiB chunks as fast as it can,
/// then exits at once (with data possibly still in the pipes).
const FLOOD_APP: &str = r#"
import sys
size = int(sys.argv[1])
def stream(tag):
    out, n, i = bytearray(), 0, 0
    while len(out) < size:
        out += b"%s %09d abcdefghijklmnopqrstuvwxyz\n" % (tag, i)
        i += 1
    return bytes(out[:size])
o, e = stream(b"out"), stream(b"err")
for pos in range(0, size, 65536):
    sys.stdout.buffer.write(o[pos:pos + 65536]); sys.stdout.buffer.flush()
    sys.stderr.buffer.write(e[pos:pos + 65536]); sys.stderr.buffer.flush()
"#;

fn expected_stream(tag: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    let mut i = 0;
    while out.len() < size {
        writeln!(out, "{tag} {i:09} abcdefghijklmnopqrstuvwxyz").unwrap();
        i += 1;
    }
    out.truncate(size);
    out
}

#[test]
fn twenty_megabytes_on_each_stream_arrive_complete_and_in_order() {
    const SIZE: usize = 20 * 1000 * 1000;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("flood.py");
    fs::write(&script, FLOOD_APP).unwrap();
    let python = python();
    for mode in modes("twenty_megabytes_on_each_stream_arrive_complete_and_in_order") {
        let output = launcher_command(
            mode,
            [
                python.to_str().unwrap(),
                script.to_str().unwrap(),
                &SIZE.to_string(),
            ],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
        assert_eq!(output.status.code(), Some(0), "{mode:?}");
        assert_eq!(output.stdout.len(), SIZE, "{mode:?}: stdout length");
        assert_eq!(output.stderr.len(), SIZE, "{mode:?}: stderr length");
        assert!(
            output.stdout == expected_stream("out", SIZE),
            "{mode:?}: stdout differs from what the app wrote"
        );
        assert!(
            output.stderr == expected_stream("err", SIZE),
            "{mode:?}: stderr differs from what the app wrote"
        );
    }
}

#[test]
fn a_closed_log_stream_does_not_end_the_launcher() {
    // The launcher's stdout is a pipe nobody reads any more: its writes fail with EPIPE. It
    // must keep supervising and still report the app's exit code.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let output = launcher_command(
        Mode::Child,
        ["--", "sh", "-c", "seq 1 100000; sleep 0.2; exit 5"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::from(writer))
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "stderr: {stderr}");
    assert!(
        stderr.contains("cannot write the app's output"),
        "says what happened: {stderr}"
    );
}

#[test]
fn a_bad_option_is_a_clear_error_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let touch = format!("touch {}", marker.display());
    for args in [
        vec!["--no-such-option", "--", "sh", "-c", &touch],
        vec!["--pid-floor", "lots", "--", "sh", "-c", &touch],
    ] {
        let output = launcher_command(Mode::Child, &args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(args[0]),
            "{args:?}: names the option: {stderr}"
        );
        assert!(!marker.exists(), "{args:?}: the app must not have started");
    }
    let output = launcher_command(Mode::Child, ["--pid-floor", "1000"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("<CMD>"));
}

#[test]
fn help_and_version() {
    let output = launcher_command(Mode::Child, ["--version"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("restore-launcher {}", env!("CARGO_PKG_VERSION"))
    );
    let output = launcher_command(Mode::Child, ["--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("RESTORE_LAUNCHER_PID_FLOOR"),
        "env twins are documented: {help}"
    );
}

#[test]
fn the_release_launcher_is_statically_linked() {
    let Some(path) = std::env::var_os("RESTORE_LAUNCHER_STATIC") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide the static build (run `cargo xtask test`)"
        );
        eprintln!(
            "SKIPPED the_release_launcher_is_statically_linked: run through `cargo xtask test`, which builds it"
        );
        return;
    };
    assert_eq!(launcher().as_os_str(), path.as_os_str());
    let output = std::process::Command::new("file")
        .arg("--dereference")
        .arg(&path)
        .output()
        .expect("run `file`");
    let description = String::from_utf8_lossy(&output.stdout);
    assert!(description.contains("statically linked"), "{description}");
    // And it really runs with no loader or libraries to find, in an empty environment
    // (musl's execvp then searches its default PATH).
    let output = launcher_command(Mode::Child, ["--", "sh", "-c", "exit 3"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_silent_control_client_does_not_hold_up_pid_1() {
    // A client that connects to the control socket and sends nothing. Were PID 1 to wait for
    // its request, it would serve nobody else until it gave up on it (and hung up on it).
    let state_dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(launcher())
        .args(["--", "sleep", "60"])
        .env("RESTORE_LAUNCHER_STATE_DIR", state_dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = scopeguard(child);
    let socket = state_dir.path().join("control.sock");
    wait_for("the control socket", LIMIT, || {
        socket.exists().then_some(())
    });
    let silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    silent.set_nonblocking(true).unwrap();
    let status = std::process::Command::new(launcher())
        .args(["status"])
        .env("RESTORE_LAUNCHER_STATE_DIR", state_dir.path())
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && answer.contains(r#""state":"running""#),
        "{answer}"
    );
    // Served while the silent client is still connected and unanswered: PID 1 did not sit in
    // its read (which would have ended by timing it out and hanging up first).
    let mut byte = [0u8; 1];
    let read = std::io::Read::read(&mut &silent, &mut byte);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the silent client was answered or dropped before `status` was served: {read:?}"
    );
    let _ = running.0.kill();
}

/// Kills the child when the test ends, however it ends.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scopeguard(child: std::process::Child) -> Guard {
    Guard(child)
}

#[test]
fn a_log_reader_that_stalls_never_stalls_pid_1() {
    // The launcher's stdout is a pipe nobody reads for now, and the app writes 2 MiB to it:
    // PID 1 keeps what the pipe does not take, and stops reading the app (which then waits,
    // as it would writing to the stalled pipe itself), but never blocks: `status` is answered.
    let state_dir = tempfile::tempdir().unwrap();
    let (log_read, log_write) = nix::unistd::pipe().unwrap();
    let watch = log_write.try_clone().unwrap();
    let child = std::process::Command::new(launcher())
        .args(["--", "head", "-c", "2097152", "/dev/zero"])
        .env("RESTORE_LAUNCHER_STATE_DIR", state_dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_write))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = scopeguard(child);
    // The log pipe is full: a write to it now would block.
    wait_for("the log pipe to fill", LIMIT, || {
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&watch),
            nix::poll::PollFlags::POLLOUT,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO);
        (!fds[0]
            .revents()
            .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLOUT)))
        .then_some(())
    });
    drop(watch);
    let mut status = std::process::Command::new(launcher())
        .args(["status"])
        .env("RESTORE_LAUNCHER_STATE_DIR", state_dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a PID 1 blocked in a write would never answer.
    let answered = wait_for("`status` to be answered", LIMIT, || {
        status.try_wait().unwrap()
    });
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut status.stdout.take().unwrap(), &mut answer).unwrap();
    assert!(
        answered.success() && answer.contains(r#""state":"running""#),
        "{answer}"
    );
    // Nothing was dropped: once read, all 2 MiB arrive and the launcher exits with the app.
    let mut log = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(log_read), &mut log).unwrap();
    assert_eq!(log.len(), 2 * 1024 * 1024);
    assert!(log.iter().all(|b| *b == 0));
    let code = running.0.wait().unwrap();
    assert!(code.success(), "{code}");
}

#[test]
fn a_stalled_stderr_never_stalls_pid_1_writing_its_own_log() {
    // PID 1's stderr is a pipe nobody reads, filled to the brim, and it logs every request
    // (`RESTORE_LAUNCHER_LOG=debug`): each `status` is still answered, the lines that did not
    // fit are dropped, and once the reader is back the next line says how many bytes were.
    let state_dir = tempfile::tempdir().unwrap();
    let (log_read, log_write) = nix::unistd::pipe().unwrap();
    let filler = log_write.try_clone().unwrap();
    nix::fcntl::fcntl(
        &filler,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    while nix::unistd::write(&filler, &[b'.'; 4096]).is_ok() {}
    let child = std::process::Command::new(launcher())
        .args(["--", "sleep", "60"])
        .env("RESTORE_LAUNCHER_STATE_DIR", state_dir.path())
        .env("RESTORE_LAUNCHER_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_write))
        .spawn()
        .unwrap();
    let _running = scopeguard(child);
    // `status`'s answer, or None when it failed (PID 1 not listening yet).
    let status = || {
        let mut asked = std::process::Command::new(launcher())
            .args(["status"])
            .env("RESTORE_LAUNCHER_STATE_DIR", state_dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Bounded: a PID 1 blocked writing a log line would never answer.
        let answered = wait_for("`status` to be answered", LIMIT, || {
            asked.try_wait().unwrap()
        });
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut asked.stdout.take().unwrap(), &mut answer).unwrap();
        answered.success().then_some(answer)
    };
    wait_for("PID 1 answering", LIMIT, || {
        status()
            .filter(|a| a.contains(r#""state":"running""#))
            .map(drop)
    });
    for _ in 0..20 {
        let answer = status();
        assert!(
            answer
                .as_deref()
                .is_some_and(|a| a.contains(r#""state":"running""#)),
            "{answer:?}"
        );
    }
    // The reader comes back: it takes the filler, then a line of PID 1 says what it dropped.
    let mut reader = std::fs::File::from(log_read);
    nix::fcntl::fcntl(
        &reader,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut log = Vec::new();
    let mut chunk = [0u8; 65536];
    wait_for("the note of what was dropped", LIMIT, || {
        while let Ok(n) = std::io::Read::read(&mut reader, &mut chunk) {
            if n == 0 {
                break;
            }
            log.extend_from_slice(&chunk[..n]);
        }
        let _ = status();
        let text = String::from_utf8_lossy(&log);
        text.contains("bytes of this launcher's log were dropped while its reader took nothing")
            .then_some(())
    });
}

#[test]
fn output_a_slow_log_reader_has_not_taken_is_not_lost_when_the_app_exits() {
    // The app writes 1 MiB and exits while nobody reads the log pipe. The launcher holds what
    // the pipe does not take and, once the reader comes back -- later than the 2 s an exited
    // app's output is drained for -- writes all of it before it exits.
    let state_dir = tempfile::tempdir().unwrap();
    let (log_read, log_write) = nix::unistd::pipe().unwrap();
    let child = std::process::Command::new(launcher())
        .args(["--", "head", "-c", "1048576", "/dev/zero"])
        .env("RESTORE_LAUNCHER_STATE_DIR", state_dir.path())
        .env("RESTORE_LAUNCHER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = scopeguard(child);
    let mut stderr = std::io::BufReader::new(running.0.stderr.take().unwrap());
    let mut said = String::new();
    wait_for("the app to exit", LIMIT, || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        said.push_str(&line);
        line.contains("the app exited").then_some(())
    });
    // The slow reader: back only after the drain's 2 s (the fault under test is this wait).
    std::thread::sleep(Duration::from_secs(3));
    let mut log = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(log_read), &mut log).unwrap();
    assert_eq!(
        log.len(),
        1024 * 1024,
        "output lost; the launcher said: {said}"
    );
    let code = running.0.wait().unwrap();
    assert!(code.success(), "{code}");
}

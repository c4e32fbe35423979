//! The direct transfer on the real cluster (each node in its own network namespace): the
//! archive goes pod to pod over mutually authenticated TLS; the downtime the plugin prints is
//! checked against the gap users see in the container logs' own time stamps; a connection
//! without the secret is turned away; a wrong secret, a blocked path, and the relay fallback.

use super::*;

/// The time stamp of the first (or last) counter line of `kubectl logs --timestamps POD`.
fn count_stamp(cluster: &Cluster, pod: &str, last: bool) -> Result<u64> {
    let text = cluster.kubectl_ok(&["logs", "--timestamps", pod])?;
    migrate_tests::count_stamp_ms(&text, last)
        .with_context(|| format!("no time-stamped count in {pod}'s log"))
}

/// The ballast checksum of the last line in `text`.
fn ballast(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .find_map(|l| l.split("ballast=").nth(1))
        .map(str::to_string)
}

/// The counter's tick in these tests: the log's resolution (the app prints at most this long
/// before its freeze, and at most this long after its thaw).
const TICK_MS: u64 = 20;

/// The counter with 64 MiB of random ballast, ticking every 20 ms, moves node-a → node-b with
/// the default transfer: pod to pod. Its count continues, its ballast checksum is unchanged,
/// and the report's downtime (freeze → thaw, the launchers' stamps) agrees with the gap
/// between the source's last log line and the target's first, by the CRI log's time stamps.
/// The transfer's secret appears nowhere: not in either pod, not in any Event, not in any log.
pub fn direct_transfer_moves_the_counter_and_the_downtime_matches_the_logs(
    cluster: &Cluster,
) -> Result<()> {
    let name = "direct";
    cluster.apply(&example_pod(
        "counter/pod.yaml",
        name,
        "node-a",
        &[("COUNTER_INTERVAL", "0.02"), ("COUNTER_BALLAST_MB", "64")],
    )?)?;
    cluster.wait_running(name, WAIT)?;
    wait_until("the counter ticking", WAIT, || {
        Ok((counter_values(&logs(cluster, name, None)).len() >= 10).then_some(()))
    })?;
    let secrets = tempfile::NamedTempFile::new()?;
    let secret_file = secrets.path().to_str().context("temp path")?.to_string();
    // --keep-source: the frozen source stays, so its pod, Events and log can be searched too.
    let out = migrate_ok(
        cluster,
        &[name, "--to", "node-b", "--keep-source", "-o", "json"],
        &[("KUBECTL_MIGRATE_FAULT_SECRET_FILE", &secret_file)],
    )?;
    let report: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("the report is not JSON: {}", out.stdout))?;
    let target = format!("{name}-m1");
    ensure!(
        report["containers"]["counter"]["route"] == "direct",
        "the archive did not go pod to pod: {}",
        report["containers"]["counter"]["route"]
    );
    let downtime = report["downtime_ms"]
        .as_u64()
        .context("the report has no freeze → thaw downtime")?;
    let bound = report["downtime_bound_ms"].as_u64().unwrap_or_default();
    cluster.wait_running(&target, WAIT)?;
    wait_until(&format!("counts on {target}"), WAIT, || {
        Ok((counter_values(&logs(cluster, &target, None)).len() >= 10).then_some(()))
    })?;
    let (source_log, target_log) = (logs(cluster, name, None), logs(cluster, &target, None));
    let (last, first) = assert_continued(&source_log, &target_log)?;
    let (before, after) = (ballast(&source_log), ballast(&target_log));
    ensure!(
        before.is_some() && before == after,
        "the ballast changed: {before:?} → {after:?}"
    );
    let gap =
        count_stamp(cluster, &target, false)?.saturating_sub(count_stamp(cluster, name, true)?);
    eprintln!(
        "direct, 64 MiB ballast: count {last} → {first}; downtime {downtime} ms (freeze → thaw, nodes' clocks), \
         log gap {gap} ms (CRI time stamps), plugin's bound {bound} ms; {} archive bytes",
        report["bytes_moved"]
    );
    // The app prints up to a tick before its freeze and right after its thaw: the gap is the
    // downtime plus at most a tick (and the log pipe's few ms), never less than the downtime
    // (less a few ms: the freeze is stamped once every process has stopped).
    ensure!(
        gap + 30 >= downtime && gap <= downtime + TICK_MS + 150,
        "the printed downtime {downtime} ms disagrees with the log gap {gap} ms"
    );
    ensure!(
        bound >= downtime,
        "the plugin's bound {bound} ms is below the downtime {downtime} ms"
    );

    // The secret: nowhere.
    let secrets = std::fs::read_to_string(secrets.path())?;
    let mut needles = Vec::new();
    for line in secrets.lines() {
        let secret: serde_json::Value = serde_json::from_str(line)?;
        for part in ["key", "cert"] {
            let hex = secret[part].as_str().context("a secret part")?;
            // The hex, and a stretch of the key's bytes as any tool would print them.
            needles.push(hex.to_string());
            needles.push(hex[hex.len() / 2..hex.len() / 2 + 32].to_string());
        }
    }
    ensure!(!needles.is_empty(), "the plugin recorded no secret");
    let haystacks = [
        (
            "the plugin's output",
            format!("{}{}", out.stdout, out.stderr),
        ),
        (
            "the source pod",
            cluster.kubectl_ok(&["get", "pod", name, "-o", "yaml"])?,
        ),
        (
            "the target pod",
            cluster.kubectl_ok(&["get", "pod", &target, "-o", "yaml"])?,
        ),
        (
            "the Events",
            cluster.kubectl_ok(&["get", "events", "-o", "yaml"])?,
        ),
        ("the source's log", source_log),
        ("the target's log", target_log),
    ];
    for (what, text) in &haystacks {
        for needle in &needles {
            ensure!(
                !text.contains(needle.as_str()),
                "the transfer's secret appears in {what}"
            );
        }
    }
    cluster.kubectl_ok(&["delete", "pod", name, &target, "--wait=false"])?;
    Ok(())
}

/// Post-copy (`--lazy`): the counter with 64 MiB of random ballast moves node-a → node-b with
/// its memory following after the thaw. Its count continues and its ballast checksum (which
/// reads a byte of every page, so every page must have arrived intact) is unchanged. The
/// source is deleted only after the last page arrived: the target launcher's stamp of its last
/// page and the source launcher's report of every page served both precede the deletion.
///
/// A lazy dump holds the app's memory in pipes until the target has it, which needs the
/// source container to hold SYS_ADMIN (the kernel's per-user pipe limit) and the node's
/// `fs.pipe-max-size` at 4 MiB (CRIU's page-server pipe). The nodes of the local cluster share
/// this machine's kernel: first, with the default 1 MiB, the preflight refuses and names the
/// setting, and nothing changes; then the node is set up as the docs say (restored after).
pub fn post_copy_moves_the_counter_and_deletes_the_source_after_the_last_page(
    cluster: &Cluster,
) -> Result<()> {
    let name = "lazy";
    post_copy_source(cluster, name, "64")?;

    let pipe_max = Sysctl::set("fs/pipe-max-size", "1048576")?;
    let refused = migrate(cluster, &[name, "--to", "node-b", "--lazy"], &[])?;
    ensure!(
        refused.code == Some(1)
            && refused
                .stderr
                .contains("cannot be the source of a post-copy")
            && refused.stderr.contains("fs.pipe-max-size=4194304")
            && refused.stderr.contains("nothing was changed"),
        "with a 1 MiB fs.pipe-max-size --lazy was not refused up front naming the setting:\n{}",
        refused.stderr
    );
    cluster.wait_running(name, WAIT)?;
    pipe_max.write("4194304")?;

    let follow = Follow::start(cluster, name)?;
    let out = migrate_ok(
        cluster,
        &[name, "--to", "node-b", "--lazy", "-o", "json"],
        &[],
    )?;
    let report: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("the report is not JSON: {}", out.stdout))?;
    let target = format!("{name}-m1");
    ensure!(
        report["containers"]["counter"]["route"] == "direct",
        "post-copy did not go pod to pod: {}",
        report["containers"]["counter"]["route"]
    );
    let post_copy = report["post_copy"]
        .as_array()
        .and_then(|all| all.first())
        .with_context(|| format!("the report has no post-copy: {}", out.stdout))?;
    ensure!(
        post_copy["arrived"]["state"] == "complete",
        "the target's launcher did not report every page arrived: {post_copy}"
    );
    let served = &post_copy["served"];
    ensure!(
        served["ok"] == true && served["post_copy"]["state"] == "complete",
        "the source's launcher did not report every page served: {served}"
    );
    let arrived_at = post_copy["arrived"]["ended_at_ms"]
        .as_u64()
        .context("no time for the last page")?;
    let served_at = served["post_copy"]["ended_at_ms"]
        .as_u64()
        .context("no time for the last page served")?;
    let deleted_at = report["source_deleted_at_ms"]
        .as_u64()
        .context("no time for the source's deletion")?;
    ensure!(
        report["source_deleted"] == true,
        "the source was not deleted: {}",
        out.stdout
    );
    ensure!(
        arrived_at <= deleted_at && served_at <= deleted_at,
        "the source was deleted at {deleted_at} before the last page arrived ({arrived_at}) or was served ({served_at})"
    );
    let downtime = report["downtime_ms"].as_u64().unwrap_or_default();
    let before = follow.finish(WAIT);
    cluster.wait_running(&target, WAIT)?;
    wait_until(&format!("counts on {target}"), WAIT, || {
        Ok((counter_values(&logs(cluster, &target, None)).len() >= 10).then_some(()))
    })?;
    let target_log = logs(cluster, &target, None);
    let (last, first) = assert_continued(&before, &target_log)?;
    let (sum_before, sum_after) = (ballast(&before), ballast(&target_log));
    ensure!(
        sum_before.is_some() && sum_before == sum_after,
        "the ballast changed: {sum_before:?} → {sum_after:?}"
    );
    // Every page came, and the target's launcher kept nothing back.
    let status = cluster.kubectl_ok(&[
        "exec",
        &target,
        "-c",
        "counter",
        "--",
        "restore-launcher",
        "status",
    ])?;
    ensure!(
        status.contains("\"post_copy\"") && status.contains("\"complete\""),
        "the target's status does not say every page arrived: {status}"
    );
    eprintln!(
        "post-copy, 64 MiB ballast: count {last} → {first}; downtime {downtime} ms (freeze → thaw); \
         the last page arrived {} ms before the source's deletion was asked; {} archive bytes",
        deleted_at - arrived_at,
        report["bytes_moved"]
    );
    cluster.kubectl_ok(&["delete", "pod", &target, "--wait=false"])?;
    drop(pipe_max);
    Ok(())
}

/// Post-copy's risk, injected: the page channel goes silent once 256 MiB of a 1 GiB memory
/// has crossed (node-b's namespace drops the source pod's further packets; the archive, about
/// 85 KB, went first). After 60 s of silence both launchers give up. The target's launcher
/// kills the app, which cannot run without the rest of its memory, and the plugin exits 1
/// naming the post-copy failure and the two commands that go back to the source. Run as
/// given, they delete the target and resume the source: its count continues from the freeze
/// with no reset, and exactly one copy runs.
pub fn a_post_copy_cut_before_the_last_page_goes_back_to_the_source(
    cluster: &Cluster,
) -> Result<()> {
    let name = "lazycut";
    let target = format!("{name}-m1");
    post_copy_source(cluster, name, "1024")?;
    let source_ip = cluster.kubectl_ok(&["get", "pod", name, "-o", "jsonpath={.status.podIP}"])?;
    let _pipes = Sysctl::set("fs/pipe-max-size", "4194304")?;
    let wall = Wall::raise_after(cluster, source_ip.trim(), 256 << 20)?;
    let started = Instant::now();
    let out = migrate(cluster, &[name, "--to", "node-b", "--lazy"], &[])?;
    let took = started.elapsed();
    drop(wall);
    let back = format!(
        "kubectl delete pod {target} --wait && kubectl exec {name} -c counter -- restore-launcher rollback --committed"
    );
    ensure!(
        out.code == Some(1)
            && out.stderr.contains("post-copy failed")
            && out.stderr.contains("killed the app")
            && out.stderr.contains(&back),
        "a post-copy cut midway did not fail naming the way back ({back}):\n{}",
        out.stderr
    );
    // Nothing may advise deleting the source, which alone still holds all of the app.
    let deletes_source = out
        .stderr
        .split(['\n', ';', '&'])
        .map(|c| c.trim().trim_end_matches('.'))
        .any(|c| {
            c == format!("kubectl delete pod {name}")
                || c == format!("kubectl delete pod -n default {name}")
        });
    ensure!(
        !deletes_source && !out.stderr.contains("never resume it"),
        "the plugin advised deleting the source of a failed post-copy:\n{}",
        out.stderr
    );
    // It failed because the channel went silent (the relays give up after 60 s of it), not
    // for a cause of its own: the page daemon's CRIU error is quoted, or, when the target's
    // container had restarted by the time the plugin asked, that its post-copy was lost.
    ensure!(
        took >= Duration::from_secs(60)
            && (out.stderr.contains("page-xfer") || out.stderr.contains("knows of no post-copy")),
        "the post-copy failed after {took:?}, not after the channel's 60 s of silence:\n{}",
        out.stderr
    );
    // The way back, as the message gives it. Until it, the source stays frozen.
    let frozen_at = counter_values(&logs(cluster, name, None))
        .last()
        .map(|v| v.0)
        .context("the source printed no count")?;
    cluster.kubectl_ok(&["delete", "pod", &target, "--wait"])?;
    let still = counter_values(&logs(cluster, name, None))
        .last()
        .map(|v| v.0);
    ensure!(
        still == Some(frozen_at),
        "the source ran on before the rollback: {frozen_at} → {still:?}"
    );
    cluster.kubectl_ok(&[
        "exec",
        name,
        "-c",
        "counter",
        "--",
        "restore-launcher",
        "rollback",
        "--committed",
    ])?;
    wait_until("the source counting again", WAIT, || {
        let values = counter_values(&logs(cluster, name, None));
        Ok((values.last().map(|v| v.0) > Some(frozen_at + 5)).then_some(()))
    })?;
    let values: Vec<u64> = counter_values(&logs(cluster, name, None))
        .into_iter()
        .map(|v| v.0)
        .collect();
    ensure!(
        values.windows(2).all(|w| w[1] == w[0] + 1),
        "the source's count did not continue unbroken: {:?}",
        values.windows(2).find(|w| w[1] != w[0] + 1)
    );
    let restarts = cluster.kubectl_ok(&[
        "get",
        "pod",
        name,
        "-o",
        "jsonpath={.status.containerStatuses[0].restartCount}",
    ])?;
    ensure!(
        restarts.trim() == "0",
        "the source restarted {restarts} times"
    );
    let pods = cluster.kubectl_ok(&["get", "pods", "-o", "name"])?;
    ensure!(
        !pods.lines().any(|p| p.trim() == format!("pod/{target}")),
        "the target still exists: {pods}"
    );
    eprintln!(
        "post-copy cut after 256 MiB of 1 GiB: the plugin named the way back; after it the source counts on from {frozen_at}, one copy"
    );
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// The counter `name` on node-a, ticking every 20 ms with `ballast_mb` MiB of random memory,
/// able to serve post-copy (SYS_ADMIN: a lazy dump holds all of its memory in pipes, beyond
/// the kernel's per-user limit); returns once it counts.
fn post_copy_source(cluster: &Cluster, name: &str, ballast_mb: &str) -> Result<()> {
    let mut pod: serde_yaml::Value = serde_yaml::from_str(&example_pod(
        "counter/pod.yaml",
        name,
        "node-a",
        &[
            ("COUNTER_INTERVAL", "0.02"),
            ("COUNTER_BALLAST_MB", ballast_mb),
        ],
    )?)?;
    pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_sequence_mut()
        .context("the counter's capabilities")?
        .push("SYS_ADMIN".into());
    cluster.apply(&serde_yaml::to_string(&pod)?)?;
    cluster.wait_running(name, WAIT)?;
    wait_until("the counter ticking", WAIT, || {
        Ok((counter_values(&logs(cluster, name, None)).len() >= 10).then_some(()))
    })?;
    Ok(())
}

/// A kernel setting under /proc/sys, put back as it was when dropped.
struct Sysctl {
    path: PathBuf,
    was: String,
}

impl Sysctl {
    fn set(name: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from("/proc/sys").join(name);
        let was = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let sysctl = Self { path, was };
        sysctl.write(value)?;
        Ok(sysctl)
    }

    fn write(&self, value: &str) -> Result<()> {
        std::fs::write(&self.path, value)
            .with_context(|| format!("setting {} to {value}", self.path.display()))
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.was.trim());
    }
}

/// The moved counter `NAME-m1` runs and its count continues from the source's last (the
/// source's log followed by `follow` until it ended).
fn target_continues(cluster: &Cluster, name: &str, follow: Follow) -> Result<()> {
    let target = format!("{name}-m1");
    cluster.wait_running(&target, WAIT)?;
    let before = follow.finish(WAIT);
    wait_until("counts on the target", WAIT, || {
        Ok((counter_values(&logs(cluster, &target, None)).len() >= 3).then_some(()))
    })?;
    assert_continued(&before, &logs(cluster, &target, None)).map(drop)
}

/// Runs `kubectl-migrate ARGS` in the background with `env`; its stderr lines arrive on the
/// returned channel as they come.
fn plugin_in_background(
    cluster: &Cluster,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<(Child, std::sync::mpsc::Receiver<String>)> {
    let mut plugin = Command::new(workspace_binary("kubectl-migrate"))
        .args(args)
        .envs(env.iter().copied())
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = plugin.stderr.take().context("stderr")?;
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    Ok((plugin, received))
}

/// While the target waits for the source, another pod connects to its port, once with plain
/// bytes and once with TLS but no certificate: both are turned away, nothing of the archive
/// reaches them, and the target goes on waiting; 24 idle connections from that pod, more than
/// the handshakes the target runs at once, held through the move, do not keep the real
/// source out: the target takes its archive. Then a
/// source handed a wrong secret: the migration fails cleanly, the target is deleted and the
/// source counts on.
pub fn a_peer_without_the_secret_gets_nothing_and_a_wrong_secret_undoes(
    cluster: &Cluster,
) -> Result<()> {
    let name = "guarded";
    run_counter(cluster, name, "node-a", &[])?;
    run_counter(cluster, "intruder", "node-a", &[])?;
    let follow = Follow::start(cluster, name)?;
    let hold = tempfile::NamedTempFile::new()?;
    let hold_path = hold.path().to_str().context("temp path")?.to_string();
    let (plugin, lines) = plugin_in_background(
        cluster,
        &[name, "--to", "node-b"],
        &[
            ("KUBECTL_MIGRATE_FAULT_HOLD_AT", "target-listening"),
            ("KUBECTL_MIGRATE_FAULT_HOLD_FILE", &hold_path),
        ],
    )?;
    let address = wait_until("the target listening", WAIT, || {
        Ok(lines.try_recv().ok().and_then(|line| {
            line.split("holding at target-listening (")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .map(str::to_string)
        }))
    })?;
    let (ip, port) = address.rsplit_once(':').context("an address")?;
    // From another pod: plain bytes, then a TLS client with no certificate.
    let probe = format!(
        "import socket, ssl\n\
         s = socket.create_connection(('{ip}', {port}), 5); s.settimeout(15)\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         try: d = s.recv(65536); print('plain got', len(d), 'bytes', d[:1].hex() or '-')\n\
         except Exception as e: print('plain refused:', type(e).__name__)\n\
         c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE\n\
         try:\n  t = c.wrap_socket(socket.create_connection(('{ip}', {port}), 5)); t.settimeout(15)\n  print('tls got', len(t.recv(65536)), 'bytes')\n\
         except Exception as e: print('tls refused:', type(e).__name__, e)\n"
    );
    let intruder = cluster
        .kubectl(&["exec", "intruder", "--", "python3", "-c", &probe])
        .output()?;
    let said = String::from_utf8_lossy(&intruder.stdout).into_owned()
        + &String::from_utf8_lossy(&intruder.stderr);
    eprintln!(
        "a pod without the secret: {}",
        said.trim().replace('\n', "; ")
    );
    // Nothing, or a TLS alert record (content type 0x15, 7 bytes), never data.
    ensure!(
        said.contains("plain got 0 bytes")
            || said.contains("plain got 7 bytes 15")
            || said.contains("plain refused"),
        "plain bytes got an answer: {said}"
    );
    ensure!(
        said.contains("tls refused") || said.contains("tls got 0 bytes"),
        "a TLS client without the certificate was not turned away: {said}"
    );
    ensure!(
        launcher_in(cluster, &format!("{name}-m1"), "waiting"),
        "the target stopped waiting after the intruder"
    );
    // More idle connections than the target runs handshakes at once, held open through the
    // move: the target closes them at once (not the source pod's address), and the source's
    // own connection still gets through.
    let idle = format!(
        "import socket, time\n\
         s = [socket.create_connection(('{ip}', {port}), 5) for _ in range(24)]\n\
         print('idle', len(s), flush=True)\n\
         time.sleep(300)\n"
    );
    let mut crowd = cluster
        .kubectl(&["exec", "intruder", "--", "python3", "-c", &idle])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut crowd_said = String::new();
    BufReader::new(crowd.stdout.take().context("stdout")?).read_line(&mut crowd_said)?;
    ensure!(
        crowd_said.trim() == "idle 24",
        "the idle connections were not made: {crowd_said}"
    );
    drop(hold); // the plugin goes on
    let (code, stderr) = plugin_ended(plugin)?;
    let _ = crowd.kill();
    ensure!(
        code == Some(0),
        "the migration failed after the intruder, with 24 idle connections to the target:\n{stderr}"
    );
    target_continues(cluster, name, follow)?;

    // A source with the wrong secret.
    let wrong = "wrong-secret";
    run_counter(cluster, wrong, "node-a", &[])?;
    let follow = Follow::start(cluster, wrong)?;
    let out = migrate(
        cluster,
        &[wrong, "--to", "node-b"],
        &[("KUBECTL_MIGRATE_FAULT_WRONG_SECRET", "1")],
    )?;
    ensure!(
        out.stderr.contains("could not be set up"),
        "the failure does not say the encrypted channel could not be set up:\n{}",
        out.stderr
    );
    undone_with_source_counting(
        cluster,
        wrong,
        follow,
        out.code,
        &out.stderr,
        "wrong secret",
    )?;
    cluster.kubectl_ok(&[
        "delete",
        "pod",
        &format!("{name}-m1"),
        "intruder",
        "--wait=false",
    ])?;
    Ok(())
}

/// Drops TCP from node-a's pods to node-b's in node-b's network namespace (as a NetworkPolicy
/// would), and takes the rule away when dropped.
struct Wall<'a> {
    cluster: &'a Cluster,
}

impl<'a> Wall<'a> {
    fn raise(cluster: &'a Cluster) -> Result<Wall<'a>> {
        let (from, to) = (
            cluster.pod_subnet("node-a").context("node-a")?,
            cluster.pod_subnet("node-b").context("node-b")?,
        );
        Self::rule(
            cluster,
            &format!("ip saddr {from} ip daddr {to} meta l4proto tcp drop"),
        )
    }

    /// Lets the first `bytes` of TCP from the pod at `from` to node-b's pods through, then
    /// drops every further packet (an nftables quota on the rule): a channel that goes silent
    /// mid-stream, as a failed node or network leaves it.
    fn raise_after(cluster: &'a Cluster, from: &str, bytes: u64) -> Result<Wall<'a>> {
        let to = cluster.pod_subnet("node-b").context("node-b")?;
        Self::rule(
            cluster,
            &format!(
                "ip saddr {from} ip daddr {to} meta l4proto tcp quota over {bytes} bytes drop"
            ),
        )
    }

    fn rule(cluster: &'a Cluster, rule: &str) -> Result<Wall<'a>> {
        let rules = format!(
            "table inet migrate-test {{\n\
               chain forward {{ type filter hook forward priority 0; {rule}; }}\n\
             }}\n"
        );
        let mut nft = cluster
            .node_command("node-b", "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("run nft (apt-get install nftables)")?;
        nft.stdin
            .take()
            .context("stdin")?
            .write_all(rules.as_bytes())?;
        ensure!(nft.wait()?.success(), "nft refused the rule");
        Ok(Wall { cluster })
    }
}

impl Drop for Wall<'_> {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .node_command("node-b", "nft")
            .args(["delete", "table", "inet", "migrate-test"])
            .status();
    }
}

/// With TCP from node-a's pods to node-b's dropped in node-b's namespace: `--transfer direct`
/// fails cleanly naming the connection it could not make (target deleted, source counting),
/// and `--transfer auto` says it falls back to the relay and moves the counter.
pub fn a_blocked_direct_path_fails_direct_and_falls_back_with_auto(
    cluster: &Cluster,
) -> Result<()> {
    let wall = Wall::raise(cluster)?;
    let name = "walled";
    run_counter(cluster, name, "node-a", &[])?;
    let follow = Follow::start(cluster, name)?;
    let out = migrate(
        cluster,
        &[name, "--to", "node-b", "--transfer", "direct"],
        &[],
    )?;
    ensure!(
        out.stderr
            .contains("cannot connect to the target at 10.88.2."),
        "the failure does not name the blocked connection:\n{}",
        out.stderr
    );
    undone_with_source_counting(
        cluster,
        name,
        follow,
        out.code,
        &out.stderr,
        "blocked, --transfer direct",
    )?;

    let name = "walled-auto";
    run_counter(cluster, name, "node-a", &[])?;
    let follow = Follow::start(cluster, name)?;
    let out = migrate_ok(cluster, &[name, "--to", "node-b"], &[])?;
    let said: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("relaying the checkpoint through the API server"))
        .collect();
    ensure!(
        said.len() == 1 && said[0].contains("cannot connect"),
        "auto did not say, in one line, that it falls back and why:\n{}",
        out.stderr
    );
    ensure!(
        out.stdout.contains("counter: relayed transfer"),
        "the report does not say the archive was relayed:\n{}",
        out.stdout
    );
    drop(wall);
    target_continues(cluster, name, follow)?;
    eprintln!(
        "blocked path: direct refused, auto relayed: {}",
        said[0].trim()
    );
    cluster.kubectl_ok(&["delete", "pod", &format!("{name}-m1"), "--wait=false"])?;
    Ok(())
}

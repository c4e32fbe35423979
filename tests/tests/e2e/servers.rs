//! Real servers as their images run them, on the same cluster: a non-root pod, an app holding
//! SysV IPC objects, and PostgreSQL run as its own user with a client load during the move.

use migrate_tests::sysv_ticks;

use super::*;

/// A pod from `images/examples/FILE` (see [`example_pod`]) with `edit` applied to its YAML.
fn edited_pod(
    file: &str,
    name: &str,
    node: &str,
    env: &[(&str, &str)],
    edit: impl FnOnce(&mut serde_yaml::Value),
) -> Result<String> {
    let mut pod: serde_yaml::Value = serde_yaml::from_str(&example_pod(file, name, node, env)?)?;
    edit(&mut pod);
    Ok(serde_yaml::to_string(&pod)?)
}

/// The counter as uid 1000 in a `runAsNonRoot` pod, its container as in the example (drop
/// ALL, `allowPrivilegeEscalation: false`) adding the capabilities `add`, with an emptyDir at
/// /data that travels (`RESTORE_LAUNCHER_INCLUDE`).
fn non_root_counter(name: &str, add: &str) -> Result<String> {
    edited_pod(
        "counter/pod.yaml",
        name,
        "node-a",
        &[
            ("COUNTER_INTERVAL", "0.5"),
            ("RESTORE_LAUNCHER_INCLUDE", "/data"),
        ],
        |pod| {
            pod["spec"]["securityContext"] =
                serde_yaml::from_str("{runAsUser: 1000, runAsGroup: 1000, runAsNonRoot: true}")
                    .expect("static YAML");
            pod["spec"]["volumes"] =
                serde_yaml::from_str("[{name: data, emptyDir: {}}]").expect("static YAML");
            let container = &mut pod["spec"]["containers"][0];
            container["volumeMounts"] =
                serde_yaml::from_str("[{name: data, mountPath: /data}]").expect("static YAML");
            container["securityContext"]["capabilities"]["add"] =
                serde_yaml::from_str(add).expect("static YAML");
        },
    )
}

/// A process of the app's user cannot borrow the launcher's capabilities: in a uid-1000 pod
/// that leaves privilege escalation allowed (so an exec of the launcher binary gains its file
/// capabilities), a shell runs the launcher with `RESTORE_LAUNCHER_CRIU` pointing at its own
/// script. The launcher, not the container's PID 1, refuses to start naming
/// `allowPrivilegeEscalation: false`, and the script never runs; the pod's own launcher (PID 1)
/// works.
pub fn the_apps_user_cannot_borrow_the_launchers_capabilities(cluster: &Cluster) -> Result<()> {
    let name = "nonroot-borrow";
    let mut pod: serde_yaml::Value =
        serde_yaml::from_str(&non_root_counter(name, "[CHECKPOINT_RESTORE, SETPCAP]")?)?;
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = true.into();
    cluster.apply(&serde_yaml::to_string(&pod)?)?;
    cluster.wait_running(name, WAIT)?;
    let own = cluster.kubectl_ok(&["exec", name, "--", "restore-launcher", "status"])?;
    ensure!(own.contains(r#""state":"running""#), "{own}");
    let script = r#"printf '#!/bin/sh\necho ran-as-criu; grep ^CapEff: /proc/self/status\n' > /tmp/x
chmod +x /tmp/x
RESTORE_LAUNCHER_CRIU=/tmp/x restore-launcher --state-dir /tmp/s -- true 2>&1
echo "exit=$?""#;
    let out = cluster.kubectl_ok(&["exec", name, "--", "sh", "-c", script])?;
    let borrowed = out
        .lines()
        .any(|l| l.starts_with("CapEff:") && !l.ends_with("0000000000000000"));
    ensure!(
        !borrowed,
        "the app's user ran its code with the launcher's capabilities:\n{out}"
    );
    ensure!(
        out.contains("is not the container's PID 1")
            && out.contains("allowPrivilegeEscalation: false")
            && out.contains("exit=1")
            && !out.contains("ran-as-criu"),
        "the launcher did not refuse: {out}"
    );
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// `PID STATE` of the python3 processes in `pod`, read inside it.
fn python_states(cluster: &Cluster, pod: &str) -> Result<Vec<(String, String)>> {
    let out = cluster.kubectl_ok(&["exec", pod, "--", "sh", "-c", migrate_tests::LIST_STATS])?;
    Ok(migrate_tests::states_named(&out, "python3"))
}

/// In a uid-1000 pod (the launcher and the app the same user), after `freeze`, `checkpoint`
/// and `commit` as the plugin runs them, a shell of the app's user sends SIGCONT to every
/// process it may (`kill -CONT -1`) and asks `rollback --committed`: the rollback is refused,
/// the app stays in a trace stop and counts nothing. `kubectl exec … rollback --committed`
/// itself (the plugin's way back) resumes it, and the count goes on from where it stopped.
pub fn a_shell_of_the_apps_user_cannot_resume_a_committed_copy(cluster: &Cluster) -> Result<()> {
    let name = "nonroot-held";
    cluster.apply(&non_root_counter(name, "[CHECKPOINT_RESTORE, SETPCAP]")?)?;
    cluster.wait_running(name, WAIT)?;
    let follow = Follow::start(cluster, name)?;
    wait_until("the counter counting", WAIT, || {
        Ok((counter_values(&follow.text()).len() >= 3).then_some(()))
    })?;
    for args in [
        &["freeze", "--migration", "mig-held", "--lease", "120"][..],
        &["checkpoint", "--output", "/tmp/held.tar.zst"],
        &["commit"],
    ] {
        let mut full = vec!["exec", name, "--", "restore-launcher"];
        full.extend_from_slice(args);
        cluster.kubectl_ok(&full)?;
    }
    let said = cluster.kubectl_ok(&[
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "id -u; kill -CONT -1; restore-launcher rollback --committed 2>&1; echo exit=$?",
    ])?;
    ensure!(
        said.starts_with("1000\n")
            && said.contains("rollback --committed is taken only from `kubectl exec")
            && said.contains("exit=1"),
        "the shell of the app's user was not refused: {said}"
    );
    let seen = counter_values(&follow.text()).len();
    let states = python_states(cluster, name)?;
    ensure!(
        !states.is_empty() && states.iter().all(|(_, state)| state == "t"),
        "the committed copy is not held in a trace stop after SIGCONT: {states:?}"
    );
    // The counter ticks every 0.5 s: 2 s without a line is 4 ticks that did not happen.
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        counter_values(&follow.text()).len() == seen,
        "the committed copy counted after SIGCONT"
    );
    cluster.kubectl_ok(&[
        "exec",
        name,
        "--",
        "restore-launcher",
        "rollback",
        "--committed",
    ])?;
    wait_until("the counter counting again", WAIT, || {
        Ok((counter_values(&follow.text()).len() >= seen + 2).then_some(()))
    })?;
    let values = counter_values(&follow.text());
    for pair in values.windows(2) {
        ensure!(pair[1].0 == pair[0].0 + 1, "the count broke: {pair:?}");
    }
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// The app of [`a_user_pods_orphan_fails_the_checkpoint_and_the_source_keeps_counting`]: it
/// leaves an orphan (a double fork whose middle process exits) that waits for `criu` to appear
/// and then tries to replace one of its images with a symlink, logging to /tmp/orphan.log;
/// then it runs the counter.
const ORPHAN_APP: &str = r#"import os, time
if os.fork() == 0:
    if os.fork() == 0:
        log = open('/tmp/orphan.log', 'a', buffering=1)
        log.write(f'orphan {os.getpid()}\n')
        while True:
            for p in os.listdir('/proc'):
                try:
                    if p.isdigit() and open(f'/proc/{p}/comm').read().strip() == 'criu':
                        d = f'/proc/{p}/cwd'
                        image = next(n for n in os.listdir(d) if n.endswith('.img'))
                        os.unlink(f'{d}/{image}')
                        os.symlink('/etc/passwd', f'{d}/{image}')
                        log.write(f'swapped {d}/{image}\n')
                except (OSError, StopIteration) as e:
                    pass
            time.sleep(0.005)
    os._exit(0)
os.wait()
os.execvp('python3', ['python3', '-u', '/app/counter.py'])
"#;

/// A `--user` pod (the launcher root, the app uid 1000, as the postgres and redis images run)
/// whose app left an orphan waiting for `criu` to swap an image: the migration fails at the
/// checkpoint naming the orphan, the target is deleted (nothing restored), and the source
/// keeps counting without a restart; the orphan swapped nothing. Under the plugin the app is
/// frozen before the checkpoint, so an orphan can only have left before it, and the check
/// before the dump names it; the race of an orphan leaving while CRIU freezes the app (and
/// the images it then cannot reach) is the real-CRIU test
/// `an_orphan_escaping_during_a_user_dump_reaches_no_image_and_fails_the_checkpoint`.
pub fn a_user_pods_orphan_fails_the_checkpoint_and_the_source_keeps_counting(
    cluster: &Cluster,
) -> Result<()> {
    let name = "user-orphan";
    let pod = edited_pod(
        "counter/pod.yaml",
        name,
        "node-a",
        &[
            ("COUNTER_INTERVAL", "0.5"),
            ("RESTORE_LAUNCHER_USER", "1000:1000"),
        ],
        |pod| {
            let container = &mut pod["spec"]["containers"][0];
            container["args"] = vec!["python3", "-c", ORPHAN_APP].into();
            container["securityContext"]["capabilities"]["add"] =
                serde_yaml::from_str("[CHECKPOINT_RESTORE, SETPCAP, SETUID, SETGID, KILL, CHOWN]")
                    .expect("static YAML");
        },
    )?;
    cluster.apply(&pod)?;
    cluster.wait_running(name, WAIT)?;
    let follow = Follow::start(cluster, name)?;
    let orphan = wait_until("the orphan started", WAIT, || {
        let log = cluster
            .kubectl_ok(&["exec", name, "--", "cat", "/tmp/orphan.log"])
            .unwrap_or_default();
        Ok(log
            .lines()
            .find_map(|l| l.strip_prefix("orphan "))
            .map(str::to_string))
    })?;
    let users = cluster.kubectl_ok(&[
        "exec",
        name,
        "--",
        "stat",
        "-c",
        "%u",
        &format!("/proc/{orphan}"),
    ])?;
    ensure!(
        users.trim() == "1000",
        "the orphan runs as {users}, not 1000"
    );
    wait_until("the counter counting", WAIT, || {
        Ok((counter_values(&follow.text()).len() >= 3).then_some(()))
    })?;
    let out = migrate(cluster, &[name, "--to", "node-b"], &[])?;
    ensure!(
        out.code.is_some_and(|c| c != 0),
        "a checkpoint that leaves a process behind must fail the migration:\n{}{}",
        out.stdout,
        out.stderr
    );
    ensure!(
        out.stderr.contains("left the app's process tree")
            && out.stderr.contains(&format!("{orphan} (python3)")),
        "the message does not name the orphan {orphan}:\n{}",
        out.stderr
    );
    ensure!(
        out.stderr.contains("keeps running with its state"),
        "the message does not say the source keeps running:\n{}",
        out.stderr
    );
    wait_gone(cluster, &format!("{name}-m1"))?;
    source_kept_counting(cluster, name, follow)?;
    let log = cluster.kubectl_ok(&["exec", name, "--", "cat", "/tmp/orphan.log"])?;
    ensure!(
        !log.contains("swapped"),
        "the orphan replaced an image:\n{log}"
    );
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// Makes /data/owned (0750) with a file `note` of mode 0640 carrying the xattr
/// `user.origin=node-a`, as the container's user; prints `uid:gid mode` of both and the
/// attribute's value.
const OWNED_FILES: &str = "import os
if not os.path.exists('/data/owned'):
    os.makedirs('/data/owned', 0o750)
    with open('/data/owned/note', 'w') as f:
        f.write('kept by uid 1000\\n')
    os.chmod('/data/owned/note', 0o640)
    os.setxattr('/data/owned/note', 'user.origin', b'node-a')
for p in ['/data/owned', '/data/owned/note']:
    s = os.stat(p)
    print('%d:%d %o' % (s.st_uid, s.st_gid, s.st_mode & 0o7777))
print(os.getxattr('/data/owned/note', 'user.origin').decode(), open('/data/owned/note').read().strip())";

/// A `runAsNonRoot` pod (uid 1000, `allowPrivilegeEscalation: false`) migrates with its count
/// continuing: the launcher gets its two capabilities from the image's file capabilities
/// (runc grants them to the permitted set before exec, so no_new_privs keeps them), criu gets
/// them as ambient ones, and the app none. Without CHECKPOINT_RESTORE the move fails naming
/// it, and the source counts on.
pub fn non_root_pod_moves(cluster: &Cluster) -> Result<()> {
    cluster.apply(&non_root_counter(
        "nonroot",
        "[CHECKPOINT_RESTORE, SETPCAP]",
    )?)?;
    cluster.wait_running("nonroot", WAIT)?;
    wait_until("nonroot counts", WAIT, || {
        Ok((counter_values(&logs(cluster, "nonroot", None)).len() >= 4).then_some(()))
    })?;
    // An included directory of the non-root user: owner, modes and xattr must arrive.
    let owned = cluster.kubectl_ok(&["exec", "nonroot", "--", "python3", "-c", OWNED_FILES])?;
    ensure!(
        owned == "1000:1000 750\n1000:1000 640\nnode-a kept by uid 1000\n",
        "the source's files are not as made: {owned:?}"
    );
    let follow = Follow::start(cluster, "nonroot")?;
    migrate_ok(cluster, &["nonroot", "--to", "node-b"], &[])?;
    cluster.wait_running("nonroot-m1", WAIT)?;
    let arrived =
        cluster.kubectl_ok(&["exec", "nonroot-m1", "--", "python3", "-c", OWNED_FILES])?;
    ensure!(
        arrived == owned,
        "the included files arrived as {arrived:?}, not {owned:?}"
    );
    let before = follow.finish(WAIT);
    wait_until("3 counts on nonroot-m1", WAIT, || {
        Ok((counter_values(&logs(cluster, "nonroot-m1", None)).len() >= 3).then_some(()))
    })?;
    assert_continued(&before, &logs(cluster, "nonroot-m1", None))?;
    let ids = cluster.kubectl_ok(&[
        "exec",
        "nonroot-m1",
        "--",
        "sh",
        "-c",
        "stat -c %u /proc/1 /proc/1000; grep ^NoNewPrivs: /proc/1/status; grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/1000/status",
    ])?;
    let lines: Vec<&str> = ids.lines().collect();
    ensure!(
        lines.len() == 7 && lines[0] == "1000" && lines[1] == "1000",
        "the launcher and the restored app do not both run as uid 1000: {ids}"
    );
    ensure!(
        lines[2].ends_with('1'),
        "the target does not run under no_new_privs: {}",
        lines[2]
    );
    for line in &lines[3..] {
        ensure!(
            line.split_whitespace().nth(1) == Some("0000000000000000"),
            "the restored app holds capabilities: {line}"
        );
    }

    cluster.apply(&non_root_counter("nonroot-nocr", "[SETPCAP]")?)?;
    cluster.wait_running("nonroot-nocr", WAIT)?;
    wait_until("nonroot-nocr counts", WAIT, || {
        Ok((counter_values(&logs(cluster, "nonroot-nocr", None)).len() >= 4).then_some(()))
    })?;
    let out = migrate(cluster, &["nonroot-nocr", "--to", "node-b"], &[])?;
    ensure!(
        out.code != Some(0)
            && out
                .stderr
                .contains("runs as uid 1000 and its pod does not grant CHECKPOINT_RESTORE"),
        "the move was not refused naming the capability: {:?}\n{}",
        out.code,
        out.stderr
    );
    wait_gone(cluster, "nonroot-nocr-m1")?;
    let seen = counter_values(&logs(cluster, "nonroot-nocr", None)).len();
    wait_until("nonroot-nocr counting on", WAIT, || {
        Ok((counter_values(&logs(cluster, "nonroot-nocr", None)).len() >= seen + 2).then_some(()))
    })?;
    for pod in ["nonroot-m1", "nonroot-nocr"] {
        cluster.kubectl_ok(&["delete", "pod", pod, "--wait=false"])?;
    }
    Ok(())
}

/// The SysV app with `RESTORE_LAUNCHER_IPC_NAMESPACE` (its pod.yaml) moves with its semaphore
/// set, message queue and shared memory intact; the same app without the option is refused
/// by the preflight and by the move, both naming the option, and keeps running.
pub fn sysv_app_moves_in_its_ipc_namespace(cluster: &Cluster) -> Result<()> {
    cluster.apply(&example_pod("sysv/pod.yaml", "sysv", "node-a", &[])?)?;
    cluster.wait_running("sysv", WAIT)?;
    wait_until("sysv ticks", WAIT, || {
        Ok((sysv_ticks(&logs(cluster, "sysv", None)).len() >= 5).then_some(()))
    })?;
    let follow = Follow::start(cluster, "sysv")?;
    migrate_ok(cluster, &["sysv", "--to", "node-b"], &[])?;
    cluster.wait_running("sysv-m1", WAIT)?;
    let before = follow.finish(WAIT);
    let last = sysv_ticks(&before).last().cloned().context("no tick")?;
    let after = wait_until("3 ticks on sysv-m1", WAIT, || {
        let ticks = sysv_ticks(&logs(cluster, "sysv-m1", None));
        Ok((ticks.len() >= 3).then_some(ticks))
    })?;
    for (i, (events, sem, mark, msg, shm)) in after.iter().enumerate() {
        let expected = last.0 + 1 + i as u64;
        ensure!(
            *events == expected && *sem == expected && *mark == 41,
            "the semaphores did not travel: last on the source {last:?}, target {after:?}"
        );
        ensure!(
            *msg == format!("m{}", expected - 3) && *shm == expected.to_string(),
            "the message queue or shared memory did not travel: {after:?}"
        );
    }

    // Without the option: named by the preflight and the move; nothing changes.
    let plain = edited_pod("sysv/pod.yaml", "sysv-plain", "node-a", &[], |pod| {
        let container = &mut pod["spec"]["containers"][0];
        if let Some(map) = container.as_mapping_mut() {
            map.remove("env");
        }
        container["securityContext"]["capabilities"]["add"] =
            serde_yaml::from_str("[CHECKPOINT_RESTORE, SETPCAP]").expect("static YAML");
    })?;
    cluster.apply(&plain)?;
    cluster.wait_running("sysv-plain", WAIT)?;
    wait_until("sysv-plain ticks", WAIT, || {
        Ok((sysv_ticks(&logs(cluster, "sysv-plain", None)).len() >= 2).then_some(()))
    })?;
    let check = migrate(cluster, &["check", "sysv-plain", "--to", "node-b"], &[])?;
    let said = format!("{}{}", check.stdout, check.stderr);
    ensure!(
        check.code != Some(0)
            && said.contains("SysV semaphore set")
            && said.contains("RESTORE_LAUNCHER_IPC_NAMESPACE=true"),
        "the preflight did not name the SysV objects and the option: {:?}\n{}{}",
        check.code,
        check.stdout,
        check.stderr
    );
    let out = migrate(cluster, &["sysv-plain", "--to", "node-b"], &[])?;
    ensure!(
        out.code != Some(0) && out.stderr.contains("RESTORE_LAUNCHER_IPC_NAMESPACE=true"),
        "the move was not refused naming the option: {:?}\n{}",
        out.code,
        out.stderr
    );
    let missing = cluster.kubectl(&["get", "pod", "sysv-plain-m1"]).output()?;
    ensure!(!missing.status.success(), "a target pod was created");
    let seen = sysv_ticks(&logs(cluster, "sysv-plain", None)).len();
    wait_until("sysv-plain ticking on", WAIT, || {
        Ok((sysv_ticks(&logs(cluster, "sysv-plain", None)).len() >= seen + 2).then_some(()))
    })?;
    for pod in ["sysv-m1", "sysv-plain"] {
        cluster.kubectl_ok(&["delete", "pod", pod, "--wait=false"])?;
    }
    Ok(())
}

/// `psql` in `pod` against its own server, as the postgres database user; one value per line.
fn psql(cluster: &Cluster, pod: &str, sql: &str) -> Result<String> {
    Ok(cluster
        .kubectl_ok(&[
            "exec",
            pod,
            "--",
            "psql",
            "-qAt",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-c",
            sql,
        ])?
        .trim()
        .to_string())
}

/// What only the running server holds, and the data: the postmaster's start time (a restart
/// changes it), the rows of an unlogged table (crash recovery over the copied data directory
/// empties it), and the table's checksum.
const STATE: &str = "select pg_postmaster_start_time(), (select count(*) from unlogged_notes), \
     (select md5(string_agg(v, ',' order by id)) from rows)";

/// The client pod's loops. `probe`: one new connection and one INSERT per attempt, each
/// logged `ok|fail EPOCH_MS`; `pgbench`: 4 clients over persistent connections, runs that end
/// when their connections do, restarted against the current address. The address is in
/// /tmp/host, which the test rewrites once the target is Ready, as a Service's endpoints would
/// change. Both set libpq timeouts, as a client of a database that can move must: without
/// `tcp_user_timeout` a connection to the deleted source's address hangs for TCP's
/// retransmission limit (about 15 minutes), since nothing is left there to reset it.
const CLIENT: &str = r#"
touch /tmp/probe /tmp/runs
while [ ! -s /tmp/host ]; do sleep 0.1; done
opts="user=postgres dbname=postgres connect_timeout=2 tcp_user_timeout=3000 keepalives_idle=1 keepalives_interval=1 keepalives_count=2"
(while :; do
   h=$(cat /tmp/host)
   if psql -qAt "host=$h $opts" -c "insert into acked(at) values (now())" \
        -v ON_ERROR_STOP=1 >/dev/null 2>&1 </dev/null; then
     echo "ok $(date +%s%3N)" >>/tmp/probe
   else
     echo "fail $(date +%s%3N)" >>/tmp/probe
   fi
   sleep 0.05
 done) &
n=0
while :; do
  n=$((n+1))
  pgbench -n -c 4 -j 2 -T 600 "host=$(cat /tmp/host) $opts" >/tmp/pgbench.$n 2>&1 </dev/null
  echo "run $n exit $? $(date +%s%3N)" >>/tmp/runs
  sleep 0.2
done
"#;

/// PostgreSQL (Debian's 17, the server run as the postgres user, data in a carried emptyDir,
/// SysV shared memory in its own IPC namespace) moves node-a → node-b while a client pod
/// runs pgbench and a reconnecting probe against it: the rows and their checksum are the
/// same, state only the running server holds survives (same postmaster start time, the
/// unlogged table's rows, which crash recovery would have emptied), the target's log shows
/// no recovery, every INSERT acknowledged before the freeze is there, and the database takes
/// writes afterwards. Prints what clients saw: pgbench's failed transactions and aborted
/// clients, and the probe's reconnect gap.
pub fn postgres_moves_with_clients(cluster: &Cluster) -> Result<()> {
    cluster.apply(&example_pod("postgres/pod.yaml", "pg", "node-a", &[])?)?;
    cluster.wait_running("pg", WAIT)?;
    wait_until("PostgreSQL accepting connections", WAIT, || {
        Ok(psql(cluster, "pg", "select 1").ok().filter(|v| v == "1"))
    })?;
    psql(
        cluster,
        "pg",
        "create table rows(id int primary key, v text); \
         insert into rows select g, md5(g::text) from generate_series(1, 20000) g; \
         create unlogged table unlogged_notes(id int); \
         insert into unlogged_notes select generate_series(1, 500); \
         create table acked(id bigserial primary key, at timestamptz)",
    )?;
    cluster.kubectl_ok(&[
        "exec",
        "pg",
        "--",
        "pgbench",
        "-i",
        "-q",
        "-s",
        "2",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "postgres",
    ])?;
    let users = cluster.kubectl_ok(&["exec", "pg", "--", "stat", "-c", "%U", "/proc/1000"])?;
    ensure!(
        users.trim() == "postgres",
        "the server runs as {users}, not postgres"
    );
    let state_before = psql(cluster, "pg", STATE)?;

    // The client pod: the same image, its own command (no launcher), on node-a.
    let client = edited_pod("postgres/pod.yaml", "pgclient", "node-a", &[], |pod| {
        let container = &mut pod["spec"]["containers"][0];
        container["command"] = serde_yaml::from_str("[sh, -c]").expect("static YAML");
        container["args"] = vec![CLIENT].into();
        for key in ["env", "readinessProbe", "ports", "volumeMounts"] {
            if let Some(map) = container.as_mapping_mut() {
                map.remove(key);
            }
        }
        container["securityContext"] =
            serde_yaml::from_str("{capabilities: {drop: [ALL]}}").expect("static YAML");
        if let Some(map) = pod["spec"].as_mapping_mut() {
            map.remove("volumes");
        }
    })?;
    let source_ip = pod_field(cluster, "pg", "{.status.podIP}")?;
    cluster.apply(&client)?;
    cluster.wait_running("pgclient", WAIT)?;
    cluster.kubectl_ok(&[
        "exec",
        "pgclient",
        "--",
        "sh",
        "-c",
        &format!("echo {source_ip} >/tmp/host"),
    ])?;
    let probe = |cluster: &Cluster| -> Result<Vec<(bool, u64)>> {
        let text = cluster.kubectl_ok(&["exec", "pgclient", "--", "cat", "/tmp/probe"])?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let (kind, at) = l.split_once(' ')?;
                Some((kind == "ok", at.parse().ok()?))
            })
            .collect())
    };
    wait_until("the probe's first acknowledged inserts", WAIT, || {
        Ok((probe(cluster)?.iter().filter(|(ok, _)| *ok).count() >= 20).then_some(()))
    })?;

    let out = migrate_ok(cluster, &["pg", "--to", "node-b"], &[])?;
    cluster.wait_running("pg-m1", WAIT)?;
    // What the cluster's Service would do once the target is Ready: new connections go there.
    let target_ip = pod_field(cluster, "pg-m1", "{.status.podIP}")?;
    let switched_at = cluster.kubectl_ok(&[
        "exec",
        "pgclient",
        "--",
        "sh",
        "-c",
        &format!("echo {target_ip} >/tmp/host; date +%s%3N"),
    ])?;
    let switched_at: u64 = switched_at.trim().parse()?;
    wait_until("the probe inserting into the target", WAIT, || {
        Ok(probe(cluster)?
            .iter()
            .any(|(ok, at)| *ok && *at > switched_at)
            .then_some(()))
    })?;
    wait_until("a pgbench run against the target", WAIT, || {
        let runs = cluster.kubectl_ok(&["exec", "pgclient", "--", "cat", "/tmp/runs"])?;
        Ok((!runs.trim().is_empty()).then_some(()))
    })?;

    // The server's state, as only the running server had it.
    let state_after = psql(cluster, "pg-m1", STATE)?;
    ensure!(
        state_after == state_before,
        "the server's state changed: before {state_before:?}, after {state_after:?}"
    );
    let server_log = logs(cluster, "pg-m1", None);
    for recovery in [
        "was interrupted",
        "automatic recovery",
        "redo starts",
        "not properly shut down",
    ] {
        ensure!(
            !server_log.contains(recovery),
            "the target's server log shows crash recovery ({recovery}):\n{server_log}"
        );
    }
    let owner = cluster.kubectl_ok(&[
        "exec",
        "pg-m1",
        "--",
        "stat",
        "-c",
        "%u:%g %a",
        "/var/lib/postgresql/data/pgdata",
        "/proc/1000",
    ])?;
    ensure!(
        owner.lines().next() == Some("999:999 700"),
        "the data directory arrived as {owner}"
    );
    ensure!(
        owner
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("999:999")),
        "the restored server does not run as postgres: {owner}"
    );
    // Every INSERT the probe saw acknowledged is in the table.
    let attempts = probe(cluster)?;
    let acked = attempts.iter().filter(|(ok, _)| *ok).count() as u64;
    let rows: u64 = psql(cluster, "pg-m1", "select count(*) from acked")?.parse()?;
    ensure!(
        rows >= acked,
        "{acked} inserts were acknowledged but only {rows} rows are there"
    );
    psql(
        cluster,
        "pg-m1",
        "insert into rows values (20001, 'after the move')",
    )?;

    // What clients saw.
    let failed = attempts.iter().filter(|(ok, _)| !*ok).count();
    let gap = attempts
        .iter()
        .filter(|(ok, _)| *ok)
        .map(|(_, at)| *at)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0);
    let first_run = cluster.kubectl_ok(&["exec", "pgclient", "--", "cat", "/tmp/pgbench.1"])?;
    let figure = |prefix: &str| {
        first_run
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    let aborted = first_run
        .lines()
        .filter(|l| l.contains("client") && l.contains("aborted in command"))
        .count();
    let downtime = out
        .stdout
        .lines()
        .find(|l| l.starts_with("downtime"))
        .unwrap_or("downtime ?");
    eprintln!(
        "postgres clients: pgbench (4 clients, persistent connections) run 1: processed {}, failed {}, {aborted} client(s) aborted when the move closed their connections; \
         probe (new connection per INSERT, client pod's wall clock): longest gap between acknowledged inserts {gap} ms, {failed} failed attempts, {acked} acknowledged, all {rows} rows present; plugin {downtime}",
        figure("number of transactions actually processed:"),
        figure("number of failed transactions:"),
    );
    for pod in ["pg-m1", "pgclient"] {
        cluster.kubectl_ok(&["delete", "pod", pod, "--wait=false"])?;
    }
    Ok(())
}

/// `redis-cli` in `pod`; its answers, one per line.
fn redis(cluster: &Cluster, pod: &str, command: &str) -> Result<String> {
    Ok(cluster
        .kubectl_ok(&["exec", pod, "--", "sh", "-c", command])?
        .trim()
        .to_string())
}

/// Redis (Debian's, run as the redis user, persistence off) moves with keys it holds only in
/// memory, as the same server process (its run_id), and answers writes afterwards.
pub fn redis_moves_with_its_keys(cluster: &Cluster) -> Result<()> {
    cluster.apply(&example_pod("redis/pod.yaml", "cache", "node-a", &[])?)?;
    cluster.wait_running("cache", WAIT)?;
    wait_until("Redis answering", WAIT, || {
        Ok(redis(cluster, "cache", "redis-cli ping")
            .ok()
            .filter(|v| v == "PONG"))
    })?;
    redis(
        cluster,
        "cache",
        "redis-cli set greeting hello && redis-cli incrby visits 41 && \
         redis-cli rpush recent a b c && redis-cli config get save",
    )?;
    let state = "redis-cli info server | grep -E '^run_id:' | tr -d '\\r'; \
                 redis-cli get greeting; redis-cli lrange recent 0 -1; stat -c %U /proc/1000";
    let before = redis(cluster, "cache", state)?;
    ensure!(
        before.ends_with("redis"),
        "Redis does not run as redis: {before}"
    );
    migrate_ok(cluster, &["cache", "--to", "node-b"], &[])?;
    cluster.wait_running("cache-m1", WAIT)?;
    let after = redis(cluster, "cache-m1", state)?;
    ensure!(
        after == before,
        "the server's memory did not travel: before {before:?}, after {after:?}"
    );
    let visits = redis(cluster, "cache-m1", "redis-cli incr visits")?;
    ensure!(
        visits == "42",
        "the counter kept in memory is {visits}, not 42"
    );
    cluster.kubectl_ok(&["delete", "pod", "cache-m1", "--wait=false"])?;
    Ok(())
}

//! `netns-forward LISTEN NETNS TARGET`: forwards TCP connections accepted on `LISTEN` (an
//! address of this network namespace: the harness gives it a loopback one) to `TARGET` inside
//! the network namespace `NETNS` (a path such as `/run/netns/mig-cp`).
//!
//! The local cluster's control plane lives in a network namespace of its own, like every node
//! (see `migrate_tests::cluster`); this is how `kubectl` and the plugin on the machine reach
//! its API server on 127.0.0.1 without any cluster address on the machine's own interfaces.
//! Each connection is dialled from a thread that entered `NETNS` (a network namespace is a
//! per-thread attribute, and a socket keeps the namespace it was made in).

use std::fs::File;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};

use nix::sched::{CloneFlags, setns};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, netns, target] = args.as_slice() else {
        eprintln!("usage: netns-forward LISTEN_ADDR NETNS_PATH TARGET_ADDR");
        std::process::exit(2);
    };
    let namespace = match File::open(netns) {
        Ok(file) => file,
        Err(error) => {
            eprintln!("netns-forward: cannot open {netns}: {error}");
            std::process::exit(1);
        }
    };
    let listener = match TcpListener::bind(listen) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("netns-forward: cannot listen on {listen}: {error}");
            std::process::exit(1);
        }
    };
    for client in listener.incoming() {
        let client = match client {
            Ok(client) => client,
            Err(error) => {
                // Out of descriptors, say: wait a moment rather than spin.
                eprintln!("netns-forward: accept: {error}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let Ok(namespace) = namespace.try_clone() else {
            continue;
        };
        let target = target.clone();
        std::thread::spawn(move || {
            if let Err(error) = forward(client, &namespace, &target) {
                eprintln!("netns-forward: {target}: {error}");
            }
        });
    }
}

/// Dials `target` from inside `namespace` (this thread only) and copies both ways.
fn forward(client: TcpStream, namespace: &File, target: &str) -> io::Result<()> {
    setns(namespace, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let upstream = TcpStream::connect(target)?;
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut client_in, mut upstream_out) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut client_in, &mut upstream_out);
        let _ = upstream_out.shutdown(Shutdown::Write);
    });
    let (mut upstream_in, mut client_out) = (upstream, client);
    let _ = io::copy(&mut upstream_in, &mut client_out);
    let _ = client_out.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

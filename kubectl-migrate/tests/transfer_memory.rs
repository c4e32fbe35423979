//! Measures (and prints) the plugin's memory while a large archive streams through the copy
//! loop its exec transfer uses (`exec::copy_counting`): 512 MiB must not need more than a few
//! MiB of resident memory beyond the start. Its own test binary, so no other test allocates in
//! this process. The exec WebSocket streams around it are measured in the end-to-end tests,
//! which have a kubelet.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use kubectl_migrate::exec::copy_counting;
use tokio::io::{AsyncRead, ReadBuf};

/// Produces `left` bytes of a pattern without holding them.
struct Archive {
    left: u64,
}

impl AsyncRead for Archive {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize;
        buf.put_slice(&vec![0x5a; n]);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn half_a_gigabyte_streams_through_a_flat_buffer() {
    const SIZE: u64 = 512 * 1024 * 1024;
    let warm = AtomicU64::new(0);
    copy_counting(Archive { left: 1 << 20 }, tokio::io::sink(), &warm)
        .await
        .unwrap();
    let before = peak_rss_kib();
    let moved = AtomicU64::new(0);
    let start = std::time::Instant::now();
    let copied = copy_counting(Archive { left: SIZE }, tokio::io::sink(), &moved)
        .await
        .unwrap();
    let elapsed = start.elapsed();
    let after = peak_rss_kib();
    assert_eq!(copied, SIZE);
    assert_eq!(moved.load(Ordering::Relaxed), SIZE);
    let growth = after.saturating_sub(before);
    println!(
        "moved {} MiB in {:.2} s; peak RSS {} KiB before, {} KiB after: +{} KiB",
        SIZE >> 20,
        elapsed.as_secs_f64(),
        before,
        after,
        growth
    );
    // Not a speed target: memory must not scale with the archive (512 MiB moved).
    assert!(
        growth < 16 * 1024,
        "peak RSS grew by {growth} KiB while streaming 512 MiB"
    );
}

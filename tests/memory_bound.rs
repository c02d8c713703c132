//! `max_bytes` bounds what a `MemoryStore` makes the process hold, measured from outside, over
//! HTTP: a server process whose handler echoes request bodies, filled several times over.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::Arc,
};

use futures_util::future::join_all;
use idempotency_actix_workspace::work::fresh_client;

const MAX_BYTES: u64 = 16 * 1024 * 1024;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident memory of process `pid`, in bytes (Linux).
fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Sends `count` requests with fresh keys and 200-byte bodies, 16 at a time.
async fn fill(url: &str, from: usize, count: usize) {
    let client = Arc::new(fresh_client());
    for batch in (from..from + count).collect::<Vec<_>>().chunks(16) {
        join_all(batch.iter().map(|n| {
            let client = Arc::clone(&client);
            async move {
                let body = format!("{n:0>200}");
                let sent = client
                    .post(url)
                    .header("Idempotency-Key", format!("fill-{n}"))
                    .body(body)
                    .send()
                    .await;
                if let Ok(response) = sent {
                    let _ = response.bytes().await;
                }
            }
        }))
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoing_handler_fills_the_store_to_its_bound_and_no_further() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memory_server"))
        .env("MAX_BYTES", MAX_BYTES.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("memory_server: {e}"));
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("memory_server has no stdout"));
    let pid = child.id();
    let _server = Server(child);
    let address = BufReader::new(stdout)
        .lines()
        .find_map(|line| line.ok()?.strip_prefix("listening on ").map(str::to_owned))
        .unwrap_or_else(|| panic!("memory_server stopped before it listened"));
    let url = format!("http://{address}/echo");

    // Warm up (connections, worker buffers), then measure from there.
    fill(&url, 0, 2_000).await;
    let before = resident(pid);
    // About a kilobyte a record: 16 MiB holds ~16 000; this sends four times that.
    let mut after = before;
    for round in 0..4 {
        fill(&url, 2_000 + round * 16_000, 16_000).await;
        after = resident(pid);
        eprintln!(
            "after {} records: +{} KiB",
            (round + 1) * 16_000,
            after.saturating_sub(before) / 1024
        );
    }
    let growth = after.saturating_sub(before);
    assert!(
        // The bound, 10 % for the allocator, and a few MiB the process itself takes under load.
        growth <= MAX_BYTES + MAX_BYTES / 10 + 6 * 1024 * 1024,
        "the process grew by {} MiB for a store bounded at {} MiB",
        growth / (1024 * 1024),
        MAX_BYTES / (1024 * 1024)
    );
}

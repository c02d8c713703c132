//! What a stored record costs in resident memory, measured: a `MemoryStore` filled with
//! records of a 200-byte JSON response, resident growth divided by the records held; then a
//! store bounded by `max_bytes`, filled four times over, against its bound.
//!
//! ```text
//! cargo bench --bench record_memory
//! ```

use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use idempotency_actix::{
    storage::{CompletedRecord, ReservationToken, StoredResponse},
    DefaultKeyEncoder, Fingerprint, IdempotencyKey, IdempotencyStore, KeyEncoder, KeyParts,
    MemoryStore,
};

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Resident memory of this process, in bytes (Linux).
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn body() -> Bytes {
    let body = format!(
        r#"{{"id":4242,"item":"book","quantity":1,"total":"19.90","currency":"EUR","note":"{}"}}"#,
        "x".repeat(119)
    );
    assert_eq!(body.len(), 200);
    Bytes::from(body)
}

/// Stores `count` records under keys as the default encoder makes them.
fn fill(store: &MemoryStore, count: u64, from: u64) {
    let body = body();
    for n in from..from + count {
        let key = IdempotencyKey::try_from(format!("order-{n}").as_str())
            .unwrap_or_else(|e| panic!("{e}"));
        let storage_key = DefaultKeyEncoder.encode(&KeyParts::new(
            &key,
            &actix_web::http::Method::POST,
            "/orders",
            &body,
        ));
        let token = ReservationToken::generate();
        let fingerprint = Fingerprint([7; 32]);
        let _ = store
            .reserve(&storage_key, token, fingerprint, LEASE)
            .now_or_never();
        let record = CompletedRecord::new(
            fingerprint,
            Some(StoredResponse::new(
                201,
                vec![(
                    "content-type".to_owned(),
                    Bytes::from_static(b"application/json"),
                )],
                Bytes::copy_from_slice(&body),
            )),
        );
        let _ = store
            .complete(&storage_key, token, record, TTL)
            .now_or_never();
    }
}

fn bounded() {
    const BOUND: u64 = 64 * 1024 * 1024;
    let before = resident();
    let bounded = MemoryStore::builder().max_bytes(BOUND).build();
    let mut written = 0;
    while written < 4 * BOUND / 200 {
        fill(&bounded, 50_000, 1_000_000_000 + written);
        written += 50_000;
    }
    std::thread::sleep(Duration::from_millis(200));
    let grown = resident().saturating_sub(before);
    println!(
        "max_bytes {} MiB, filled with {written} records: resident growth {:.1} MiB ({:.2}x the bound), {} evicted",
        BOUND / (1024 * 1024),
        grown as f64 / (1024.0 * 1024.0),
        grown as f64 / BOUND as f64,
        bounded.capacity_evictions()
    );
}

const RECORDS: u64 = 200_000;

fn per_record() {
    let before = resident();
    let unbounded = MemoryStore::builder().max_bytes(u64::MAX / 2).build();
    fill(&unbounded, RECORDS, 0);
    let grown = resident().saturating_sub(before);
    println!(
        "records: {RECORDS} of a 200-byte JSON response; resident growth {:.1} MiB; {:.0} bytes per record",
        grown as f64 / (1024.0 * 1024.0),
        grown as f64 / RECORDS as f64
    );
}

/// Each measurement runs in a process of its own: memory freed by one would be reused by the
/// next and hide its growth.
fn main() {
    match std::env::var("RECORD_MEMORY_CASE").as_deref() {
        Ok("bounded") => bounded(),
        Ok("per-record") => per_record(),
        _ => {
            for case in ["per-record", "bounded"] {
                let status = std::env::current_exe().and_then(|me| {
                    std::process::Command::new(me)
                        .env("RECORD_MEMORY_CASE", case)
                        .status()
                });
                assert!(status.is_ok_and(|s| s.success()), "{case} failed");
            }
        }
    }
}

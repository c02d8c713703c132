//! criterion micro-benchmarks of the keyed path's pieces: key parsing, key encoding,
//! fingerprinting, and reserve / complete / replay on the memory store.
//!
//! ```text
//! cargo bench --bench hot_paths
//! ```

use std::{hint::black_box, time::Duration};

use actix_web::http::Method;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use idempotency_actix::{
    storage::{CompletedRecord, Reservation, ReservationToken, StoredResponse},
    BodyFingerprint, DefaultKeyEncoder, Fingerprint, Fingerprinter, IdempotencyKey,
    IdempotencyStore, KeyEncoder, KeyParts, MemoryStore, PythonKeyEncoder,
};

const KEY: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";
const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A 200-byte JSON body, the size of a typical order.
fn order() -> Bytes {
    let body = format!(
        r#"{{"id":4242,"item":"book","quantity":1,"total":"19.90","currency":"EUR","note":"{}"}}"#,
        "x".repeat(119)
    );
    Bytes::from(body)
}

fn record(fingerprint: Fingerprint) -> CompletedRecord {
    CompletedRecord::new(
        fingerprint,
        Some(StoredResponse::new(
            201,
            vec![(
                "content-type".to_owned(),
                Bytes::from_static(b"application/json"),
            )],
            order(),
        )),
    )
}

fn keys(c: &mut Criterion) {
    c.bench_function("key: parse a bare token", |b| {
        b.iter(|| IdempotencyKey::try_from(black_box(KEY)))
    });
    let quoted = format!("\"{KEY}\"");
    c.bench_function("key: parse an sf-string", |b| {
        b.iter(|| IdempotencyKey::try_from(black_box(quoted.as_str())))
    });
}

fn encoding(c: &mut Criterion) {
    let key = IdempotencyKey::try_from(KEY).unwrap_or_else(|e| panic!("{e}"));
    let body = order();
    let parts = KeyParts::new(&key, &Method::POST, "/orders", &body).scope(Some("caller"));
    c.bench_function("encode: default", |b| {
        b.iter(|| DefaultKeyEncoder.encode(black_box(&parts)))
    });
    c.bench_function("encode: Python-compatible", |b| {
        b.iter(|| PythonKeyEncoder.encode(black_box(&parts)))
    });
}

fn fingerprinting(c: &mut Criterion) {
    let body = order();
    c.bench_function("fingerprint: 200-byte JSON body", |b| {
        b.iter(|| BodyFingerprint.fingerprint(Some("application/json"), black_box(&body)))
    });
}

fn memory_store(c: &mut Criterion) {
    let store = MemoryStore::builder().build();
    let fingerprint = Fingerprint([7; 32]);
    let mut n = 0u64;
    let mut fresh_key = move || {
        n += 1;
        format!("bench-{n:016x}")
    };
    c.bench_function("memory store: reserve then complete (fresh key)", |b| {
        b.iter_batched(
            &mut fresh_key,
            |key| {
                let token = ReservationToken::generate();
                let reserved = store
                    .reserve(&key, token, fingerprint, LEASE)
                    .now_or_never();
                assert!(matches!(reserved, Some(Ok(Reservation::Acquired))));
                store
                    .complete(&key, token, record(fingerprint), TTL)
                    .now_or_never()
            },
            BatchSize::SmallInput,
        )
    });
    let replayed = "bench-replayed";
    let token = ReservationToken::generate();
    let _ = store
        .reserve(replayed, token, fingerprint, LEASE)
        .now_or_never();
    let _ = store
        .complete(replayed, token, record(fingerprint), TTL)
        .now_or_never();
    c.bench_function("memory store: replay (reserve finds the record)", |b| {
        b.iter(|| {
            store
                .reserve(
                    black_box(replayed),
                    ReservationToken::generate(),
                    fingerprint,
                    LEASE,
                )
                .now_or_never()
        })
    });
}

criterion_group!(benches, keys, encoding, fingerprinting, memory_store);
criterion_main!(benches);

//! The backend-agnostic store test suite: every store runs it unchanged.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use super::{
    CompletedRecord, Completion, IdempotencyStore, Reservation, ReservationToken, StoredResponse,
};
use crate::Fingerprint;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn record(body: &'static str) -> CompletedRecord {
    CompletedRecord::new(
        Fingerprint([7; 32]),
        Some(StoredResponse::new(
            201,
            vec![(
                "content-type".to_owned(),
                Bytes::from_static(b"application/json"),
            )],
            Bytes::from_static(body.as_bytes()),
        )),
    )
}

async fn acquire<S: IdempotencyStore>(store: &S, key: &str) -> ReservationToken {
    match store.reserve(key, Fingerprint([7; 32]), LEASE).await {
        Ok(Reservation::Acquired(token)) => token,
        other => panic!("expected to acquire {key}, got {other:?}"),
    }
}

/// Runs every contract check against fresh stores from `make`.
pub(crate) async fn run_all<S, F>(make: F)
where
    S: IdempotencyStore + Clone + Send,
    F: Fn() -> S,
{
    only_one_of_two_reservations_wins(make()).await;
    completed_record_is_returned_to_later_reservations(make()).await;
    released_key_can_be_reserved_again(make()).await;
    stale_token_cannot_complete_or_release(make()).await;
    expired_lease_frees_the_key(make()).await;
    completed_record_expires_after_ttl(make()).await;
    concurrent_reservations_from_threads_acquire_once(make()).await;
}

async fn only_one_of_two_reservations_wins<S: IdempotencyStore>(store: S) {
    acquire(&store, "k").await;
    match store.reserve("k", Fingerprint([9; 32]), LEASE).await {
        Ok(Reservation::InFlight {
            fingerprint,
            remaining_lease,
        }) => {
            assert_eq!(
                fingerprint,
                Fingerprint([7; 32]),
                "in-flight must report the owner's fingerprint"
            );
            assert!(remaining_lease <= LEASE && remaining_lease > Duration::ZERO);
        }
        other => panic!("second reservation must see the first in flight, got {other:?}"),
    }
}

async fn completed_record_is_returned_to_later_reservations<S: IdempotencyStore>(store: S) {
    let token = acquire(&store, "k").await;
    let completion = store.complete("k", token, record("first"), TTL).await;
    assert_eq!(completion.ok(), Some(Completion::Stored));
    match store.reserve("k", Fingerprint([7; 32]), LEASE).await {
        Ok(Reservation::Completed(stored)) => assert_eq!(*stored, record("first")),
        other => panic!("expected the completed record, got {other:?}"),
    }
}

async fn released_key_can_be_reserved_again<S: IdempotencyStore>(store: S) {
    let token = acquire(&store, "k").await;
    assert!(store.release("k", token).await.is_ok());
    acquire(&store, "k").await;
}

async fn stale_token_cannot_complete_or_release<S: IdempotencyStore>(store: S) {
    let owner = acquire(&store, "k").await;
    let stranger = ReservationToken(owner.0.wrapping_add(1_000_000));
    assert_eq!(
        store
            .complete("k", stranger, record("stale"), TTL)
            .await
            .ok(),
        Some(Completion::LostReservation)
    );
    assert!(store.release("k", stranger).await.is_ok());
    assert!(
        matches!(
            store.reserve("k", Fingerprint([7; 32]), LEASE).await,
            Ok(Reservation::InFlight { .. })
        ),
        "a stranger's release must not free the owner's key"
    );
    assert_eq!(
        store.complete("k", owner, record("owner"), TTL).await.ok(),
        Some(Completion::Stored)
    );
}

async fn expired_lease_frees_the_key<S: IdempotencyStore>(store: S) {
    let short = Duration::from_millis(150);
    let first = match store.reserve("k", Fingerprint([7; 32]), short).await {
        Ok(Reservation::Acquired(token)) => token,
        other => panic!("expected to acquire, got {other:?}"),
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = acquire(&store, "k").await;
    assert_ne!(first, second);
    assert_eq!(
        store.complete("k", first, record("late"), TTL).await.ok(),
        Some(Completion::LostReservation),
        "an owner whose lease ran out must not overwrite the new owner's key"
    );
}

async fn completed_record_expires_after_ttl<S: IdempotencyStore>(store: S) {
    let token = acquire(&store, "k").await;
    let stored = store
        .complete("k", token, record("short"), Duration::from_millis(150))
        .await;
    assert_eq!(stored.ok(), Some(Completion::Stored));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    acquire(&store, "k").await;
}

async fn concurrent_reservations_from_threads_acquire_once<S>(store: S)
where
    S: IdempotencyStore + Clone + Send,
{
    let store = Arc::new(store);
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let Ok(runtime) = runtime else { return false };
                runtime.block_on(async {
                    matches!(
                        store
                            .reserve("contended", Fingerprint([7; 32]), LEASE)
                            .await,
                        Ok(Reservation::Acquired(_))
                    )
                })
            })
        })
        .collect();
    let winners = threads
        .into_iter()
        .map(|thread| thread.join().unwrap_or(false))
        .filter(|acquired| *acquired)
        .count();
    assert_eq!(
        winners, 1,
        "exactly one of 16 concurrent reservations must acquire the key"
    );
}

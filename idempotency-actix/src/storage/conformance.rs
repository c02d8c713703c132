//! The store conformance suite: the contract of [`IdempotencyStore`] as runnable checks.
//!
//! Every store in this crate runs it unchanged ([`MemoryStore`](super::MemoryStore),
//! `RedisStore`, `PostgresStore`); a custom store should too. It is compiled with the
//! `test-suite` feature, which a store's crate enables for its tests only:
//!
//! ```toml
//! [dev-dependencies]
//! idempotency-actix = { version = "0.1", features = ["test-suite"] }
//! tokio = { version = "1", features = ["macros", "rt", "time"] }
//! ```
//!
//! Then, in an async test on a tokio runtime (`#[tokio::test]` or `#[actix_rt::test]`), call
//! [`run_all`] with a function that makes a fresh store:
//!
//! ```no_run
//! use idempotency_actix::{storage::conformance, MemoryStore};
//!
//! // A custom store would be built here, each time on an empty key space
//! // (a new table, database or key prefix). `MemoryStore::default()` would not do: it is
//! // one store per process.
//! fn fresh_store() -> MemoryStore {
//!     MemoryStore::builder().build()
//! }
//!
//! #[tokio::test]
//! async fn my_store_keeps_the_store_contract() {
//!     conformance::run_all(fresh_store).await;
//! }
//! # fn main() {}
//! ```
//!
//! A case that fails panics with what the store did wrong, so the test fails with that message.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use super::{
    CompletedRecord, Completion, IdempotencyStore, KeyState, Renewal, Reservation,
    ReservationToken, StoredResponse,
};
use crate::Fingerprint;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn record(body: &'static str) -> CompletedRecord {
    record_with(Bytes::from_static(body.as_bytes()))
}

fn record_with(body: Bytes) -> CompletedRecord {
    CompletedRecord::new(
        Fingerprint([7; 32]),
        Some(StoredResponse::new(
            201,
            vec![(
                "content-type".to_owned(),
                Bytes::from_static(b"application/json"),
            )],
            body,
        )),
    )
}

async fn acquire<S: IdempotencyStore>(store: &S, key: &str) -> ReservationToken {
    acquire_for(store, key, LEASE).await
}

async fn acquire_for<S: IdempotencyStore>(
    store: &S,
    key: &str,
    lease: Duration,
) -> ReservationToken {
    let token = ReservationToken::generate();
    match store.reserve(key, token, Fingerprint([7; 32]), lease).await {
        Ok(Reservation::Acquired) => token,
        other => panic!("expected to acquire {key}, got {other:?}"),
    }
}

async fn is_in_flight<S: IdempotencyStore>(store: &S, key: &str) -> bool {
    let stranger = ReservationToken::generate();
    matches!(
        store
            .reserve(key, stranger, Fingerprint([9; 32]), LEASE)
            .await,
        Ok(Reservation::InFlight { .. })
    )
}

/// Runs every contract check, each against a fresh store from `make`, and panics with an
/// explanation at the first one the store breaks.
///
/// # What the store must provide
///
/// - **A fresh, empty key space on every call of `make`.** Each case uses fixed keys (`"k"`,
///   `"held"`, `"contended"`, `"filler-0"` ..), so stores sharing a server need a new key
///   prefix, table or database per call, and one per test run if the server outlives it.
/// - `Clone + Send`, and futures that work on any tokio runtime: one case shares the store
///   between threads, each with its own current-thread runtime.
/// - A tokio runtime around the call (`#[tokio::test]`, `#[actix_rt::test]`): the cases sleep
///   with `tokio::time` and join threads through `spawn_blocking`. Time must run for real
///   (no paused clock); the suite takes a few seconds.
/// - Room for about 200 records of 1 KiB (a store with a smaller memory bound may evict
///   completed records, but never reservations).
///
/// # What each case checks
///
/// - *Only one of two reservations wins*: the second [`reserve`](IdempotencyStore::reserve) of a
///   key sees it in flight, with the owner's fingerprint and a remaining lease within the
///   lease it was given.
/// - *A completed record is returned to later reservations*, and repeating a completion whose
///   answer was lost finds its own record.
/// - *A released key can be reserved again.*
/// - *A stale token cannot complete, release or renew*: only the token that owns a key acts on
///   it.
/// - *An expired lease frees the key*, and the owner whose lease ran out cannot overwrite the
///   new owner's reservation.
/// - *A completed record expires after its TTL.*
/// - *Concurrent reservations from 16 threads acquire the key once*: [`reserve`] is atomic.
/// - *Renewal keeps a reservation past its lease*, and an owner whose key was taken over
///   cannot renew it.
/// - *Renewal restores a reservation nobody took* ([`Renewal::Restored`]), with the owner's
///   fingerprint.
/// - *Renewal of a completed key is lost*: renewing never turns a record back into a
///   reservation.
/// - *A late completion of a key nobody took is stored*
///   ([`Completion::StoredWithoutReservation`]) and replayed.
/// - *A reservation whose answer was lost is freed by its token*, and releasing a token that
///   reserved nothing is harmless.
/// - *Reservations survive capacity pressure*: filling the store with records never drops a
///   reservation, and its owner can still complete it.
/// - *Inspection reports what a key holds*: [`inspect`](IdempotencyStore::inspect) of a free
///   key is `None` (and does not reserve it), of a reservation [`KeyState::InFlight`] with the
///   owner's fingerprint and remaining lease, of a completed key [`KeyState::Completed`] with
///   its record.
/// - *A purged reservation frees the key*: [`purge`](IdempotencyStore::purge) says it found
///   something, the next reservation acquires the key, and the purged owner can no longer
///   complete it.
/// - *A purged record lets the next reservation run*, and inspection finds nothing.
/// - *Purging a free key finds nothing*: it answers `false`.
/// - *A freed reservation is never made again by its old owner*: after a purge (an operator)
///   or a release, the old owner's renewal is [`Renewal::Lost`], not `Restored`, and a purged
///   owner's completion is [`Completion::LostReservation`]: a command that arrives late (a
///   re-sent renewal, a handler still running when it was purged) never undoes the freeing.
///   The next reservation acquires the key.
/// - *A reservation repeated by its owner is acquired*: a `reserve` re-sent with the same token
///   (a client that retried after a reset, when the first had run) answers
///   [`Reservation::Acquired`] again, not in flight.
///
/// [`reserve`]: IdempotencyStore::reserve
pub async fn run_all<S, F>(make: F)
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
    renewal_keeps_a_reservation_past_its_lease(make()).await;
    renewal_restores_a_reservation_nobody_took(make()).await;
    renewal_of_a_completed_key_is_lost(make()).await;
    late_completion_of_a_key_nobody_took_is_stored(make()).await;
    reservation_with_a_lost_answer_is_freed_by_its_token(make()).await;
    reservations_survive_capacity_pressure(make()).await;
    inspection_reports_what_a_key_holds(make()).await;
    purged_reservation_frees_the_key(make()).await;
    purged_record_lets_the_next_reservation_run(make()).await;
    purging_a_free_key_finds_nothing(make()).await;
    a_freed_reservation_is_never_made_again_by_its_old_owner(make()).await;
    a_reservation_repeated_by_its_owner_is_acquired(make()).await;
}

async fn only_one_of_two_reservations_wins<S: IdempotencyStore>(store: S) {
    acquire(&store, "k").await;
    let stranger = ReservationToken::generate();
    match store
        .reserve("k", stranger, Fingerprint([9; 32]), LEASE)
        .await
    {
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
    let repeated = store.complete("k", token, record("first"), TTL).await;
    assert_eq!(
        repeated.ok(),
        Some(Completion::Stored),
        "repeating a completion whose answer was lost finds its own record"
    );
    let later = ReservationToken::generate();
    match store.reserve("k", later, Fingerprint([7; 32]), LEASE).await {
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
        is_in_flight(&store, "k").await,
        "a stranger's release must not free the owner's key"
    );
    assert_eq!(
        store
            .renew("k", stranger, Fingerprint([9; 32]), LEASE)
            .await
            .ok(),
        Some(Renewal::Lost),
        "a stranger cannot renew the owner's reservation"
    );
    assert_eq!(
        store.complete("k", owner, record("owner"), TTL).await.ok(),
        Some(Completion::Stored)
    );
}

async fn expired_lease_frees_the_key<S: IdempotencyStore>(store: S) {
    let first = acquire_for(&store, "k", Duration::from_millis(150)).await;
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
    const RACERS: usize = 16;
    let store = Arc::new(store);
    // No runtime stops before every racer is done: a pooled store may hand a connection made
    // on one thread's runtime to another thread, and returns it through a task on its own.
    let all_done = Arc::new(tokio::sync::Barrier::new(RACERS));
    let threads: Vec<_> = (0..RACERS)
        .map(|_| {
            let (store, all_done) = (Arc::clone(&store), Arc::clone(&all_done));
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let Ok(runtime) = runtime else { return false };
                runtime.block_on(async {
                    let token = ReservationToken::generate();
                    let acquired = matches!(
                        store
                            .reserve("contended", token, Fingerprint([7; 32]), LEASE)
                            .await,
                        Ok(Reservation::Acquired)
                    );
                    all_done.wait().await;
                    acquired
                })
            })
        })
        .collect();
    // Joined off this runtime, which keeps running meanwhile: connections it made earlier may
    // be the ones the racers are handed.
    let winners = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap_or(false))
            .filter(|acquired| *acquired)
            .count()
    })
    .await
    .unwrap_or(0);
    assert_eq!(
        winners, 1,
        "exactly one of {RACERS} concurrent reservations must acquire the key"
    );
}

/// The lease is a crash timeout, not a run-time limit: an owner that renews keeps its key
/// however long it runs, and loses it one lease after it stops renewing.
async fn renewal_keeps_a_reservation_past_its_lease<S: IdempotencyStore>(store: S) {
    // Renewed every quarter of the lease, five times (past one whole lease): each renewal has
    // most of a lease to spare, so a store on a loaded machine (a committing database, CI
    // running tests side by side) is not refused for a slow answer.
    let lease = Duration::from_millis(1200);
    let owner = acquire_for(&store, "k", lease).await;
    for _ in 0..5 {
        tokio::time::sleep(lease / 4).await;
        assert_eq!(
            store
                .renew("k", owner, Fingerprint([7; 32]), lease)
                .await
                .ok(),
            Some(Renewal::Renewed)
        );
    }
    assert!(
        is_in_flight(&store, "k").await,
        "a renewed reservation outlives its first lease"
    );
    tokio::time::sleep(lease * 2).await;
    let successor = acquire(&store, "k").await;
    assert_eq!(
        store
            .renew("k", owner, Fingerprint([7; 32]), lease)
            .await
            .ok(),
        Some(Renewal::Lost),
        "an owner whose key was taken over cannot renew it"
    );
    assert!(store.release("k", successor).await.is_ok());
}

/// A reservation the store lost (a restart, an expiry between two renewals) is made again by
/// its owner's next renewal, as long as nobody took the key meanwhile.
async fn renewal_restores_a_reservation_nobody_took<S: IdempotencyStore>(store: S) {
    let owner = acquire_for(&store, "k", Duration::from_millis(150)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store
            .renew("k", owner, Fingerprint([7; 32]), LEASE)
            .await
            .ok(),
        Some(Renewal::Restored)
    );
    match store
        .reserve(
            "k",
            ReservationToken::generate(),
            Fingerprint([9; 32]),
            LEASE,
        )
        .await
    {
        Ok(Reservation::InFlight { fingerprint, .. }) => assert_eq!(
            fingerprint,
            Fingerprint([7; 32]),
            "the restored reservation carries the owner's fingerprint"
        ),
        other => panic!("the restored reservation must hold the key, got {other:?}"),
    }
    assert_eq!(
        store
            .complete("k", owner, record("restored"), TTL)
            .await
            .ok(),
        Some(Completion::Stored)
    );
}

async fn renewal_of_a_completed_key_is_lost<S: IdempotencyStore>(store: S) {
    let owner = acquire(&store, "k").await;
    assert_eq!(
        store.complete("k", owner, record("done"), TTL).await.ok(),
        Some(Completion::Stored)
    );
    assert_eq!(
        store
            .renew("k", owner, Fingerprint([7; 32]), LEASE)
            .await
            .ok(),
        Some(Renewal::Lost),
        "renewing must never turn a record back into a reservation"
    );
    assert!(matches!(
        store
            .reserve(
                "k",
                ReservationToken::generate(),
                Fingerprint([7; 32]),
                LEASE
            )
            .await,
        Ok(Reservation::Completed(_))
    ));
}

/// A handler that finished after its lease ran out, with nobody else on the key, still leaves
/// its record: otherwise the retry would run it again.
async fn late_completion_of_a_key_nobody_took_is_stored<S: IdempotencyStore>(store: S) {
    let owner = acquire_for(&store, "k", Duration::from_millis(150)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.complete("k", owner, record("late"), TTL).await.ok(),
        Some(Completion::StoredWithoutReservation)
    );
    match store
        .reserve(
            "k",
            ReservationToken::generate(),
            Fingerprint([7; 32]),
            LEASE,
        )
        .await
    {
        Ok(Reservation::Completed(stored)) => assert_eq!(*stored, record("late")),
        other => panic!("the late record must be replayed, got {other:?}"),
    }
}

/// The caller makes the token before reserving, so a reservation whose answer never arrived
/// (a timeout after the command ran, a dropped future) is freed by releasing that token.
async fn reservation_with_a_lost_answer_is_freed_by_its_token<S: IdempotencyStore>(store: S) {
    let token = ReservationToken::generate();
    let _answer_lost = store.reserve("k", token, Fingerprint([7; 32]), LEASE).await;
    assert!(store.release("k", token).await.is_ok());
    acquire(&store, "k").await;
    let never_reserved = ReservationToken::generate();
    assert!(
        store.release("k", never_reserved).await.is_ok(),
        "releasing a token that reserved nothing is harmless"
    );
    assert!(is_in_flight(&store, "k").await);
}

/// Filling the store with records never drops a reservation: the key stays held, and its
/// owner can still complete it.
async fn reservations_survive_capacity_pressure<S: IdempotencyStore>(store: S) {
    let held = acquire(&store, "held").await;
    let body = Bytes::from(vec![b'x'; 1024]);
    for n in 0..200 {
        let key = format!("filler-{n}");
        let token = acquire(&store, &key).await;
        let stored = store
            .complete(&key, token, record_with(body.clone()), TTL)
            .await;
        assert!(
            matches!(stored, Ok(Completion::Stored)),
            "filler {n}: {stored:?}"
        );
        let replayed = store
            .reserve(
                &key,
                ReservationToken::generate(),
                Fingerprint([7; 32]),
                LEASE,
            )
            .await;
        assert!(
            matches!(replayed, Ok(Reservation::Completed(_))),
            "{replayed:?}"
        );
    }
    assert!(
        is_in_flight(&store, "held").await,
        "a reservation must survive a full store"
    );
    assert_eq!(
        store.complete("held", held, record("held"), TTL).await.ok(),
        Some(Completion::Stored)
    );
    match store
        .reserve(
            "held",
            ReservationToken::generate(),
            Fingerprint([7; 32]),
            LEASE,
        )
        .await
    {
        Ok(Reservation::Completed(stored)) => assert_eq!(*stored, record("held")),
        other => panic!("the newest record must be kept, got {other:?}"),
    }
}

async fn inspect<S: IdempotencyStore>(store: &S, key: &str) -> Option<KeyState> {
    match store.inspect(key).await {
        Ok(state) => state,
        Err(error) => panic!("inspect({key}) failed: {error}"),
    }
}

async fn purge<S: IdempotencyStore>(store: &S, key: &str) -> bool {
    match store.purge(key).await {
        Ok(found) => found,
        Err(error) => panic!("purge({key}) failed: {error}"),
    }
}

async fn inspection_reports_what_a_key_holds<S: IdempotencyStore>(store: S) {
    let free = inspect(&store, "k").await;
    assert!(
        free.is_none(),
        "a free key must inspect as None, got {free:?}"
    );
    let token = acquire(&store, "k").await;
    match inspect(&store, "k").await {
        Some(KeyState::InFlight {
            fingerprint,
            remaining_lease,
        }) => {
            assert_eq!(
                fingerprint,
                Fingerprint([7; 32]),
                "inspection must report the owner's fingerprint"
            );
            assert!(
                remaining_lease <= LEASE && remaining_lease > Duration::ZERO,
                "the remaining lease must lie within the lease, got {remaining_lease:?}"
            );
        }
        other => panic!("a reserved key must inspect as in flight, got {other:?}"),
    }
    let completion = store.complete("k", token, record("inspected"), TTL).await;
    assert_eq!(completion.ok(), Some(Completion::Stored));
    match inspect(&store, "k").await {
        Some(KeyState::Completed(stored)) => assert_eq!(*stored, record("inspected")),
        other => panic!("a completed key must inspect as its record, got {other:?}"),
    }
    // Inspection changes nothing: the record is still what later reservations find.
    let later = ReservationToken::generate();
    match store.reserve("k", later, Fingerprint([7; 32]), LEASE).await {
        Ok(Reservation::Completed(stored)) => assert_eq!(*stored, record("inspected")),
        other => panic!("expected the completed record after inspection, got {other:?}"),
    }
    // Inspecting a free key does not reserve it.
    acquire(&store, "free").await;
}

async fn purged_reservation_frees_the_key<S: IdempotencyStore>(store: S) {
    let stuck = acquire(&store, "k").await;
    assert!(
        purge(&store, "k").await,
        "purging a reservation must say it found one"
    );
    let after = inspect(&store, "k").await;
    assert!(
        after.is_none(),
        "a purged key must inspect as None, got {after:?}"
    );
    let next = acquire(&store, "k").await;
    let late = store.complete("k", stuck, record("stuck"), TTL).await;
    assert_eq!(
        late.ok(),
        Some(Completion::LostReservation),
        "the purged owner must not complete a key a new owner holds"
    );
    let completion = store.complete("k", next, record("next"), TTL).await;
    assert_eq!(completion.ok(), Some(Completion::Stored));
}

async fn purged_record_lets_the_next_reservation_run<S: IdempotencyStore>(store: S) {
    let token = acquire(&store, "k").await;
    let completion = store.complete("k", token, record("first"), TTL).await;
    assert_eq!(completion.ok(), Some(Completion::Stored));
    assert!(
        purge(&store, "k").await,
        "purging a record must say it found one"
    );
    let after = inspect(&store, "k").await;
    assert!(
        after.is_none(),
        "a purged key must inspect as None, got {after:?}"
    );
    acquire(&store, "k").await;
}

async fn purging_a_free_key_finds_nothing<S: IdempotencyStore>(store: S) {
    assert!(
        !purge(&store, "never-used").await,
        "purging a free key must say it found nothing"
    );
    let token = acquire(&store, "released").await;
    assert!(store.release("released", token).await.is_ok());
    assert!(
        !purge(&store, "released").await,
        "purging a released key must say it found nothing"
    );
}

async fn renewal_of<S: IdempotencyStore>(store: &S, key: &str, owner: ReservationToken) -> Renewal {
    match store.renew(key, owner, Fingerprint([7; 32]), LEASE).await {
        Ok(renewal) => renewal,
        Err(error) => panic!("renewing {key} failed: {error}"),
    }
}

async fn a_freed_reservation_is_never_made_again_by_its_old_owner<S: IdempotencyStore>(store: S) {
    let purged = acquire(&store, "purged").await;
    assert!(purge(&store, "purged").await, "the reservation was there");
    assert_eq!(
        renewal_of(&store, "purged", purged).await,
        Renewal::Lost,
        "a purged reservation must not be made again by its owner's renewal"
    );
    let after = inspect(&store, "purged").await;
    assert!(
        after.is_none(),
        "the purged key must stay free, got {after:?}"
    );
    assert_eq!(
        store
            .complete("purged", purged, record("purged"), TTL)
            .await
            .ok(),
        Some(Completion::LostReservation),
        "the purged owner's response must not become the key's record"
    );
    let after = inspect(&store, "purged").await;
    assert!(
        after.is_none(),
        "the purged key must stay free, got {after:?}"
    );
    acquire(&store, "purged").await;

    let released = acquire(&store, "released").await;
    assert!(store.release("released", released).await.is_ok());
    assert_eq!(
        renewal_of(&store, "released", released).await,
        Renewal::Lost,
        "a renewal arriving after its owner's release must not make the reservation again"
    );
    let after = inspect(&store, "released").await;
    assert!(
        after.is_none(),
        "the released key must stay free, got {after:?}"
    );
    acquire(&store, "released").await;
}

async fn a_reservation_repeated_by_its_owner_is_acquired<S: IdempotencyStore>(store: S) {
    let owner = acquire(&store, "k").await;
    let again = store.reserve("k", owner, Fingerprint([7; 32]), LEASE).await;
    assert!(
        matches!(again, Ok(Reservation::Acquired)),
        "a reservation re-sent with its owner's token must be acquired, got {again:?}"
    );
    assert!(
        is_in_flight(&store, "k").await,
        "and still held against others"
    );
    let completion = store.complete("k", owner, record("once"), TTL).await;
    assert_eq!(completion.ok(), Some(Completion::Stored));
}

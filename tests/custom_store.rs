//! A store written outside the crate runs the public conformance suite (feature `test-suite`),
//! and serves the middleware.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use actix_web::{http::StatusCode, post, test as actix_test, web, App, HttpResponse};
use idempotency_actix::{
    idempotent,
    storage::{
        conformance, CompletedRecord, Completion, KeyState, Renewal, Reservation, ReservationToken,
    },
    Fingerprint, IdempotencyMiddleware, IdempotencyStore, MemoryStore, StoreError,
};

/// A custom store as a user would write one: it delegates to a `MemoryStore` and counts the
/// reservations it was asked for.
#[derive(Debug, Clone, Default)]
struct CountingStore {
    inner: MemoryStore,
    reservations: Arc<AtomicUsize>,
}

impl IdempotencyStore for CountingStore {
    async fn reserve(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        self.reservations.fetch_add(1, Ordering::Relaxed);
        self.inner.reserve(key, token, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        self.inner.renew(key, token, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        self.inner.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &str, token: ReservationToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }

    async fn inspect(&self, key: &str) -> Result<Option<KeyState>, StoreError> {
        self.inner.inspect(key).await
    }

    async fn purge(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.purge(key).await
    }
}

#[actix_rt::test]
async fn a_custom_store_passes_the_public_conformance_suite() {
    let made = Arc::new(AtomicUsize::new(0));
    let reservations = Arc::new(AtomicUsize::new(0));
    conformance::run_all(|| {
        made.fetch_add(1, Ordering::Relaxed);
        CountingStore {
            inner: MemoryStore::builder().build(),
            reservations: Arc::clone(&reservations),
        }
    })
    .await;
    assert!(
        made.load(Ordering::Relaxed) >= 13,
        "every case gets a fresh store"
    );
    assert!(
        reservations.load(Ordering::Relaxed) > 200,
        "the suite exercised the custom store itself"
    );
}

/// The suite fails loudly for a store that breaks the contract: here, one that forgets
/// reservations, so two callers both acquire a key.
#[derive(Debug, Clone, Default)]
struct ForgetfulStore(MemoryStore);

impl IdempotencyStore for ForgetfulStore {
    async fn reserve(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        match self.0.reserve(key, token, fingerprint, lease).await {
            Ok(Reservation::InFlight { .. }) => Ok(Reservation::Acquired),
            other => other,
        }
    }

    async fn renew(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        self.0.renew(key, token, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        self.0.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &str, token: ReservationToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }

    async fn inspect(&self, key: &str) -> Result<Option<KeyState>, StoreError> {
        self.0.inspect(key).await
    }

    async fn purge(&self, key: &str) -> Result<bool, StoreError> {
        self.0.purge(key).await
    }
}

#[test]
fn the_conformance_suite_fails_a_store_that_breaks_atomic_reservations() {
    let outcome = std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        runtime.block_on(conformance::run_all(ForgetfulStore::default));
    })
    .join();
    let Err(panic) = outcome else {
        panic!("a store that lets two callers acquire one key must fail the suite");
    };
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    assert!(
        message.contains("second reservation must see the first in flight"),
        "the failure names the broken rule: {message}"
    );
}

#[idempotent]
#[post("/payments")]
async fn pay(runs: web::Data<AtomicUsize>) -> HttpResponse {
    let run = runs.fetch_add(1, Ordering::Relaxed) + 1;
    HttpResponse::Created().body(format!("payment {run}"))
}

#[actix_rt::test]
async fn the_middleware_replays_through_a_custom_store() {
    let store = CountingStore::default();
    let reservations = Arc::clone(&store.reservations);
    let runs = web::Data::new(AtomicUsize::new(0));
    let app = actix_test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(store))
            .app_data(runs.clone())
            .service(pay),
    )
    .await;
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let request = actix_test::TestRequest::post()
            .uri("/payments")
            .insert_header(("Idempotency-Key", "pay-1"))
            .to_request();
        let response = actix_test::call_service(&app, request).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        bodies.push(actix_test::read_body(response).await);
    }
    assert_eq!(bodies[0], bodies[1], "the retry gets the stored response");
    assert_eq!(runs.load(Ordering::Relaxed), 1, "the handler ran once");
    assert_eq!(reservations.load(Ordering::Relaxed), 2);
}

//! The handler's own transaction, committed together with its key's record.

use std::{
    ops::{Deref, DerefMut},
    rc::Rc,
    time::Duration,
};

use actix_web::{dev::Payload, FromRequest, HttpMessage, HttpRequest};
use futures_util::future::LocalBoxFuture;
use sqlx::{PgConnection, Postgres, Transaction};

use super::{backend, complete_on, held::record_held, PostgresStore};
use crate::{
    joined::{ActiveReservation, JoinedWork},
    storage::{CompletedRecord, Completion, ReservationToken},
    IdempotencyError, StoreError,
};

/// A database transaction for a keyed handler's own writes, committed together with the
/// record of its idempotency key: the handler's effects exist if and only if its record does.
///
/// It dereferences to a [`PgConnection`], so queries run on it with `&mut *tx`. The handler
/// neither commits nor rolls back: when it answers with anything but a server error (5xx), the
/// record is written in this transaction and both commit before the response is sent: a
/// decline (402) or a refusal (422) the handler wrote rows for is kept, and replayed, like a
/// success. A server error, an error or a panic rolls both back and frees the key for a retry.
/// (On routes without a transaction, the stored statuses are
/// [`store_on_statuses`](crate::IdempotencyMiddlewareBuilder::store_on_statuses), 200–207 by
/// default.)
///
/// When the database fails to begin the transaction, extraction fails with 503. Take
/// [`MaybeIdempotentTransaction`] on a route that must also serve requests without a
/// reservation; never `Option<IdempotentTransaction>`: actix-web turns every extraction error
/// into `None`, so the handler would write outside any transaction after a database failure.
/// (If it does, its response is replaced by 503 and its key kept done, not replayable: it may
/// have had an effect, and must not run again.)
///
/// - **Where the key is held**: on a route whose handler takes this type (or
///   [`MaybeIdempotentTransaction`]), the key is reserved in this very transaction, under a
///   transaction-scoped advisory lock, at READ COMMITTED (see
///   [`reserve_in_transactions`](crate::PostgresStoreBuilder::reserve_in_transactions)).
///   Elsewhere, by a row with a lease committed before the handler runs.
/// - **Crash**: a process that dies before the commit leaves neither the handler's rows nor the
///   record. A key held by the transaction is free again as soon as the database sees the
///   connection close; one reserved by a lease row, after the lease.
/// - **Duplicates**: a concurrent duplicate finds the key held and waits (a short query now
///   and then, no connection held while it waits) or gets 409; it never runs.
/// - **A lapsed lease**: if the reservation lapsed and another request took the key before this
///   one committed, this transaction is rolled back and the client gets 409
///   [`reservation-lost`](crate::problems#reservation-lost).
/// - **Isolation**: a transaction that holds its key runs at READ COMMITTED. Otherwise it
///   starts at the database's default level, and a handler may raise it with `SET TRANSACTION
///   ISOLATION LEVEL ..` as its first statement; under REPEATABLE READ or SERIALIZABLE, a handler that runs
///   longer than a third of the reservation lease has its reservation renewed by another
///   transaction, and its commit then fails (503, rolled back): keep the lease well above such
///   handlers' run time.
/// - **Connections**: it holds one connection of the store's [`pool`](PostgresStore::pool) from
///   its extraction until the response is recorded; size that pool for the handlers that run
///   at once. The store's own short statements have connections of their own.
///
/// It is available on routes whose policy settles the key before the handler runs
/// (`#[idempotent]`, `#[idempotency_manual]`, [`IdempotencyPolicy`](crate::IdempotencyPolicy))
/// and whose store is a [`PostgresStore`]; elsewhere, or for a request that holds no
/// reservation (an optional key left out, a replay in manual mode), extraction fails with 500
/// [`misconfigured`](crate::problems#misconfigured). Take `Option<IdempotentTransaction>` to
/// fall back to a plain transaction then.
///
/// ```no_run
/// use actix_web::{post, web, HttpResponse};
/// use idempotency_actix::{idempotent, IdempotentTransaction};
///
/// #[idempotent]
/// #[post("/payments")]
/// async fn pay(mut tx: IdempotentTransaction, body: web::Json<serde_json::Value>) -> HttpResponse {
///     let inserted = sqlx::query("INSERT INTO payments (body) VALUES ($1)")
///         .bind(body.to_string())
///         .execute(&mut *tx)
///         .await;
///     match inserted {
///         Ok(_) => HttpResponse::Created().finish(),
///         Err(_) => HttpResponse::InternalServerError().finish(),
///     }
/// }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub struct IdempotentTransaction {
    /// Always `Some` until the value is dropped, when it goes back to the reservation.
    transaction: Option<Transaction<'static, Postgres>>,
    /// Whether the handler ran anything on it (borrowed it mutably): only then did it decide
    /// what its answer commits.
    used: bool,
    /// The transaction holds the key itself (its advisory lock), rather than a row committed
    /// beforehand.
    holds_key: bool,
    reservation: Rc<ActiveReservation>,
    store: PostgresStore,
}

impl std::fmt::Debug for IdempotentTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentTransaction")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl FromRequest for IdempotentTransaction {
    type Error = IdempotencyError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let reservation = req.extensions().get::<Rc<ActiveReservation>>().cloned();
        Box::pin(async move {
            let reservation = reservation.ok_or(IdempotencyError::Misconfigured(
                "IdempotentTransaction needs a route whose policy settles the key first \
                 (#[idempotent]) and a request that holds its key",
            ))?;
            let store = reservation
                .store()
                .downcast_ref::<PostgresStore>()
                .cloned()
                .ok_or(IdempotencyError::Misconfigured(
                    "IdempotentTransaction needs the route's store to be a PostgresStore",
                ))?;
            // The key was reserved in a transaction begun for this handler: here it is.
            if let Some(prepared) = reservation.lend_prepared() {
                if let Ok(returned) = prepared.into_any().downcast::<Returned>() {
                    let Returned {
                        mut transaction,
                        holds_key,
                        ..
                    } = *returned;
                    if let Ok(transaction) = transaction.take() {
                        return Ok(Self {
                            transaction: Some(transaction),
                            used: false,
                            holds_key,
                            reservation,
                            store,
                        });
                    }
                }
                reservation.fail();
                return Err(IdempotencyError::StoreUnavailable);
            }
            if !reservation.lend() {
                return Err(IdempotencyError::Misconfigured(
                    "a request can have one IdempotentTransaction only",
                ));
            }
            // Another extractor of the handler may fail while this one waits for the
            // database: actix-web then drops this future, and the loan never reached anyone.
            let loan = Loan(Some(Rc::clone(&reservation)));
            let begun = store.pool().begin().await;
            loan.settled();
            match begun {
                Ok(transaction) => Ok(Self {
                    transaction: Some(transaction),
                    used: false,
                    holds_key: false,
                    reservation,
                    store,
                }),
                Err(error) => {
                    reservation.fail();
                    tracing::error!(
                        "idempotency: could not begin a handler's transaction: {error}"
                    );
                    Err(IdempotencyError::StoreUnavailable)
                }
            }
        })
    }
}

/// [`IdempotentTransaction`] where the request holds a reservation on a [`PostgresStore`], and
/// [`Unreserved`](Self::Unreserved) where it holds none (a request without a key on an
/// `#[idempotent(optional)]` route, a store outage under fail-open, another store): the handler
/// then writes on its own. A database that fails to begin the transaction is an error (503),
/// never `Unreserved`.
///
/// ```no_run
/// use actix_web::{post, HttpResponse};
/// use idempotency_actix::{idempotent, MaybeIdempotentTransaction};
///
/// #[idempotent(optional)]
/// #[post("/notes")]
/// async fn note(transaction: MaybeIdempotentTransaction) -> HttpResponse {
///     match transaction.into_option() {
///         Some(mut tx) => { /* sqlx::query(..).execute(&mut *tx) */ }
///         None => { /* sqlx::query(..).execute(&pool) */ }
///     }
///     HttpResponse::Created().finish()
/// }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[derive(Debug)]
#[non_exhaustive]
pub enum MaybeIdempotentTransaction {
    /// The request holds a reservation on a `PostgresStore`: write in this transaction.
    Reserved(IdempotentTransaction),
    /// No reservation to write with: the handler writes on its own.
    Unreserved,
}

impl MaybeIdempotentTransaction {
    /// The transaction, if the request holds a reservation.
    pub fn into_option(self) -> Option<IdempotentTransaction> {
        match self {
            Self::Reserved(transaction) => Some(transaction),
            Self::Unreserved => None,
        }
    }
}

impl FromRequest for MaybeIdempotentTransaction {
    type Error = IdempotencyError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let on_postgres = req
            .extensions()
            .get::<Rc<ActiveReservation>>()
            .is_some_and(|reservation| reservation.store().is::<PostgresStore>());
        if !on_postgres {
            return Box::pin(std::future::ready(Ok(Self::Unreserved)));
        }
        let transaction = IdempotentTransaction::from_request(req, payload);
        Box::pin(async move { transaction.await.map(Self::Reserved) })
    }
}

impl Deref for IdempotentTransaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match &self.transaction {
            Some(transaction) => transaction,
            None => unreachable!("the transaction leaves only when it is dropped"),
        }
    }
}

impl DerefMut for IdempotentTransaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.used = true;
        match &mut self.transaction {
            Some(transaction) => transaction,
            None => unreachable!("the transaction leaves only when it is dropped"),
        }
    }
}

impl Drop for IdempotentTransaction {
    fn drop(&mut self) {
        if let Some(transaction) = self.transaction.take() {
            self.reservation.give_back(Box::new(Returned {
                transaction: ShutdownSafe(Some(transaction)),
                used: self.used,
                holds_key: self.holds_key,
                store: self.store.clone(),
            }));
        }
    }
}

/// A transaction being begun for a handler: if its extraction is dropped before it ends, the
/// loan is taken back.
struct Loan(Option<Rc<ActiveReservation>>);

impl Loan {
    fn settled(mut self) {
        self.0 = None;
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if let Some(reservation) = self.0.take() {
            reservation.unlend();
        }
    }
}

/// The handler's transaction, handed back to be committed with the record (or, when it holds
/// the key, begun for the handler to take).
pub(super) struct Returned {
    transaction: ShutdownSafe,
    /// Whether the handler ran statements on it.
    used: bool,
    /// It holds the key's advisory lock: the key has no row until the record is written.
    holds_key: bool,
    store: PostgresStore,
}

impl Returned {
    /// A transaction that holds its key, for the handler to take.
    pub(super) fn holding_the_key(
        transaction: Transaction<'static, Postgres>,
        store: PostgresStore,
    ) -> Self {
        Self {
            transaction: ShutdownSafe(Some(transaction)),
            used: false,
            holds_key: true,
            store,
        }
    }
}

/// A transaction that can be dropped where no Tokio runtime runs any more (a worker torn down
/// by a shutdown that did not wait for its requests): sqlx hands a dropped connection back to
/// its pool from a new task, which needs a runtime, and would panic there. It is dropped in a
/// runtime of its own instead, shut down at once, which closes the connection: the database
/// rolls the transaction back, and the key is left as a crash would leave it.
struct ShutdownSafe(Option<Transaction<'static, Postgres>>);

impl ShutdownSafe {
    fn get(&mut self) -> Result<&mut Transaction<'static, Postgres>, StoreError> {
        self.0.as_mut().ok_or_else(ended_already)
    }

    fn take(&mut self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.0.take().ok_or_else(ended_already)
    }
}

fn ended_already() -> StoreError {
    StoreError::Corrupt("the transaction was already ended".to_owned())
}

impl Drop for ShutdownSafe {
    fn drop(&mut self) {
        let Some(transaction) = self.0.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        match tokio::runtime::Builder::new_current_thread().build() {
            Ok(runtime) => runtime.block_on(async move { drop(transaction) }),
            // No runtime to be had: the connection stays open until the process ends.
            Err(_) => std::mem::forget(transaction),
        }
    }
}

impl JoinedWork for Returned {
    fn used(&self) -> bool {
        self.used
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }

    fn roll_back(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        let mut transaction = self.transaction;
        Box::pin(async move {
            if let Ok(open) = transaction.take() {
                // Failing, it is dropped, which rolls it back as the connection goes back to
                // the pool (or closes it).
                let _ = open.rollback().await;
            }
        })
    }

    fn commit_with_record(
        self: Box<Self>,
        key: String,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> LocalBoxFuture<'static, Result<Completion, StoreError>> {
        let Self {
            mut transaction,
            store,
            holds_key,
            ..
        } = *self;
        Box::pin(async move {
            let sql = &store.inner.sql;
            let open = transaction.get()?;
            let completion = if holds_key {
                record_held(open, sql, &key, token, &record, ttl).await?
            } else {
                complete_on(open, sql, &key, token, &record, ttl).await?
            };
            // Ending it takes it whole; from here on, only a shutdown in the middle of this one
            // round trip is left to sqlx's own drop.
            let open = transaction.take()?;
            let ended = if completion == Completion::LostReservation {
                open.rollback().await
            } else {
                open.commit().await
            };
            ended.map_err(backend)?;
            Ok(completion)
        })
    }
}

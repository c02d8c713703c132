//! A handler's own unit of work (a database transaction) that commits together with its key's
//! record, so that the handler's effects exist if and only if the record does.
//!
//! The reservation a keyed handler runs under is put in its request's extensions; a store's
//! extractor (such as `IdempotentTransaction`) lends the handler a unit of work from it and,
//! when the handler is done with it, gives it back. Settling the key then writes the record in
//! that unit of work and commits both, instead of writing the record on its own.

// Only the Postgres store lends units of work so far; without it, the lending half is unused.
#![cfg_attr(not(feature = "postgres"), allow(dead_code))]

use std::{any::Any, cell::RefCell, sync::Arc, time::Duration};

use futures_util::future::LocalBoxFuture;

use crate::{
    storage::{CompletedRecord, Completion, DynStore, Reservation, ReservationToken},
    Fingerprint, StoreError,
};

/// A unit of work that can take a key's record and commit with it.
pub(crate) trait JoinedWork {
    /// Whether the handler used it: a unit of work lent to a handler that never ran (another
    /// of its extractors failed) decided nothing.
    fn used(&self) -> bool;

    /// The store's own type, for its extractor to take back what it made.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;

    /// Rolls it back: nothing the handler wrote in it happened.
    fn roll_back(self: Box<Self>) -> LocalBoxFuture<'static, ()>;

    /// Writes `record` for `key` (held by `token`) in this unit of work and commits both; when
    /// the record cannot be written (another request took the key), rolls both back and says
    /// [`Completion::LostReservation`]. An error means nothing was committed, or the commit's
    /// outcome is unknown.
    fn commit_with_record(
        self: Box<Self>,
        key: String,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> LocalBoxFuture<'static, Result<Completion, StoreError>>;
}

enum Lending {
    /// The reservation itself is a unit of work (a transaction holding the key), begun before
    /// the handler ran, for the handler to take.
    Prepared(Box<dyn JoinedWork>),
    /// No unit of work was lent.
    None,
    /// The handler holds it.
    Lent,
    /// The handler gave it back.
    Returned(Box<dyn JoinedWork>),
    /// It could not be begun (the database failed): the handler's extractor failed.
    Failed,
}

/// What the handler did with the unit of work it was lent, seen when its key is settled.
pub(crate) enum Joined {
    /// None was lent: the record is written on its own.
    No,
    /// The handler still holds it (it moved it into a task that outlived the handler): it can
    /// no longer commit with the record.
    StillLent,
    /// Here it is, to commit with the record.
    Yes(Box<dyn JoinedWork>),
    /// It could not be begun. If the handler ran all the same (its extractor was optional and
    /// actix-web turned the failure into `None`), it wrote outside any transaction.
    Failed,
}

/// The reservation a keyed handler runs under, as its extractors see it.
pub(crate) struct ActiveReservation {
    store: Arc<dyn DynStore>,
    lending: RefCell<Lending>,
}

impl ActiveReservation {
    /// The reservation of a request, held in `store`, or by the unit of work `held_by`.
    pub(crate) fn new(store: Arc<dyn DynStore>, held_by: Option<Box<dyn JoinedWork>>) -> Self {
        Self {
            store,
            lending: RefCell::new(held_by.map_or(Lending::None, Lending::Prepared)),
        }
    }

    /// Lends the handler the unit of work that holds the key, if there is one.
    pub(crate) fn lend_prepared(&self) -> Option<Box<dyn JoinedWork>> {
        let mut lending = self.lending.borrow_mut();
        if !matches!(*lending, Lending::Prepared(_)) {
            return None;
        }
        match std::mem::replace(&mut *lending, Lending::Lent) {
            Lending::Prepared(work) => Some(work),
            _ => None,
        }
    }

    /// The store the reservation is held in, for an extractor to recognise its own.
    pub(crate) fn store(&self) -> &dyn Any {
        self.store.as_any()
    }

    /// Records that a unit of work is lent to the handler; only one per request.
    pub(crate) fn lend(&self) -> bool {
        let mut lending = self.lending.borrow_mut();
        if !matches!(*lending, Lending::None) {
            return false;
        }
        *lending = Lending::Lent;
        true
    }

    /// Records that the unit of work could not be begun.
    pub(crate) fn fail(&self) {
        *self.lending.borrow_mut() = Lending::Failed;
    }

    /// Whether the unit of work could not be begun.
    pub(crate) fn has_failed(&self) -> bool {
        matches!(*self.lending.borrow(), Lending::Failed)
    }

    /// Takes back the unit of work the handler was lent.
    pub(crate) fn give_back(&self, work: Box<dyn JoinedWork>) {
        *self.lending.borrow_mut() = Lending::Returned(work);
    }

    /// Whether a unit of work was lent, returned or not.
    pub(crate) fn is_joined(&self) -> bool {
        matches!(
            *self.lending.borrow(),
            Lending::Lent | Lending::Returned(_) | Lending::Prepared(_)
        )
    }

    /// Whether the handler wrote in the unit of work it was lent (or still holds it).
    pub(crate) fn was_used(&self) -> bool {
        match &*self.lending.borrow() {
            Lending::Lent => true,
            Lending::Returned(work) => work.used(),
            Lending::None | Lending::Failed | Lending::Prepared(_) => false,
        }
    }

    /// Takes back a loan that never reached the handler (its extraction was dropped half-way).
    pub(crate) fn unlend(&self) {
        let mut lending = self.lending.borrow_mut();
        if matches!(*lending, Lending::Lent) {
            *lending = Lending::None;
        }
    }

    /// Takes what the handler did with its unit of work, once.
    pub(crate) fn take(&self) -> Joined {
        match std::mem::replace(&mut *self.lending.borrow_mut(), Lending::None) {
            Lending::None => Joined::No,
            Lending::Lent => Joined::StillLent,
            Lending::Returned(work) | Lending::Prepared(work) => Joined::Yes(work),
            Lending::Failed => Joined::Failed,
        }
    }
}

/// A reservation and, when the store made it as a unit of work that holds the key (a
/// transaction), that unit of work.
pub(crate) type HeldReservation = (Reservation, Option<Box<dyn JoinedWork>>);

/// Reserves `key` in a unit of work of the store's, where `store` can: the handler then writes
/// in it, and the key is free again the moment it ends without its record (a rollback, a
/// crash). `None` for a store that cannot.
#[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
pub(crate) fn reserve_in_transaction<'a>(
    store: &'a dyn DynStore,
    key: &'a str,
    token: ReservationToken,
    fingerprint: Fingerprint,
    lease: Duration,
) -> Option<LocalBoxFuture<'a, Result<HeldReservation, StoreError>>> {
    #[cfg(feature = "postgres")]
    if let Some(postgres) = store
        .as_any()
        .downcast_ref::<crate::storage::PostgresStore>()
    {
        return postgres.reserve_held_by_transaction(key, token, fingerprint, lease);
    }
    None
}

//! Keeping a reservation true despite slow handlers and store faults: renewal while the
//! handler runs, retried completion and release, and the release of a reservation whose answer
//! was lost.

use std::{
    convert::Infallible,
    future::Future,
    pin::pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_util::future::{select, Either, LocalBoxFuture};
use tracing::Instrument;

use crate::{
    storage::{DynStore, Renewal, ReservationToken},
    Fingerprint, StoreError,
};

/// The first pause between two attempts of a failed store operation, and the longest.
const FIRST_RETRY: Duration = Duration::from_millis(20);
const LONGEST_RETRY: Duration = Duration::from_secs(1);

/// How many renewals fit in one lease: the reservation survives two failed renewals in a row.
const RENEWALS_PER_LEASE: u32 = 3;
/// The shortest pause between renewals, whatever the lease.
const SHORTEST_RENEWAL: Duration = Duration::from_millis(10);
/// The longest a failed operation is retried, however long the lease: past it the store is
/// not having a blip, and one task per request must not wait on it for ever.
const LONGEST_RETRYING: Duration = Duration::from_secs(10 * 60);

/// `now + duration`, or `None` when that is past what the clock can represent (a timeout of
/// `Duration::MAX` means "no deadline").
pub(crate) fn deadline_after(duration: Duration) -> Option<Instant> {
    Instant::now().checked_add(duration)
}

/// Renews the reservation `token` holds on `key` every third of `lease` while the future is
/// polled; it never completes, so it is raced against the work it protects.
///
/// A renewal that finds the reservation gone makes it again (the store lost it: a restart
/// without persistence, an eviction) and says so in the log; one that finds the key taken stops
/// renewing and logs that the handler is no longer protected.
pub(crate) async fn keep_reserved(
    store: &dyn DynStore,
    key: &str,
    token: ReservationToken,
    fingerprint: Fingerprint,
    lease: Duration,
) -> Infallible {
    let period = (lease / RENEWALS_PER_LEASE).max(SHORTEST_RENEWAL);
    let mut pause = period;
    loop {
        tokio::time::sleep(pause).await;
        pause = period;
        match store.renew(key, token, fingerprint, lease).await {
            Ok(Renewal::Renewed) => {}
            Ok(Renewal::Restored) => tracing::warn!(
                "idempotency: a reservation vanished while its handler ran and was made again; \
                 the store lost it (a Redis restart without persistence, an eviction) or a \
                 renewal came too late. A duplicate that arrived in between may have run"
            ),
            Ok(_) => {
                tracing::error!(
                    "idempotency: a key was taken from its running handler: an operator purged \
                     it, or another request took it after the reservation vanished (a store \
                     restart or eviction, or renewals that failed for a whole lease). This \
                     response will not be stored; a retry may run the handler again"
                );
                return std::future::pending().await;
            }
            Err(error) => {
                tracing::warn!("idempotency: could not renew a reservation, retrying: {error}");
                pause = (period / 4).max(FIRST_RETRY);
            }
        }
    }
}

/// A reservation's renewals, made by whatever awaits the work the reservation protects (the
/// handler, then the storing of its response), in that work's own task.
///
/// Most handlers finish long before their first renewal is due: this costs them one timer,
/// where a task of its own would cost a spawn and a cancellation on every keyed request.
/// Dropped (or [`stop`](Self::stop)ped), it renews no more.
pub(crate) struct Renewals(Option<LocalBoxFuture<'static, Infallible>>);

impl Renewals {
    /// Renews the reservation `token` holds on `key`, every third of `lease`, while driven.
    pub(crate) fn start(
        store: Arc<dyn DynStore>,
        key: String,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Self {
        Self(Some(Box::pin(
            async move { keep_reserved(store.as_ref(), &key, token, fingerprint, lease).await }
                .in_current_span(),
        )))
    }

    /// No renewals: for a key held by something that needs none (a transaction's lock).
    pub(crate) fn none() -> Self {
        Self(None)
    }

    /// Renews no more.
    pub(crate) fn stop(&mut self) {
        self.0 = None;
    }

    /// Hands the renewals over (to a task that goes on storing the response); this one renews
    /// no more.
    pub(crate) fn take(&mut self) -> Self {
        Self(self.0.take())
    }

    /// Awaits `work`, renewing meanwhile.
    pub(crate) async fn during<F: Future>(&mut self, work: F) -> F::Output {
        let Some(renewing) = self.0.as_mut() else {
            return work.await;
        };
        match select(pin!(work), renewing.as_mut()).await {
            Either::Left((output, _)) => output,
            Either::Right((never, _)) => match never {},
        }
    }

    /// Renews if one is due; for a caller that polls the protected work itself.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) {
        if let Some(renewing) = self.0.as_mut() {
            if let Poll::Ready(never) = renewing.as_mut().poll(cx) {
                match never {}
            }
        }
    }
}

/// Runs `attempt` until it succeeds, pausing from 20 ms doubling to 1 s between attempts, for
/// at most `within` (and never more than ten minutes). Returns the last error when time runs
/// out, or at once for an error that retrying cannot mend.
pub(crate) async fn retry_within<T, F, Fut>(
    within: Duration,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let give_up_at = deadline_after(within.min(LONGEST_RETRYING));
    let mut pause = FIRST_RETRY;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error @ StoreError::Corrupt(_)) => return Err(error),
            Err(error) => error,
        };
        let now = Instant::now();
        let left = give_up_at.map_or(pause, |at| at.saturating_duration_since(now));
        if left.is_zero() {
            return Err(error);
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(LONGEST_RETRY);
    }
}

/// Frees `key` for `token` in the background, retrying within `lease`, when the caller cannot
/// wait: a dropped request, a reservation whose answer was lost. Outside a runtime (a worker
/// shutting down) the key is left to its lease.
pub(crate) fn release_in_background(
    store: Arc<dyn DynStore>,
    key: String,
    token: ReservationToken,
    lease: Duration,
) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let Some(slot) = store.background_slot() else {
        tracing::debug!("idempotency: too many keys being freed at once; this one's lease will");
        return;
    };
    actix_web::rt::spawn(async move {
        let _slot = slot;
        let released = retry_within(lease, || store.release(&key, token)).await;
        if let Err(error) = released {
            tracing::error!("idempotency: could not free a key (its lease will): {error}");
        }
    });
}

/// Armed around a `reserve` call: if the call fails or its future is dropped, the reservation
/// may exist without anyone knowing, so the guard frees it (token-checked, so a reservation
/// that was never made costs nothing) instead of leaving the key locked for a whole lease.
pub(crate) struct UnansweredReservation<'a> {
    store: &'a Arc<dyn DynStore>,
    key: &'a str,
    token: ReservationToken,
    lease: Duration,
    armed: bool,
}

impl<'a> UnansweredReservation<'a> {
    pub(crate) fn arm(
        store: &'a Arc<dyn DynStore>,
        key: &'a str,
        token: ReservationToken,
        lease: Duration,
    ) -> Self {
        Self {
            store,
            key,
            token,
            lease,
            armed: true,
        }
    }

    /// The store answered: the caller knows what it holds.
    pub(crate) fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for UnansweredReservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            release_in_background(
                Arc::clone(self.store),
                self.key.to_owned(),
                self.token,
                self.lease,
            );
        }
    }
}

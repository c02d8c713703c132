//! Waking the duplicates that wait on a key the moment its reservation ends.
//!
//! The scripts that end a reservation (complete, release) publish on a sharded channel named
//! after the key itself (`SPUBLISH`, Redis 7): on a cluster a sharded message stays in the shard
//! that owns the key's slot instead of crossing the whole cluster bus, and since the channel is
//! the key's own name the script touches one slot. One subscriber connection per store (RESP3:
//! published messages come back as push messages on the connection's task) subscribes to the
//! keys this process's requests wait on, once per key however many wait, and wakes them.
//!
//! A waiter subscribes first, then looks whether the reservation already ended, then waits, so
//! an end published before the subscription took effect is never missed. Pub/sub delivers at
//! most once: a message lost to a failover or a resharding costs a waiter at most one wait (the
//! caller bounds each), and a lost subscriber connection wakes every waiter at once.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Notify, OnceCell};

use super::{
    backend,
    connection::{Connection, Target, Timeouts},
};
use crate::StoreError;

/// How long waiting duplicates poll after the subscriber failed, before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The store's subscriber and the keys its requests wait on.
pub(super) struct Changes {
    subscriber: OnceCell<Connection>,
    waiting: Arc<Waiting>,
    /// Until when waiting duplicates poll instead, after the subscriber failed.
    unavailable_until: Mutex<Option<Instant>>,
    /// Waiting duplicates always poll.
    never: bool,
}

impl Changes {
    pub(super) fn new() -> Self {
        Self {
            subscriber: OnceCell::new(),
            waiting: Arc::new(Waiting::default()),
            unavailable_until: Mutex::new(None),
            never: false,
        }
    }

    /// No subscriber ever (a store with no URL to make one with): waiting duplicates poll.
    pub(super) fn polling() -> Self {
        Self {
            never: true,
            ..Self::new()
        }
    }

    /// Whether waiting duplicates can count on being woken (the subscriber did not fail in the
    /// last second).
    pub(super) fn available(&self) -> bool {
        !self.never
            && self
                .unavailable_until
                .lock()
                .is_none_or(|until| Instant::now() >= until)
    }

    /// Waiting duplicates poll for a while: the subscriber, or Redis, failed with `error`.
    pub(super) fn unavailable(&self, error: &StoreError) {
        let first = self
            .unavailable_until
            .lock()
            .replace(Instant::now() + RETRY_AFTER)
            .is_none();
        if first {
            tracing::warn!(
                "idempotency: waiting duplicates cannot be woken by Redis ({error}); they poll, \
                 and waking is tried again every second"
            );
        } else {
            tracing::debug!("idempotency: waiting duplicates still poll: {error}");
        }
    }

    /// Whether the subscriber connection has been made.
    pub(super) fn connected(&self) -> bool {
        self.subscriber.initialized()
    }

    /// How many keys the subscriber listens to for this process's waiting requests.
    #[cfg(test)]
    pub(super) fn channels(&self) -> usize {
        self.waiting.channels.lock().len()
    }

    /// Returns when `channel` (a key) gets a message or the subscriber loses its connection;
    /// at once if `ended`, asked once the subscription is in place, says the reservation
    /// already ended.
    pub(super) async fn wait<F, Fut>(
        &self,
        target: &Target,
        timeouts: Timeouts,
        channel: &str,
        ended: F,
    ) -> Result<(), StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<bool, StoreError>>,
    {
        let subscriber = self.subscriber(target, timeouts).await?;
        let registration = Registration::new(&self.waiting, channel, subscriber);
        let woken = registration.channel.woken.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        registration.subscribe().await?;
        if ended().await? {
            return Ok(());
        }
        woken.await;
        Ok(())
    }

    async fn subscriber(
        &self,
        target: &Target,
        timeouts: Timeouts,
    ) -> Result<Connection, StoreError> {
        let waiting = Arc::clone(&self.waiting);
        let pushes = move |push: PushInfo| {
            waiting.deliver(&push);
            Ok::<(), std::convert::Infallible>(())
        };
        self.subscriber
            .get_or_try_init(|| target.subscribe(timeouts, pushes))
            .await
            .cloned()
            .map_err(backend)
    }
}

/// The keys waited on, shared with the subscriber's push handler.
#[derive(Default)]
struct Waiting {
    channels: Mutex<HashMap<Vec<u8>, Arc<Channel>>>,
    /// Counts the subscriber's lost connections: a subscription made before the latest one may
    /// be gone.
    epoch: AtomicU64,
}

impl Waiting {
    fn deliver(&self, push: &PushInfo) {
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if let Some(Value::BulkString(name)) = push.data.first() {
                    if let Some(channel) = self.channels.lock().get(name.as_slice()) {
                        channel.woken.notify_waiters();
                    }
                }
            }
            PushKind::Disconnection => {
                self.epoch.fetch_add(1, Ordering::SeqCst);
                for channel in self.channels.lock().values() {
                    channel.woken.notify_waiters();
                }
            }
            _ => {}
        }
    }
}

/// One key waited on.
#[derive(Default)]
struct Channel {
    /// How many requests wait; changed only under [`Waiting::channels`]' lock.
    waiters: AtomicUsize,
    woken: Notify,
    /// The subscription, if one may exist. Held while subscribing or unsubscribing, so that
    /// the commands for one key reach Redis in order.
    subscribed_in: tokio::sync::Mutex<Option<Subscription>>,
}

/// A key's subscription on the subscriber's connection of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Subscription {
    epoch: u64,
    /// Redis answered the `SSUBSCRIBE`; until then it may or may not have taken effect.
    confirmed: bool,
}

/// A request waiting on a key; the key's subscription is dropped with its last waiter.
struct Registration {
    waiting: Arc<Waiting>,
    name: Vec<u8>,
    channel: Arc<Channel>,
    subscriber: Connection,
}

impl Registration {
    fn new(waiting: &Arc<Waiting>, name: &str, subscriber: Connection) -> Self {
        let name = name.as_bytes().to_vec();
        let channel = {
            let mut channels = waiting.channels.lock();
            let channel = Arc::clone(channels.entry(name.clone()).or_default());
            channel.waiters.fetch_add(1, Ordering::SeqCst);
            channel
        };
        Self {
            waiting: Arc::clone(waiting),
            name,
            channel,
            subscriber,
        }
    }

    async fn subscribe(&self) -> Result<(), StoreError> {
        let mut subscribed_in = self.channel.subscribed_in.lock().await;
        let epoch = self.waiting.epoch.load(Ordering::SeqCst);
        let confirmed = Subscription {
            epoch,
            confirmed: true,
        };
        if *subscribed_in != Some(confirmed) {
            // Recorded before the command goes out: a wait cut short while it is under way
            // (its deadline fell) still leaves the key to unsubscribe from, not a subscription
            // Redis keeps for as long as the connection lives.
            *subscribed_in = Some(Subscription {
                epoch,
                confirmed: false,
            });
            redis::cmd("SSUBSCRIBE")
                .arg(&self.name)
                .exec_async(&mut self.subscriber.clone())
                .await
                .map_err(backend)?;
            *subscribed_in = Some(confirmed);
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let idle = {
            let _channels = self.waiting.channels.lock();
            self.channel.waiters.fetch_sub(1, Ordering::SeqCst) == 1
        };
        // Outside a runtime (one shutting down) the subscription stays for the key's next
        // waiter: it only brings messages nobody waits for.
        if let (true, Ok(runtime)) = (idle, tokio::runtime::Handle::try_current()) {
            drop(runtime.spawn(unsubscribe_idle(
                Arc::clone(&self.waiting),
                self.name.clone(),
                Arc::clone(&self.channel),
                self.subscriber.clone(),
            )));
        }
    }
}

/// Unsubscribes from a key nobody waits on any more, and forgets it unless a new waiter came.
async fn unsubscribe_idle(
    waiting: Arc<Waiting>,
    name: Vec<u8>,
    channel: Arc<Channel>,
    mut subscriber: Connection,
) {
    let mut subscribed_in = channel.subscribed_in.lock().await;
    if channel.waiters.load(Ordering::SeqCst) == 0 && subscribed_in.is_some() {
        // A failed unsubscription leaves a channel whose messages nobody waits for.
        let _ = redis::cmd("SUNSUBSCRIBE")
            .arg(&name)
            .exec_async(&mut subscriber)
            .await;
        *subscribed_in = None;
    }
    let mut channels = waiting.channels.lock();
    let current = channels
        .get(&name)
        .is_some_and(|entry| Arc::ptr_eq(entry, &channel));
    if current && channel.waiters.load(Ordering::SeqCst) == 0 {
        channels.remove(&name);
    }
}

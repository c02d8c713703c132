//! The guide: one page per topic, the `docs/*.md` pages of the repository.
//!
//! Each module below is one page; its Rust examples are compiled (and most run) as doctests,
//! so that they stay true.
//!
//! - [`guarantee`]: the guarantee, precisely: at most once per key, leases, store faults, the
//!   memory store's bound, what Redis must be configured for.
//! - [`modes_and_attributes`]: handler attributes, modes, and when the key is settled.
//! - [`caller_scope`]: who is the same caller and what is the same request,
//!   `JsonFingerprint`, streamed responses.
//! - [`redis`]: several instances on one Redis.
//! - [`redis_cluster`]: the same store on a Redis Cluster.
//! - [`postgres`]: records in the handler's own transaction.
//! - [`deploying`]: TLS, health, connections, start-up, shutdown, failover.
//! - [`operating`]: inspecting and freeing keys, tracing and metrics.
//! - [`settings`]: each setting, its Python name and default; against the Python package.
//! - [`custom_stores`]: your own store and the conformance suite.
//! - [`design_decisions`]: where the notes on the Python package looked wrong or were silent.
//! - [`benchmarks`]: what a keyed request costs, and how it was measured.

// The pages link to each other with reference-style links whose definitions, at the bottom of
// each page, point at the other `.md` files (for GitHub). These definitions come first in every
// module's docs, and the first definition of a label wins, so on docs.rs the same links go to
// the modules.
macro_rules! links {
    () => {
        "[readme]: crate#guide\n\
         [postgres]: crate::guide::postgres\n\
         [redis]: crate::guide::redis\n\
         [redis-cluster]: crate::guide::redis_cluster\n\
         [guarantee#what-redis-must-be-configured-for]: \
             crate::guide::guarantee#what-redis-must-be-configured-for\n\
         [modes-and-attributes#when-the-key-is-settled]: \
             crate::guide::modes_and_attributes#when-the-key-is-settled\n\
         [benchmarks#postgresql-keys-held-by-the-handlers-transaction-2026-12-05]: \
             crate::guide::benchmarks#postgresql-keys-held-by-the-handlers-transaction-2026-12-05\n"
    };
}

#[doc = links!()]
#[doc = include_str!("../../docs/guarantee.md")]
pub mod guarantee {}

#[doc = links!()]
#[doc = include_str!("../../docs/modes-and-attributes.md")]
pub mod modes_and_attributes {}

#[doc = links!()]
#[doc = include_str!("../../docs/caller-scope.md")]
pub mod caller_scope {}

// The examples of the backend pages need their features; the pages themselves are always
// documented.
#[cfg(any(feature = "redis", not(doctest)))]
#[doc = links!()]
#[doc = include_str!("../../docs/redis.md")]
pub mod redis {}

#[cfg(any(feature = "redis-cluster", not(doctest)))]
#[doc = links!()]
#[doc = include_str!("../../docs/redis-cluster.md")]
pub mod redis_cluster {}

#[cfg(any(feature = "postgres", not(doctest)))]
#[doc = links!()]
#[doc = include_str!("../../docs/postgres.md")]
pub mod postgres {}

#[doc = links!()]
#[doc = include_str!("../../docs/deploying.md")]
pub mod deploying {}

#[doc = links!()]
#[doc = include_str!("../../docs/operating.md")]
pub mod operating {}

#[doc = links!()]
#[doc = include_str!("../../docs/settings.md")]
pub mod settings {}

#[doc = links!()]
#[doc = include_str!("../../docs/custom-stores.md")]
pub mod custom_stores {}

#[doc = links!()]
#[doc = include_str!("../../docs/design-decisions.md")]
pub mod design_decisions {}

#[doc = links!()]
#[doc = include_str!("../../docs/benchmarks.md")]
pub mod benchmarks {}

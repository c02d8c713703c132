//! `PostgresStore` over TLS (feature `postgres-tls`), against a PostgreSQL cluster of the
//! test's own that accepts TLS connections only, with certificates made for the test by
//! `openssl`: every `sslmode`, the store contract, a wrong CA refused, and two instances of the
//! demo sharing the database.

use std::sync::atomic::{AtomicUsize, Ordering};

use idempotency_actix::{storage::conformance, IdempotencyStore, PostgresStore};
use idempotency_actix_workspace::{
    postgres::{duplicates_over_demos_create_one_order, DemoProcess},
    tls::{openssl_available, postgres_programs, TestCertificates, TlsPostgres},
};

const DEMO: &str = env!("CARGO_BIN_EXE_orders_demo");

/// Certificates and a TLS-only cluster, or `None` (said loudly) where the machine cannot run
/// them; never `None` under `IDEMPOTENCY_REQUIRE_POSTGRES=1`.
fn tls_postgres_or_skip(test: &str) -> Option<(TestCertificates, TlsPostgres)> {
    let required = std::env::var("IDEMPOTENCY_REQUIRE_POSTGRES").as_deref() == Ok("1");
    let started = match (openssl_available(), postgres_programs()) {
        (true, Some(programs)) => TestCertificates::make().and_then(|certificates| {
            let server = TlsPostgres::start(&certificates, &programs)?;
            Ok((certificates, server))
        }),
        (false, _) => Err(std::io::Error::other("openssl is not installed")),
        (_, None) => Err(std::io::Error::other(
            "initdb and pg_ctl are not under /usr/lib/postgresql/*/bin",
        )),
    };
    match started {
        Ok(started) => Some(started),
        Err(error) if required => panic!("{test}: IDEMPOTENCY_REQUIRE_POSTGRES=1 but {error}"),
        Err(error) => {
            eprintln!("\n*** SKIPPED {test}: {error} ***\n");
            None
        }
    }
}

fn verified(certificates: &TestCertificates, ca: &str, mode: &str) -> String {
    format!(
        "sslmode={mode}&sslrootcert={}",
        certificates.file(ca).display()
    )
}

async fn store(url: &str, table: &str) -> PostgresStore {
    let store = PostgresStore::builder(url)
        .table(table)
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"));
    store
        .ensure_schema()
        .await
        .unwrap_or_else(|e| panic!("schema over TLS: {e}"));
    store
}

/// `require`, `verify-ca` and `verify-full` connect; `disable` is refused by a server that
/// takes TLS only; the store keeps its contract over `verify-full`.
#[actix_rt::test]
async fn postgres_over_tls_keeps_the_store_contract_in_every_sslmode() {
    let Some((certificates, server)) = tls_postgres_or_skip("postgres_over_tls") else {
        return;
    };
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = server.url(&verified(&certificates, "ca.pem", mode));
        let healthy = store(&url, &format!("keys_{}", mode.replace('-', "_")))
            .await
            .health()
            .await;
        assert!(healthy.is_ok(), "sslmode={mode}: {healthy:?}");
    }
    let plain = PostgresStore::builder(&server.url("sslmode=disable"))
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"));
    assert!(
        plain.health().await.is_err(),
        "a TLS-only server took plain text"
    );

    let url = server.url(&verified(&certificates, "ca.pem", "verify-full"));
    let mut stores = Vec::new();
    for n in 0..20 {
        stores.push(store(&url, &format!("contract_{n}")).await);
    }
    let next = AtomicUsize::new(0);
    conformance::run_all(|| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        stores
            .get(n)
            .cloned()
            .unwrap_or_else(|| panic!("more than {} cases: make more tables", stores.len()))
    })
    .await;
}

/// A server whose certificate the given CA did not sign is refused with an error that says so,
/// under `verify-ca` and `verify-full` alike.
#[actix_rt::test]
async fn a_wrong_ca_is_refused() {
    let Some((certificates, server)) = tls_postgres_or_skip("a_wrong_ca_postgres") else {
        return;
    };
    for mode in ["verify-ca", "verify-full"] {
        let url = server.url(&verified(&certificates, "other-ca.pem", mode));
        let refused = PostgresStore::builder(&url)
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"))
            .health()
            .await;
        let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.to_lowercase().contains("certificate"),
            "sslmode={mode}: refused without saying why: {error:?}"
        );
    }
}

/// Two demo processes on the TLS-only database (`IDEMPOTENCY_DATABASE_URL` with
/// `sslmode=verify-full`, the CA given by `sslrootcert` to one and by `SSL_CERT_FILE` to the
/// other): concurrent duplicates spread over both create one order row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_demo_instances_on_a_tls_database_create_one_order() {
    let Some((certificates, server)) = tls_postgres_or_skip("two_demo_instances_on_tls_postgres")
    else {
        return;
    };
    // One verifies the server with the URL's `sslrootcert`, the other with the platform's
    // roots, here `SSL_CERT_FILE`.
    let url = server.url(&verified(&certificates, "ca.pem", "verify-full"));
    let first = DemoProcess::start(DEMO, &[("IDEMPOTENCY_DATABASE_URL", url.as_str())]);
    let by_roots = server.url("sslmode=verify-full");
    let ca = certificates.file("ca.pem").display().to_string();
    let second = DemoProcess::start(
        DEMO,
        &[
            ("IDEMPOTENCY_DATABASE_URL", by_roots.as_str()),
            ("SSL_CERT_FILE", ca.as_str()),
        ],
    );
    let demos = [first, second];
    duplicates_over_demos_create_one_order(&demos, "tls-order").await;
}

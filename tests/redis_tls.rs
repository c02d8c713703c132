//! `RedisStore` over TLS (`rediss://`, feature `redis-tls`), against real `redis-server`s on
//! TLS ports with certificates made for the test by `openssl`: the store contract, mutual TLS,
//! a wrong CA refused, and two instances of the demo sharing one TLS Redis.

use std::sync::atomic::{AtomicU64, Ordering};

use idempotency_actix::{storage::conformance, IdempotencyStore, RedisStore};
use idempotency_actix_workspace::{
    postgres::{duplicates_over_demos_create_one_order, DemoProcess},
    tls::{openssl_available, TestCertificates, TlsRedis},
    ClusterTls, PrivateRedisCluster,
};

const DEMO: &str = env!("CARGO_BIN_EXE_orders_demo");

/// Certificates and a TLS Redis, or `None` (said loudly) where the machine cannot run them;
/// never `None` under `IDEMPOTENCY_REQUIRE_REDIS=1`.
fn tls_redis_or_skip(
    test: &str,
    clients_must_present: bool,
) -> Option<(TestCertificates, TlsRedis)> {
    let required = std::env::var("IDEMPOTENCY_REQUIRE_REDIS").as_deref() == Ok("1");
    let started = openssl_available()
        .then(|| {
            let certificates = TestCertificates::make()?;
            let redis = TlsRedis::start(&certificates, clients_must_present)?;
            std::io::Result::Ok((certificates, redis))
        })
        .ok_or_else(|| std::io::Error::other("openssl is not installed"))
        .and_then(|started| started);
    match started {
        Ok(started) => Some(started),
        Err(error) if required => panic!("{test}: IDEMPOTENCY_REQUIRE_REDIS=1 but {error}"),
        Err(error) => {
            eprintln!("\n*** SKIPPED {test}: {error} ***\n");
            None
        }
    }
}

#[actix_rt::test]
async fn redis_over_tls_keeps_the_store_contract() {
    let Some((certificates, redis)) = tls_redis_or_skip("redis_over_tls", false) else {
        return;
    };
    let ca = certificates.read("ca.pem");
    let next = AtomicU64::new(0);
    conformance::run_all(|| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        RedisStore::builder(&redis.url())
            .tls_root_certificates(ca.clone())
            .key_prefix(format!("case{n}:"))
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"))
    })
    .await;
}

/// A server that requires client certificates refuses a store without one, and serves one
/// with the certificate its CA signed.
#[actix_rt::test]
async fn mutual_tls_needs_the_client_certificate() {
    let Some((certificates, redis)) = tls_redis_or_skip("mutual_tls", true) else {
        return;
    };
    let ca = certificates.read("ca.pem");
    let anonymous = RedisStore::builder(&redis.url())
        .tls_root_certificates(ca.clone())
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"));
    assert!(
        anonymous.health().await.is_err(),
        "served without a client certificate"
    );

    let presenting = RedisStore::builder(&redis.url())
        .tls_root_certificates(ca)
        .tls_client_certificate(
            certificates.read("client.pem"),
            certificates.read("client.key"),
        )
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"));
    let healthy = presenting.health().await;
    assert!(healthy.is_ok(), "{healthy:?}");
}

/// A server whose certificate the given CA did not sign is refused with an error that says so;
/// nothing falls back to plain text, and certificates given for a plain URL are refused when
/// the store is built.
#[actix_rt::test]
async fn a_wrong_ca_is_refused_never_downgraded() {
    let Some((certificates, redis)) = tls_redis_or_skip("a_wrong_ca", false) else {
        return;
    };
    let wrong = RedisStore::builder(&redis.url())
        .tls_root_certificates(certificates.read("other-ca.pem"))
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"));
    let refused = wrong.health().await;
    let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.to_lowercase().contains("certificate"),
        "refused without saying why: {error:?}"
    );

    let plain_url = format!("redis://localhost:{}", redis.port());
    let plain = RedisStore::builder(&plain_url)
        .tls_root_certificates(certificates.read("ca.pem"))
        .build();
    assert!(plain.is_err(), "certificates given for a plain URL");
}

/// Two demo processes on one TLS Redis (`IDEMPOTENCY_REDIS_URL=rediss://..`, the CA through
/// `SSL_CERT_FILE`, as a platform's roots would hold it): concurrent duplicates spread over
/// both create one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_demo_instances_on_a_tls_redis_create_one_order() {
    let Some((certificates, redis)) = tls_redis_or_skip("two_demo_instances_on_tls", false) else {
        return;
    };
    let url = redis.url();
    let ca = certificates.file("ca.pem").display().to_string();
    let environment = [
        ("IDEMPOTENCY_REDIS_URL", url.as_str()),
        ("SSL_CERT_FILE", ca.as_str()),
    ];
    let demos = [
        DemoProcess::start(DEMO, &environment),
        DemoProcess::start(DEMO, &environment),
    ];
    duplicates_over_demos_create_one_order(&demos, "tls-order").await;
}

/// A Redis Cluster whose nodes speak TLS (to clients and to each other): the store keeps its
/// contract through `rediss://` URLs and a private CA, and two demo instances on it
/// (`IDEMPOTENCY_REDIS_CLUSTER_URLS=rediss://..`, the CA through `SSL_CERT_FILE`) create one
/// order from concurrent duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_cluster_keeps_the_store_contract_and_serves_two_instances() {
    let test = "a_tls_redis_cluster";
    let required = std::env::var("IDEMPOTENCY_REQUIRE_REDIS").as_deref() == Ok("1");
    if !openssl_available() || !PrivateRedisCluster::available() {
        assert!(
            !required,
            "{test}: IDEMPOTENCY_REQUIRE_REDIS=1 but openssl or redis is missing"
        );
        eprintln!("\n*** SKIPPED {test}: no openssl, redis-server or redis-cli ***\n");
        return;
    }
    let certificates = TestCertificates::make().unwrap_or_else(|e| panic!("certificates: {e}"));
    let cluster = PrivateRedisCluster::start_tls(&ClusterTls {
        certificate: certificates.file("server.pem"),
        key: certificates.file("server.key"),
        ca: certificates.file("ca.pem"),
    })
    .unwrap_or_else(|e| panic!("{test}: the TLS cluster did not start: {e}"));
    let urls = cluster.tls_urls();
    let ca = certificates.read("ca.pem");
    let next = AtomicU64::new(0);
    conformance::run_all(|| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        RedisStore::cluster_builder(&urls)
            .tls_root_certificates(ca.clone())
            .key_prefix(format!("case{n}:"))
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"))
    })
    .await;

    let joined = urls.join(",");
    let ca_file = certificates.file("ca.pem").display().to_string();
    let environment = [
        ("IDEMPOTENCY_REDIS_CLUSTER_URLS", joined.as_str()),
        ("SSL_CERT_FILE", ca_file.as_str()),
    ];
    let demos = [
        DemoProcess::start(DEMO, &environment),
        DemoProcess::start(DEMO, &environment),
    ];
    duplicates_over_demos_create_one_order(&demos, "tls-cluster-order").await;
}

//! Properties over arbitrary key headers, header counts and bodies: nothing panics, every
//! refusal is a problem+json 400, keys survive rendering and parsing, bodies are replayed
//! byte for byte.

use actix_web::{http::StatusCode, post, test as actix_test, web, App, HttpResponse};
use idempotency_actix::{idempotent, IdempotencyKey, IdempotencyMiddleware, MemoryStore};
use idempotency_actix_workspace::{respond, Received};
use proptest::prelude::*;

#[idempotent]
#[post("/echo")]
async fn echo(body: web::Bytes) -> HttpResponse {
    HttpResponse::Created().body(body)
}

/// Sends each request to one fresh app, in order.
fn exchange(requests: Vec<actix_test::TestRequest>) -> Vec<Received> {
    actix_rt::System::new().block_on(async move {
        let app = actix_test::init_service(
            App::new()
                .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
                .service(echo),
        )
        .await;
        let mut received = Vec::new();
        for request in requests {
            received.push(respond(&app, request.to_request()).await);
        }
        received
    })
}

fn is_problem_400(answer: &Received, slug: &str) -> bool {
    answer.status == StatusCode::BAD_REQUEST
        && answer
            .problem_type()
            .is_some_and(|t| t.ends_with(&format!("#{slug}")))
}

/// Renders a key as an RFC 8941 sf-string.
fn sf_string(key: &str) -> String {
    format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any header value, sent any number of times: an answer, never a panic, and a refusal is
    /// always the problem+json 400 the parser's verdict calls for.
    #[test]
    fn any_key_header_gets_an_answer_and_refusals_are_problem_400(
        values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..4),
    ) {
        let values: Vec<_> = values
            .into_iter()
            .filter(|value| actix_web::http::header::HeaderValue::from_bytes(value).is_ok())
            .collect();
        let mut request = actix_test::TestRequest::post().uri("/echo").set_payload("body");
        for value in &values {
            request = request.append_header(("Idempotency-Key", value.clone()));
        }
        let answer = exchange(vec![request]).remove(0);
        match values.as_slice() {
            [] => prop_assert!(is_problem_400(&answer, "missing-key"), "{answer:?}"),
            [value] => {
                let text = std::str::from_utf8(value).unwrap_or("\u{0}");
                let valid = IdempotencyKey::try_from(text.trim_matches([' ', '\t'])).is_ok();
                if valid {
                    prop_assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer);
                } else {
                    prop_assert!(is_problem_400(&answer, "invalid-key"), "{answer:?}");
                }
            }
            _ => prop_assert!(is_problem_400(&answer, "invalid-key"), "{answer:?}"),
        }
    }

    /// Every valid key survives being rendered as an sf-string and parsed again, and its bare
    /// form (when it has one) is the same key.
    #[test]
    fn valid_keys_round_trip_through_the_sf_string_form(key in "[!-~][ -~]{0,253}[!-~]|[!-~]") {
        let quoted = IdempotencyKey::try_from(sf_string(&key).as_str());
        prop_assert_eq!(quoted.as_ref().map(IdempotencyKey::as_str), Ok(key.as_str()));
        if !key.starts_with('"') && !key.contains(' ') {
            prop_assert_eq!(IdempotencyKey::try_from(key.as_str()), quoted);
        }
    }

    /// Any body is replayed byte for byte, and any other body under the same key is refused.
    #[test]
    fn any_body_is_replayed_exactly_and_another_is_refused(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        other in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let keyed = |payload: Vec<u8>| {
            actix_test::TestRequest::post()
                .uri("/echo")
                .insert_header(("Idempotency-Key", "k"))
                .set_payload(payload)
        };
        let got = exchange(vec![keyed(body.clone()), keyed(body.clone()), keyed(other.clone())]);
        prop_assert_eq!(got[0].status, StatusCode::CREATED);
        prop_assert!(got[1].is_replay());
        prop_assert_eq!(&got[1].body[..], &body[..]);
        if other == body {
            prop_assert!(got[2].is_replay());
        } else {
            prop_assert_eq!(got[2].status, StatusCode::UNPROCESSABLE_ENTITY);
        }
    }
}

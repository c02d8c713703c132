//! The demo's admin routes: support staff look up what a client's key holds and free it,
//! through [`IdempotencyAdmin`], behind a bearer token.
//!
//! - `GET /admin/idempotency-keys?key=K&path=/orders&method=POST&scope=S&store=N`: 200 with
//!   `{"state": "completed", "status": 201, "body": ..}`, `{"state": "in_flight",
//!   "remaining_lease_ms": ..}` or `{"state": "unreadable", "reason": ..}`; 404 when the key
//!   holds nothing.
//! - `DELETE` with the same query: 204 when something was purged, 404 when nothing was there.
//!
//! `method` defaults to `POST`; `scope` (what the middleware's `CallerScope` gave the caller:
//! with the default `AuthorizationScope`, the hex SHA-256 of the caller's whole
//! `Authorization` value) and `store` (a named store) are optional.
//!
//! Both need `Authorization: Bearer TOKEN` with the configured token: without the header they
//! answer 401, with another token 403. Without a configured token (the demo's
//! `IDEMPOTENCY_ADMIN_TOKEN` unset) the routes are off and answer 404, so that a server
//! started without a token never exposes them. Errors are `application/problem+json`.

use actix_web::{
    delete, get,
    http::{header, Method, StatusCode},
    web, HttpRequest, HttpResponse,
};
use idempotency_actix::{
    idempotency_exempt, storage::KeyState, IdempotencyAdmin, IdempotencyKey, KeyTarget,
};
use serde::Deserialize;
use serde_json::json;

/// What the admin routes need: the middleware's admin tools and the token callers must send,
/// or `None` to turn the routes off.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    admin: IdempotencyAdmin,
    token: Option<String>,
}

impl AdminAccess {
    /// Access to `admin` for callers sending `Authorization: Bearer {token}`; with `None` (or
    /// an empty token) the routes answer 404.
    pub fn new(admin: IdempotencyAdmin, token: Option<String>) -> Self {
        Self {
            admin,
            token: token.filter(|token| !token.is_empty()),
        }
    }

    /// The answer to give when `req` does not carry the token, or `None` when it does.
    fn refusal(&self, req: &HttpRequest) -> Option<HttpResponse> {
        let Some(expected) = &self.token else {
            return Some(problem(StatusCode::NOT_FOUND, "Not found", None));
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            None => {
                let mut response = problem(
                    StatusCode::UNAUTHORIZED,
                    "Admin token required",
                    Some("send Authorization: Bearer <admin token>"),
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                Some(response)
            }
            Some(presented) if constant_time_eq(presented.as_bytes(), expected.as_bytes()) => None,
            Some(_) => Some(problem(
                StatusCode::FORBIDDEN,
                "Wrong admin token",
                Some("the bearer token is not the admin token"),
            )),
        }
    }
}

/// Compares two byte strings in time that depends on their lengths only, not on where they
/// first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn problem(status: StatusCode, title: &str, detail: Option<&str>) -> HttpResponse {
    let mut body = json!({ "type": "about:blank", "title": title, "status": status.as_u16() });
    if let Some(detail) = detail {
        body["detail"] = json!(detail);
    }
    HttpResponse::build(status)
        .content_type("application/problem+json")
        .body(body.to_string())
}

/// The query naming a key.
#[derive(Debug, Deserialize)]
struct KeyQuery {
    key: String,
    path: String,
    method: Option<String>,
    scope: Option<String>,
    store: Option<String>,
}

impl KeyQuery {
    /// The target the query names, or why it names none.
    fn target(&self) -> Result<KeyTarget, String> {
        let key =
            IdempotencyKey::try_from(self.key.as_str()).map_err(|error| format!("key: {error}"))?;
        let method = Method::from_bytes(self.method.as_deref().unwrap_or("POST").as_bytes())
            .map_err(|error| format!("method: {error}"))?;
        Ok(KeyTarget::new(method, self.path.clone(), key)
            .scope(self.scope.clone().filter(|scope| !scope.is_empty()))
            .store(self.store.clone().filter(|store| !store.is_empty())))
    }
}

fn unavailable(error: &idempotency_actix::StoreError) -> HttpResponse {
    let status = match error {
        idempotency_actix::StoreError::UnknownStore(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    problem(status, "Idempotency store error", Some(&error.to_string()))
}

/// The JSON an operator sees for a key's state.
fn describe(state: &KeyState) -> serde_json::Value {
    match state {
        KeyState::InFlight {
            remaining_lease, ..
        } => json!({
            "state": "in_flight",
            "remaining_lease_ms": u64::try_from(remaining_lease.as_millis()).unwrap_or(u64::MAX),
        }),
        KeyState::Completed(record) => match &record.response {
            Some(response) => {
                let body = serde_json::from_slice::<serde_json::Value>(&response.body)
                    .unwrap_or_else(|_| json!(String::from_utf8_lossy(&response.body)));
                json!({ "state": "completed", "status": response.status, "body": body })
            }
            // Too large to store: the operation ran, its response cannot be replayed.
            None => json!({ "state": "completed", "status": null, "body": null }),
        },
        KeyState::Unreadable { reason } => json!({ "state": "unreadable", "reason": reason }),
        _ => json!({ "state": "unknown" }),
    }
}

/// The key a request names, once its token is checked; or the answer that refuses it.
fn authorised_target(
    req: &HttpRequest,
    access: &AdminAccess,
    query: &KeyQuery,
) -> Result<KeyTarget, Box<HttpResponse>> {
    if let Some(refused) = access.refusal(req) {
        return Err(Box::new(refused));
    }
    query.target().map_err(|invalid| {
        Box::new(problem(
            StatusCode::BAD_REQUEST,
            "Invalid key query",
            Some(&invalid),
        ))
    })
}

fn unknown_key() -> HttpResponse {
    problem(
        StatusCode::NOT_FOUND,
        "Unknown key",
        Some("no request holds or completed this key"),
    )
}

#[get("/admin/idempotency-keys")]
async fn look_up_key(
    req: HttpRequest,
    access: web::Data<AdminAccess>,
    query: web::Query<KeyQuery>,
) -> HttpResponse {
    let target = match authorised_target(&req, &access, &query) {
        Ok(target) => target,
        Err(refused) => return *refused,
    };
    match access.admin.lookup(&target).await {
        Ok(Some(state)) => HttpResponse::Ok().json(describe(&state)),
        Ok(None) => unknown_key(),
        Err(error) => unavailable(&error),
    }
}

#[idempotency_exempt]
#[delete("/admin/idempotency-keys")]
async fn purge_key(
    req: HttpRequest,
    access: web::Data<AdminAccess>,
    query: web::Query<KeyQuery>,
) -> HttpResponse {
    let target = match authorised_target(&req, &access, &query) {
        Ok(target) => target,
        Err(refused) => return *refused,
    };
    match access.admin.purge(&target).await {
        Ok(true) => HttpResponse::NoContent().finish(),
        Ok(false) => unknown_key(),
        Err(error) => unavailable(&error),
    }
}

/// Registers the admin routes (`GET` and `DELETE /admin/idempotency-keys`) with `access`.
pub fn admin_routes(access: AdminAccess) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config
            .app_data(web::Data::new(access))
            .service(look_up_key)
            .service(purge_key);
    }
}

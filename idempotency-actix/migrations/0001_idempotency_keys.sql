-- The table of idempotency-actix's PostgresStore (default name). One row per key: the key is
-- what the key encoder made of (caller scope, method, path, Idempotency-Key), so the primary key
-- is the uniqueness constraint on (scope, key). `PostgresStore::ensure_schema()` runs the same.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key          text        PRIMARY KEY,
    -- 'in_flight' while the handler runs, 'completed' once its response is recorded.
    state        text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    -- The reservation's owner while in flight; NULL once completed.
    token        bigint,
    -- SHA-256 of the request's payload (422 when a retry's differs).
    fingerprint  bytea       NOT NULL,
    -- The stored response (versioned binary record); NULL while in flight.
    record       bytea,
    -- When the reservation lapses unless renewed; NULL once completed.
    lease_until  timestamptz,
    -- When the row may be deleted: the lease's end while in flight, the record's TTL after.
    expires_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at ON idempotency_keys (expires_at);

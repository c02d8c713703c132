-- Reserves a key in the calling transaction, for PostgresStore's keys held by the handler's
-- transaction (idempotency-actix 0.2). Called right after `BEGIN ISOLATION LEVEL READ
-- COMMITTED`; returns nothing when the key is now held by this transaction, one row otherwise:
-- the key's live row, or (when another transaction holds the key) lock_free = false.
--
-- It is VOLATILE, so that each of its queries reads with a snapshot of its own: the second look
-- at the key, after the lock, sees a record its previous holder committed before releasing it.
--
-- `PostgresStore::ensure_schema` recognises this function by its body: change the version line
-- in it with anything about the function, so that databases get the new one.
CREATE OR REPLACE FUNCTION idempotency_keys_hold(held_key text, lock_id bigint)
RETURNS TABLE (lock_free boolean, key_state text, key_fingerprint bytea, key_record bytea,
               lease_left_ms float8, key_token bigint)
LANGUAGE plpgsql VOLATILE
-- A table locked by a migration makes a request fail after this, never hang.
SET lock_timeout = '5s'
AS $$
-- idempotency-actix hold function, version 1
BEGIN
    -- A record first, without the lock: replays take none.
    RETURN QUERY
        SELECT true, r.state, r.fingerprint, r.record,
               GREATEST(EXTRACT(EPOCH FROM (r.lease_until - clock_timestamp())) * 1000, 0)::float8,
               r.token
        FROM idempotency_keys AS r
        WHERE r.key = held_key AND r.expires_at > clock_timestamp();
    IF FOUND THEN
        RETURN;
    END IF;
    IF NOT pg_try_advisory_xact_lock(lock_id) THEN
        RETURN QUERY SELECT false, NULL::text, NULL::bytea, NULL::bytea, NULL::float8, NULL::bigint;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT true, r.state, r.fingerprint, r.record,
               GREATEST(EXTRACT(EPOCH FROM (r.lease_until - clock_timestamp())) * 1000, 0)::float8,
               r.token
        FROM idempotency_keys AS r
        WHERE r.key = held_key AND r.expires_at > clock_timestamp();
END
$$;

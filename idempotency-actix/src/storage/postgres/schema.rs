//! The table and the statements of the Postgres store.
//!
//! Every deadline is computed on the database's clock (`clock_timestamp()`, which, unlike
//! `now()`, moves inside a long transaction), so that instances with drifting clocks agree on
//! when a lease or a record expires. Durations travel as milliseconds.

/// The schema for the default table name, as migrations a team can run with its own tool: the
/// table, then the function that reserves a key in the caller's transaction.
pub(super) const DEFAULT_SCHEMA: &str = concat!(
    include_str!("../../../migrations/0001_idempotency_keys.sql"),
    "\n",
    include_str!("../../../migrations/0002_idempotency_keys_hold.sql"),
);

/// The table name every statement is written for.
pub(super) const DEFAULT_TABLE: &str = "idempotency_keys";

/// A table name accepted as it is: letters, digits and `_`, optionally schema-qualified. It is
/// written into the statements, so nothing that could be SQL gets through.
pub(super) fn is_plain_table_name(name: &str) -> bool {
    let plain = |part: &str| {
        !part.is_empty()
            && part.len() <= 63
            && !part.starts_with(|c: char| c.is_ascii_digit())
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match name.split_once('.') {
        Some((schema, table)) => plain(schema) && plain(table),
        None => plain(name),
    }
}

/// The statements, written once for the store's table.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) schema: String,
    /// Claims a free or expired key: $1 key, $2 token, $3 fingerprint, $4 lease ms, unless a
    /// transaction holds its advisory lock $5. A row back means acquired.
    pub(super) claim: String,
    /// As `claim`, for a renewal that makes a lost reservation again: never over the owner's
    /// own freed reservation.
    pub(super) restore: String,
    /// Extends the reservation of $2 on $1 to $3 ms; a row back says whether it was still live.
    pub(super) extend: String,
    /// Completes the reservation of $2 on $1 with record $3 for $4 ms; a row back says
    /// whether the reservation was still live.
    pub(super) complete_ours: String,
    /// Stores record $2 (fingerprint $3) for $4 ms in a free or expired key $1, unless it is
    /// the freed reservation of $5.
    pub(super) complete_empty: String,
    /// Whether key $1 holds exactly record $2 (a repeated completion).
    pub(super) holds_record: String,
    /// Frees $1 if $2 holds it.
    pub(super) release: String,
    /// Deletes up to $1 expired rows.
    pub(super) expire: String,
    /// Deletes key $1 whatever it holds; a row back says whether it was live.
    pub(super) purge: String,
    /// Whether nobody holds the advisory lock $2 of key $1 (taken for the statement only), then
    /// a live row of key $1 (NULLs without one): state, fingerprint, record, remaining lease in
    /// ms, token.
    pub(super) holder: String,
    /// Takes key $1's advisory lock $2 in the current transaction (the function of migration
    /// 0002): no row when it now holds the key, otherwise `holder`'s columns.
    pub(super) hold: String,
}

/// The migration's statements for `table`.
fn schema_for(table: &str) -> String {
    DEFAULT_SCHEMA
        .replace(&bare_index_name(DEFAULT_TABLE), &bare_index_name(table))
        .replace(&format!("ON {DEFAULT_TABLE} "), &format!("ON {table} "))
        .replace(
            &format!("NOT EXISTS {DEFAULT_TABLE} ("),
            &format!("NOT EXISTS {table} ("),
        )
        .replace(
            &format!("FUNCTION {DEFAULT_TABLE}_hold("),
            &format!("FUNCTION {table}_hold("),
        )
        .replace(
            &format!("FROM {DEFAULT_TABLE} AS r"),
            &format!("FROM {table} AS r"),
        )
}

/// The name of `table`'s expiry index as the schema writes it: after the table, without its
/// schema (an index lives in its table's schema).
fn bare_index_name(table: &str) -> String {
    let bare = table.rsplit('.').next().unwrap_or(table);
    format!("{bare}_expires_at")
}

/// The name of `table`'s expiry index as `to_regclass` finds it.
pub(super) fn index_name(table: &str) -> String {
    match table.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.{}", bare_index_name(table)),
        None => bare_index_name(table),
    }
}

/// The body of the hold function in `schema`, as PostgreSQL keeps it (`pg_proc.prosrc`): what
/// tells whether a database has this version of it.
pub(super) fn hold_function_body(schema: &str) -> Option<&str> {
    let start = schema.find("AS $$")? + "AS $$".len();
    let length = schema[start..].find("$$;")?;
    Some(&schema[start..start + length])
}

const IN: &str = "clock_timestamp() + $4::float8 * interval '1 millisecond'";

/// A reservation freed (released or purged) before its lease's end keeps its row until then,
/// with `expires_at` moved to the moment it was freed: free for everyone, but never made again
/// by its old owner. (A live or lapsed reservation has `expires_at = lease_until`.)
///
/// The two are each computed from `clock_timestamp()`, which moves between them within one
/// statement: the test allows a millisecond, where a freed reservation differs by what was
/// left of its lease.
const FREED: &str = "(r.state = 'in_flight' AND r.token = TOKEN \
     AND r.lease_until > r.expires_at + interval '1 millisecond' \
     AND r.lease_until > clock_timestamp())";

/// The same test, on the row a statement reads without an alias.
const FREED_ROW: &str = "(lease_until > expires_at + interval '1 millisecond')";

impl Statements {
    pub(super) fn for_table(table: &str) -> Self {
        let freed_by_excluded = FREED.replace("TOKEN", "EXCLUDED.token");
        let freed_by_5 = FREED.replace("TOKEN", "$5");
        let claim = format!(
            "INSERT INTO {table} AS r (key, state, token, fingerprint, record, lease_until, expires_at) \
             SELECT $1, 'in_flight', $2, $3, NULL, {IN}, {IN} WHERE pg_try_advisory_xact_lock($5) \
             ON CONFLICT (key) DO UPDATE SET state = 'in_flight', token = EXCLUDED.token, \
               fingerprint = EXCLUDED.fingerprint, record = NULL, \
               lease_until = EXCLUDED.lease_until, expires_at = EXCLUDED.expires_at, \
               created_at = now() \
             WHERE r.expires_at <= clock_timestamp() \
             RETURNING true"
        );
        Self {
            schema: schema_for(table),
            restore: claim.replace(
                "WHERE r.expires_at <= clock_timestamp()",
                &format!("WHERE r.expires_at <= clock_timestamp() AND NOT {freed_by_excluded}"),
            ),
            claim,
            extend: format!(
                "UPDATE {table} AS r SET lease_until = {in3}, expires_at = {in3} \
                 FROM (SELECT key, expires_at > clock_timestamp() AS live FROM {table} \
                       WHERE key = $1 AND state = 'in_flight' AND token = $2 \
                         AND NOT {FREED_ROW} FOR UPDATE) AS old \
                 WHERE r.key = old.key RETURNING old.live",
                in3 = IN.replace("$4", "$3")
            ),
            complete_ours: format!(
                "UPDATE {table} AS r SET state = 'completed', token = NULL, record = $3, \
                   lease_until = NULL, expires_at = {IN} \
                 FROM (SELECT key, expires_at > clock_timestamp() AS live FROM {table} \
                       WHERE key = $1 AND state = 'in_flight' AND token = $2 \
                         AND NOT {FREED_ROW} FOR UPDATE) AS old \
                 WHERE r.key = old.key RETURNING old.live"
            ),
            complete_empty: format!(
                "INSERT INTO {table} AS r (key, state, token, fingerprint, record, lease_until, expires_at) \
                 VALUES ($1, 'completed', NULL, $3, $2, NULL, {IN}) \
                 ON CONFLICT (key) DO UPDATE SET state = 'completed', token = NULL, \
                   fingerprint = EXCLUDED.fingerprint, record = EXCLUDED.record, \
                   lease_until = NULL, expires_at = EXCLUDED.expires_at, created_at = now() \
                 WHERE r.expires_at <= clock_timestamp() AND NOT {freed_by_5} \
                 RETURNING true"
            ),
            holds_record: format!(
                "SELECT record = $2 FROM {table} \
                 WHERE key = $1 AND state = 'completed' AND expires_at > clock_timestamp()"
            ),
            release: format!(
                "UPDATE {table} SET expires_at = clock_timestamp() \
                 WHERE key = $1 AND state = 'in_flight' AND token = $2 \
                   AND expires_at > clock_timestamp()"
            ),
            purge: format!(
                "WITH freed AS (\
                   UPDATE {table} SET expires_at = clock_timestamp() \
                   WHERE key = $1 AND state = 'in_flight' AND expires_at > clock_timestamp() \
                   RETURNING true), \
                 deleted AS (\
                   DELETE FROM {table} WHERE key = $1 AND state = 'completed' \
                   RETURNING expires_at > clock_timestamp() AS live) \
                 SELECT EXISTS (SELECT 1 FROM freed) \
                   OR COALESCE((SELECT bool_or(live) FROM deleted), false)"
            ),
            holder: format!(
                "SELECT pg_try_advisory_xact_lock($2), r.state, r.fingerprint, r.record, \
                   GREATEST(EXTRACT(EPOCH FROM (r.lease_until - clock_timestamp())) * 1000, 0)::float8, \
                   r.token \
                 FROM (VALUES (1)) AS one \
                 LEFT JOIN {table} AS r ON r.key = $1 AND r.expires_at > clock_timestamp()"
            ),
            hold: format!("SELECT * FROM {table}_hold($1, $2)"),
            expire: format!(
                "DELETE FROM {table} WHERE key IN (\
                   SELECT key FROM {table} WHERE expires_at <= clock_timestamp() \
                     AND (lease_until IS NULL OR lease_until <= clock_timestamp()) \
                   ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_table_gets_the_same_schema_under_its_name() {
        assert_eq!(schema_for(DEFAULT_TABLE), DEFAULT_SCHEMA);
        let other = schema_for("api.keys");
        assert!(other.contains("CREATE TABLE IF NOT EXISTS api.keys ("));
        assert!(
            other.contains("CREATE INDEX IF NOT EXISTS keys_expires_at ON api.keys (expires_at)")
        );
        assert!(other.contains("CREATE OR REPLACE FUNCTION api.keys_hold("));
        assert!(other.contains("FROM api.keys AS r"));
        assert!(!other.contains(DEFAULT_TABLE));
    }

    #[test]
    fn the_schema_in_place_is_recognised_by_its_index_and_function_body() {
        assert_eq!(index_name(DEFAULT_TABLE), "idempotency_keys_expires_at");
        assert_eq!(index_name("api.keys"), "api.keys_expires_at");
        for table in [DEFAULT_TABLE, "api.keys"] {
            let schema = schema_for(table);
            let body = hold_function_body(&schema).unwrap_or_default();
            assert!(body.starts_with('\n') && body.ends_with("END\n"), "{body}");
            assert!(
                body.contains("version 1"),
                "the version line is in the body"
            );
            assert!(body.contains(&format!("FROM {table} AS r")));
            assert!(!body.contains("$$"));
        }
    }

    #[test]
    fn only_plain_table_names_are_accepted() {
        for good in ["idempotency_keys", "api.idempotency_keys", "_k2"] {
            assert!(is_plain_table_name(good), "{good}");
        }
        for bad in [
            "",
            "2keys",
            "keys; DROP TABLE x",
            "a.b.c",
            "\"quoted\"",
            "a.",
        ] {
            assert!(!is_plain_table_name(bad), "{bad}");
        }
    }
}

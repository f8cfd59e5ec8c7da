"""The SQL of the PostgreSQL backend, in one place (the schema is in migrations/*.sql).

Writes take whole columns as arrays (unnest) so that one statement serves a whole write group;
%b marks binary parameters.
"""


INSERT_HEADS = ("INSERT INTO log_heads (log) SELECT unnest(%b::text[]) "
                "ON CONFLICT (log) DO NOTHING")
LOCK_HEADS = ("SELECT log, next_offset, first_offset FROM log_heads WHERE log = ANY(%b::text[]) "
              "ORDER BY log FOR UPDATE")
LOCK_DOCS = ("SELECT c.ns, c.id, c.version FROM doc_current c "
             "JOIN unnest(%b::text[], %b::text[]) AS k(ns, id) ON c.ns = k.ns AND c.id = k.id "
             "ORDER BY c.ns, c.id FOR UPDATE OF c")
KV_UPSERT = ("INSERT INTO kv (ns, key, value) SELECT * FROM unnest(%b::text[], %b::bytea[], "
             "%b::bytea[]) ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value")
KV_DELETE = ("DELETE FROM kv USING unnest(%b::text[], %b::bytea[]) AS d(ns, key) "
             "WHERE kv.ns = d.ns AND kv.key = d.key")
TS_UPSERT = ("INSERT INTO ts_points (ns, series, ts, value) SELECT * FROM unnest(%b::text[], "
             "%b::text[], %b::bigint[], %b::bytea[]) "
             "ON CONFLICT (ns, series, ts) DO UPDATE SET value = EXCLUDED.value")
DOC_INSERT = ("INSERT INTO doc_versions (ns, id, version, body, created_ms) SELECT * FROM "
              "unnest(%b::text[], %b::text[], %b::bigint[], %b::bytea[], %b::bigint[])")
DOC_CURRENT = ("INSERT INTO doc_current (ns, id, version) SELECT * FROM unnest(%b::text[], "
               "%b::text[], %b::bigint[]) ON CONFLICT (ns, id) DO UPDATE "
               "SET version = EXCLUDED.version")
LOG_INSERT = ("INSERT INTO log_records (log, \"offset\", appended_ms, payload) SELECT * FROM "
              "unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bytea[])")
LOG_COPY = "COPY log_records (log, \"offset\", appended_ms, payload) FROM STDIN (FORMAT BINARY)"
HEADS_UPDATE = ("UPDATE log_heads SET next_offset = u.next_offset FROM unnest(%b::text[], "
                "%b::bigint[]) AS u(log, next_offset) WHERE log_heads.log = u.log")
COMMITS_UPSERT = ("INSERT INTO consumer_offsets (\"group\", log, \"offset\") SELECT * FROM "
                  "unnest(%b::text[], %b::text[], %b::bigint[]) ON CONFLICT (\"group\", log) "
                  "DO UPDATE SET \"offset\" = EXCLUDED.\"offset\"")

GET = "SELECT value FROM kv WHERE ns = %s AND key = %s"
SCAN = ("SELECT key, value FROM kv WHERE ns = %s AND key >= %s AND key < %s "
        "ORDER BY key LIMIT %s")
SCAN_OPEN = "SELECT key, value FROM kv WHERE ns = %s AND key >= %s ORDER BY key LIMIT %s"
TS_RANGE = ("SELECT ts, value FROM ts_points WHERE ns = %s AND series = %s AND ts >= %s "
            "AND ts < %s ORDER BY ts LIMIT %s")
DOC_GET_CURRENT = ("SELECT d.version, d.body, d.created_ms FROM doc_current c JOIN doc_versions d "
                   "ON d.ns = c.ns AND d.id = c.id AND d.version = c.version "
                   "WHERE c.ns = %s AND c.id = %s")
DOC_GET_VERSION = ("SELECT version, body, created_ms FROM doc_versions "
                   "WHERE ns = %s AND id = %s AND version = %s")
DOC_HISTORY = ("SELECT version, body, created_ms FROM doc_versions WHERE ns = %s AND id = %s "
               "ORDER BY version DESC LIMIT %s")
_DOC_LIST = ("SELECT c.id, c.version, d.body, d.created_ms FROM doc_current c JOIN doc_versions d "
             "ON d.ns = c.ns AND d.id = c.id AND d.version = c.version "
             "WHERE c.ns = %s AND c.id >= %s AND c.id < %s{after} ORDER BY c.id LIMIT %s")
DOC_LIST = _DOC_LIST.format(after="")
DOC_LIST_AFTER = _DOC_LIST.format(after=" AND c.id > %s")
LOG_READ = ("SELECT \"offset\", appended_ms, payload FROM log_records WHERE log = %s AND "
            "\"offset\" >= GREATEST(%s, (SELECT first_offset FROM log_heads WHERE log = %s)) "
            "ORDER BY \"offset\" LIMIT %s")
HEAD = "SELECT next_offset, first_offset FROM log_heads WHERE log = %s"
COMMITTED = "SELECT \"offset\" FROM consumer_offsets WHERE \"group\" = %s AND log = %s"

-- The storage worker's schema, version 1. Applied by PostgresBackend.open() inside one
-- transaction, under an advisory lock; recorded in schema_migrations.
-- Text that is ordered or scanned by prefix uses COLLATE "C": byte order, as in LevelDB,
-- whatever the database's default collation is.

-- Key/value records by namespace.
CREATE TABLE kv (
    ns    text COLLATE "C" NOT NULL,
    key   bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (ns, key)
);

-- Time series: one value per (ns, series, ts); ts in milliseconds since the epoch.
CREATE TABLE ts_points (
    ns     text COLLATE "C" NOT NULL,
    series text COLLATE "C" NOT NULL,
    ts     bigint NOT NULL,
    value  bytea NOT NULL,
    PRIMARY KEY (ns, series, ts)
);

-- Versioned documents: every version is kept; doc_current names the current one.
CREATE TABLE doc_versions (
    ns         text COLLATE "C" NOT NULL,
    id         text COLLATE "C" NOT NULL,
    version    bigint NOT NULL CHECK (version >= 1),
    body       bytea NOT NULL,
    created_ms bigint NOT NULL,
    PRIMARY KEY (ns, id, version)
);

CREATE TABLE doc_current (
    ns      text COLLATE "C" NOT NULL,
    id      text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (ns, id),
    FOREIGN KEY (ns, id, version) REFERENCES doc_versions (ns, id, version)
        DEFERRABLE INITIALLY DEFERRED
);

-- Event log: offsets per log are monotonic and gap-free. log_heads holds the next offset to
-- give out (its row is locked FOR UPDATE by every append) and the oldest one kept.
CREATE TABLE log_heads (
    log          text COLLATE "C" PRIMARY KEY,
    next_offset  bigint NOT NULL DEFAULT 0,
    first_offset bigint NOT NULL DEFAULT 0,
    CHECK (0 <= first_offset AND first_offset <= next_offset)
);

CREATE TABLE log_records (
    log         text COLLATE "C" NOT NULL,
    "offset"    bigint NOT NULL,
    appended_ms bigint NOT NULL,
    payload     bytea NOT NULL,
    PRIMARY KEY (log, "offset")
);

-- Consumer groups' committed offsets: everything before "offset" is processed.
CREATE TABLE consumer_offsets (
    "group"  text COLLATE "C" NOT NULL,
    log      text COLLATE "C" NOT NULL,
    "offset" bigint NOT NULL CHECK ("offset" >= 0),
    PRIMARY KEY ("group", log)
);

-- Key transparency (issue 18): the verifiable key directory of each served domain, as opaque
-- records (kst_core::transparency::records). Written by kst_postgres::PgDirectoryStore; see
-- docs/TRANSPARENCY.md. IF NOT EXISTS: databases of releases that created these tables on
-- first use (before they were part of the migrations) keep theirs.
CREATE TABLE IF NOT EXISTS kt_roots (
    domain TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    record BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS kt_nodes (
    domain TEXT NOT NULL,
    key BYTEA NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (domain, key)
);
CREATE TABLE IF NOT EXISTS kt_values (
    domain TEXT NOT NULL,
    label BYTEA NOT NULL,
    epoch BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (domain, label, epoch)
);
CREATE TABLE IF NOT EXISTS kt_heads (
    domain TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    head BYTEA NOT NULL,
    PRIMARY KEY (domain, epoch)
);
CREATE TABLE IF NOT EXISTS kt_cosignatures (
    domain TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    witness BYTEA NOT NULL,
    cosignature BYTEA NOT NULL,
    PRIMARY KEY (domain, epoch, witness)
);
CREATE INDEX IF NOT EXISTS kt_cosignatures_by_witness
    ON kt_cosignatures (domain, witness, epoch);

-- kst schema, version 1: the current version of each address and every published version.
--
-- Addresses use the "C" collation so that ORDER BY and range scans follow byte order, which is
-- what KeyStore::list promises.

CREATE TABLE kst_keys (
    address         text COLLATE "C" PRIMARY KEY,
    -- Version of the current key; the row exists only while the address has a key.
    current_version bigint NOT NULL CHECK (current_version > 0)
);

CREATE TABLE kst_key_history (
    address        text COLLATE "C" NOT NULL REFERENCES kst_keys (address) ON DELETE CASCADE,
    version        bigint NOT NULL CHECK (version > 0),
    key            bytea NOT NULL,
    fingerprint    text NOT NULL,
    published_at   bigint NOT NULL,
    publication_id text NOT NULL,
    revoked        boolean NOT NULL DEFAULT false,
    format         integer NOT NULL,
    PRIMARY KEY (address, version)
);

-- Idempotency: "was this publication_id applied to this address before?"
CREATE INDEX kst_key_history_publication ON kst_key_history (address, publication_id);

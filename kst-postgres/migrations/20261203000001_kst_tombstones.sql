-- kst schema, version 3: tombstones, the key revocations of a primary key kept for good.
--
-- One row per primary-key fingerprint that was ever published revoked: its key revocation
-- signatures (binary OpenPGP signature packets, concatenated). Rows outlive the deletion of
-- every address (kst_keys / kst_key_history) and are merged into every later publication of
-- the same fingerprint, so a revocation cannot be rolled back (KeyStore contract). A publisher
-- serializes on the fingerprint with a transaction-level advisory lock before reading its row.

CREATE TABLE kst_tombstones (
    fingerprint text COLLATE "C" PRIMARY KEY,
    revocations bytea NOT NULL
);

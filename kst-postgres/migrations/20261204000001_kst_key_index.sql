-- kst schema, version 4: the look-up index (issue 14): what each current key is found by besides
-- its address.
--
-- One row per entry of kst_core::key_index::IndexEntries::of(current record): kind 1 = a
-- fingerprint (primary or subkey, uppercase hex), kind 2 = a 64-bit key ID (as KeyId::as_str),
-- kind 3 = the WKD hash of the address (value "<z-base-32 hash>@<domain>"). Rows exist for
-- current keys only: publish and restore replace the address' rows in their own transaction,
-- delete removes them with the address row (cascade). A look-up is one primary-key range scan,
-- ordered by address; readers check every hit against the record (a stale row is never served).
--
-- This migration does not backfill: computing subkey fingerprints needs OpenPGP parsing, which
-- SQL cannot do. Stores written before it are indexed by KeyStore::rebuild_index (`kst migrate`
-- runs it); until then look-ups fall back to a scan (correct, O(number of keys)).
-- kst_key_index_state.built says whether the index is complete: true from the start for a store
-- without keys, set by rebuild_index otherwise.

CREATE TABLE kst_key_index (
    kind    smallint NOT NULL CHECK (kind IN (1, 2, 3)),
    value   text COLLATE "C" NOT NULL,
    address text COLLATE "C" NOT NULL REFERENCES kst_keys (address) ON DELETE CASCADE,
    PRIMARY KEY (kind, value, address)
);

-- Replacing or deleting one address' rows.
CREATE INDEX kst_key_index_address ON kst_key_index (address);

CREATE TABLE kst_key_index_state (
    one   boolean PRIMARY KEY DEFAULT true CHECK (one),
    built boolean NOT NULL
);

INSERT INTO kst_key_index_state (one, built)
SELECT true, NOT EXISTS (SELECT 1 FROM kst_keys);

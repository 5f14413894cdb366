-- kst schema: expiry reminder claims (KeyStore::claim_reminder).
--
-- One row per expiry reminder sent: the owner's address and the claim id
-- (<fingerprint>-<expires_at>-<days before>). The instance whose INSERT adds the row sends the
-- reminder; every other instance of the pool finds it there. Rows outlive deletions; an
-- extended key has another expiry, hence other claims.

CREATE TABLE kst_reminder_claims (
    address text COLLATE "C" NOT NULL,
    claim text COLLATE "C" NOT NULL,
    claimed_at bigint NOT NULL,
    PRIMARY KEY (address, claim)
);

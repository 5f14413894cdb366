-- kst schema: the publication ids of deleted histories (deletion wins over a redelivery).
--
-- KeyStore::delete copies the publication id of every version of the address it deletes into
-- this table, in the same transaction, after locking the address' kst_keys row. A publication
-- whose id is here and not in the address' current history is refused (Error::DeletedSince):
-- the MTA delivered the publication again after the owner deleted the key. Rows are never
-- removed (like kst_tombstones); kst_keys does not reference them, so they outlive the deletion.

CREATE TABLE IF NOT EXISTS kst_deleted_publications (
    address        text COLLATE "C" NOT NULL,
    publication_id text COLLATE "C" NOT NULL,
    deleted_at     bigint NOT NULL,
    PRIMARY KEY (address, publication_id)
);

-- When each stored cosignature was checked by its witness (issue 18, ktfair): a cosignature
-- replaces the one stored for its epoch and witness only when it was not checked earlier,
-- in the same statement, so two pool instances storing two checks at once keep the later.
-- Rows from before this column read 0 (any check replaces them).
ALTER TABLE kt_cosignatures ADD COLUMN IF NOT EXISTS checked_at BIGINT NOT NULL DEFAULT 0;

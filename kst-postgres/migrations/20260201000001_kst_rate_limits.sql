-- kst schema, version 2: rate-limit counters shared by every instance of a pool.
--
-- One row per limiter key ("sender:bob@acme.net", ...): the count of its current fixed window and
-- when that window ends. A hit upserts the row; a row whose window has passed starts again at 1.
-- Rows of windows that ended are swept now and then by the instances themselves.

CREATE TABLE kst_rate_limits (
    key        text COLLATE "C" PRIMARY KEY,
    count      bigint NOT NULL CHECK (count > 0),
    window_end timestamptz NOT NULL
);

CREATE INDEX kst_rate_limits_window_end ON kst_rate_limits (window_end);

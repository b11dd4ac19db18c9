-- devicehub's readings table and its sequence counter.
--
-- Sequence numbers are allocated from one counter row (devicehub_sequence),
-- not from a PostgreSQL SEQUENCE: a writer's transaction moves the counter
-- and inserts its readings, and the counter row stays locked until that
-- transaction ends. The next writer waits for it, so
--   * numbers are committed in increasing order (a reader that has seen seq
--     s has seen every committed seq below s: nothing commits later below it);
--   * a rolled-back batch gives its numbers back (no gaps from failures);
-- the only holes in `readings` are what retention deleted. See src/store/.
--
-- The counter starts at the current time in microseconds, like a service
-- without a store numbers its readings, so numbers keep increasing when a
-- deployment adds the store.

CREATE TABLE devicehub_sequence (
    id       smallint PRIMARY KEY CHECK (id = 1),
    next_seq bigint   NOT NULL CHECK (next_seq > 0)
);
INSERT INTO devicehub_sequence (id, next_seq)
VALUES (1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);

CREATE TABLE readings (
    seq         bigint      PRIMARY KEY,
    device_id   text        NOT NULL,
    topic       text        NOT NULL,
    payload     bytea       NOT NULL,
    qos         smallint    NOT NULL,
    retained    boolean     NOT NULL,
    received_at timestamptz NOT NULL,
    -- 0 reading, 1 command reply, 2 status message (status: 0 unknown,
    -- 1 online, 2 offline; NULL for other kinds or a status not understood).
    kind        smallint    NOT NULL,
    status      smallint
);
-- Pages of one device, and time ranges (turned into sequence ranges).
CREATE INDEX readings_device_seq ON readings (device_id, seq);
CREATE INDEX readings_received_at ON readings (received_at);

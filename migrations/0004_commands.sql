-- Persistent commands (SendCommand with a ttl) and their state changes.
-- States are the proto's CommandState numbers: 1 queued, 2 sent,
-- 3 succeeded, 4 failed, 5 expired, 6 cancelled. Times are set by the
-- instance that makes the change.
CREATE TABLE commands (
    id          uuid PRIMARY KEY,
    -- Acceptance order: a device's queued commands are published in it.
    accepted    bigserial NOT NULL,
    device_id   text NOT NULL,
    command     text NOT NULL,
    params      jsonb,
    topic       text NOT NULL,
    -- What is published, every attempt the same; NULL once it ended.
    payload     bytea,
    qos         smallint NOT NULL,
    state       smallint NOT NULL,
    create_time timestamptz NOT NULL,
    expire_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    -- When it was last published.
    sent_at     timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    -- {"ok": bool, "result": any, "message": text, "received_at": micros}
    reply       jsonb,
    -- The instance publishing it, until when (a claim; see commands/mod.rs).
    lease_owner uuid,
    lease_until timestamptz
);
CREATE INDEX commands_active ON commands (device_id, accepted) WHERE state IN (1, 2);
CREATE INDEX commands_expiring ON commands (expire_time) WHERE state IN (1, 2);
CREATE INDEX commands_ended ON commands (update_time) WHERE state > 2;
CREATE INDEX commands_by_device ON commands (device_id, id);

-- Every state change, numbered in commit order: the counter row is locked
-- by each changing statement until its transaction ends, as
-- devicehub_sequence is for readings, so a reader following seq never
-- skips a change that commits later.
CREATE TABLE command_changes (
    seq         bigint PRIMARY KEY,
    command_id  uuid NOT NULL,
    state       smallint NOT NULL,
    attempts    integer NOT NULL,
    update_time timestamptz NOT NULL
);
CREATE TABLE command_change_counter (
    id       integer PRIMARY KEY CHECK (id = 1),
    next_seq bigint NOT NULL
);
INSERT INTO command_change_counter VALUES (1, 1);

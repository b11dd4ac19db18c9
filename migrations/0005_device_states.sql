-- Device states (desired and reported) and their changes. `state` holds
-- both sides with their per-key times and update times (see
-- src/store/postgres/states/mod.rs); `version` is the change's number.
CREATE TABLE device_states (
    device_id         text PRIMARY KEY,
    version           bigint NOT NULL,
    state             jsonb NOT NULL,
    -- The version of the last change of desired, and the last version
    -- whose desired state was published (acknowledged by the broker): a
    -- restart publishes those where the second is behind.
    desired_version   bigint NOT NULL DEFAULT 0,
    published_version bigint NOT NULL DEFAULT 0
);
CREATE INDEX device_states_unpublished ON device_states (device_id)
    WHERE published_version < desired_version;

-- Every change, numbered by the counter row, which each changing
-- transaction locks until it ends (as devicehub_sequence is for readings):
-- versions are handed out in commit order, so a reader following them
-- never skips one that commits later. Kept for a while, for the tails of
-- other instances.
CREATE TABLE device_state_changes (
    version    bigint PRIMARY KEY,
    device_id  text NOT NULL,
    state      jsonb NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_state_changes_age ON device_state_changes (changed_at);
-- Starts at the time of the migration, in microseconds, as versions
-- without a store do: a device keeping the last version it applied takes
-- the next one after a move from memory to the store.
CREATE TABLE device_state_counter (
    id      integer PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
);
INSERT INTO device_state_counter VALUES (1, (extract(epoch FROM now()) * 1000000)::int8);

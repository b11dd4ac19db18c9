-- The device list, kept so that it survives restarts: one row per device,
-- upserted with each committed batch (never recomputed from `readings`).
-- Times as in `readings`; status: 0 unknown, 1 online, 2 offline.
CREATE TABLE devices (
    device_id         text        PRIMARY KEY,
    first_seen        timestamptz NOT NULL,
    last_seen         timestamptz NOT NULL,
    -- The newest reading (not reply or status message); it may since have
    -- been deleted by retention.
    last_reading_seq  bigint,
    status            smallint    NOT NULL DEFAULT 0,
    status_changed_at timestamptz
);

-- Several writers (replicas) on one database: received times must not go
-- backwards as sequence numbers go up, across writers too, since time
-- ranges are turned into sequence ranges. Writers' clocks differ, and a
-- batch received earlier may commit later, so the counter row keeps the
-- newest time committed, and each commit raises its readings' times to at
-- least the one before it:
--   newest_micros: the newest received time committed, in microseconds;
--   floor_micros:  what newest_micros was before the last commit (the
--                  floor that commit's times were raised to; kept in a
--                  column because UPDATE ... RETURNING shows only new
--                  values).
ALTER TABLE devicehub_sequence
    ADD COLUMN newest_micros bigint NOT NULL DEFAULT 0,
    ADD COLUMN floor_micros  bigint NOT NULL DEFAULT 0;
UPDATE devicehub_sequence SET newest_micros = coalesce(
    (SELECT (extract(epoch FROM max(received_at)) * 1000000)::bigint FROM readings), 0);

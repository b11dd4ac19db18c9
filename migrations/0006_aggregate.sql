-- AggregateReadings (src/store/postgres/aggregate.rs) reads payloads as
-- JSON and JSON numbers as float8 in SQL. Casts fail the whole statement on
-- one payload that is not JSON (or not UTF-8), or one number beyond float8;
-- these two do the same casts and give NULL instead, so that such a
-- reading is left out (as memory leaves it out) and never blocks the rest.
-- They cost a subtransaction each (so no parallel worker may run them):
-- the statement uses them only for payloads that do not look like JSON
-- documents, and for everything when the fast casts failed.

CREATE FUNCTION devicehub_jsonb(payload bytea) RETURNS jsonb
LANGUAGE plpgsql STABLE STRICT PARALLEL UNSAFE AS $$
BEGIN
    RETURN convert_from(payload, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

CREATE FUNCTION devicehub_float8(value jsonb) RETURNS float8
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL UNSAFE AS $$
BEGIN
    RETURN value::float8;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- A float8 sum that goes past the largest double is an error in SQL; in
-- memory it is infinity. This sum is infinity too.
CREATE FUNCTION devicehub_add(total float8, value float8) RETURNS float8
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL UNSAFE AS $$
BEGIN
    RETURN total + value;
EXCEPTION WHEN numeric_value_out_of_range THEN
    RETURN sign(total) * 'Infinity'::float8;
END
$$;

CREATE AGGREGATE devicehub_sum(float8) (SFUNC = devicehub_add, STYPE = float8);

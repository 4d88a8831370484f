-- Rooms: one shared roulette table each. The history is a JSON array kept beside
-- its length so listings never have to parse it.
CREATE TABLE rooms (
    id             BIGSERIAL   PRIMARY KEY,
    key            TEXT        NOT NULL UNIQUE,
    history        JSONB       NOT NULL DEFAULT '[]',
    history_length INTEGER     NOT NULL DEFAULT 0,
    version        BIGINT      NOT NULL DEFAULT 0,
    epoch          TEXT        NOT NULL,
    password_hash  TEXT,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL
);

CREATE INDEX rooms_by_activity ON rooms (updated_at DESC, id DESC);

-- Every mutation rewrites the whole history, and a long one is stored compressed.
-- lz4 (PostgreSQL 14+, when built with it, as the Debian and Docker builds are)
-- decompresses a 10,000-number history in a fraction of the time the default
-- pglz takes, and that time is spent while the room is locked. Servers without
-- lz4 keep the default.
DO $$
BEGIN
    ALTER TABLE rooms ALTER COLUMN history SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available: rooms.history keeps the default compression';
END;
$$;

-- Event log: every committed mutation with the version it produced. Used to replay
-- missed events to reconnecting members and to de-duplicate client retries.
CREATE TABLE room_events (
    room_id     BIGINT      NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    version     BIGINT      NOT NULL,
    kind        TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    mutation_id TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (room_id, version)
);

CREATE INDEX room_events_by_mutation ON room_events (room_id, mutation_id)
    WHERE mutation_id IS NOT NULL;

-- Appends numbers to an existing room: the hot path of `Store::apply`. An instance
-- collects the adds for one room that arrive while its previous call is running
-- and hands them over in one call, in arrival order; the result is exactly that of
-- applying them one after another (each with its own version and event), but the
-- room's lock is taken and the commit flushed once for the whole group.
--
-- For each item, in order, it does what the generic transaction in
-- src/store/postgres.rs does for an add (and what `next_history` decides):
--   1. (once) lock the room row — appenders on other instances queue here;
--   2. if the item's mutation id was applied after `p_dedup_after` (by an earlier
--      call or an earlier item of this one), report the first event it produced
--      and change nothing;
--   3. refuse when the history already holds the item's `p_max_history` numbers;
--   4. otherwise append, take the next version, and log the event.
-- PL/pgSQL rather than one CTE statement because each statement of a VOLATILE
-- function takes a fresh snapshot: the de-duplication lookups run after the lock
-- is granted and see every event committed before it, and the events inserted
-- for earlier items. A single statement would still be reading the snapshot taken
-- before it queued for the lock, and could apply a concurrent retry twice.
-- A missing room is reported (room_found = false) without creating anything; the
-- caller then takes the generic path, which creates rooms.
--
-- Per item the result arrays hold its outcome ('applied' | 'duplicate' |
-- 'too_long'), the room's version once it was handled (for 'applied': the version
-- it produced), and for 'duplicate' the first attempt's event (NULL otherwise).
-- The other columns describe the room before the call, and its final history.
CREATE FUNCTION croupier_append(
    p_key            TEXT,
    p_numbers        JSONB,
    p_mutation_ids   TEXT[],
    p_max_history    BIGINT[],
    p_now            TIMESTAMPTZ,
    p_dedup_after    TIMESTAMPTZ,
    OUT room_found        BOOLEAN,
    OUT room_id           BIGINT,
    OUT room_epoch        TEXT,
    OUT room_protected    BOOLEAN,
    OUT room_created_at   TIMESTAMPTZ,
    OUT updated_at_before TIMESTAMPTZ,
    OUT version_before    BIGINT,
    OUT room_history      TEXT,
    OUT outcomes          TEXT[],
    OUT room_versions     BIGINT[],
    OUT event_versions    BIGINT[],
    OUT event_kinds       TEXT[],
    OUT event_payloads    TEXT[],
    OUT event_times       TIMESTAMPTZ[]
)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    r        rooms%ROWTYPE;
    numbers  JSONB;
    earlier  room_events%ROWTYPE;
    len      BIGINT;
    ver      BIGINT;
    added    JSONB := '[]';
    mid      TEXT;
    item     JSONB;
BEGIN
    IF cardinality(p_mutation_ids) <> jsonb_array_length(p_numbers)
       OR cardinality(p_max_history) <> jsonb_array_length(p_numbers) THEN
        RAISE EXCEPTION 'croupier_append: one mutation id and one limit per number';
    END IF;
    SELECT * INTO r FROM rooms WHERE rooms.key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        room_found := false;
        RETURN;
    END IF;
    room_found := true;
    room_id := r.id;
    room_epoch := r.epoch;
    room_protected := r.password_hash IS NOT NULL;
    room_created_at := r.created_at;
    updated_at_before := r.updated_at;
    version_before := r.version;
    outcomes := '{}';
    room_versions := '{}';
    event_versions := '{}';
    event_kinds := '{}';
    event_payloads := '{}';
    event_times := '{}';
    -- Read (and decompress) the history once; it is rebuilt once at the end.
    numbers := r.history;
    len := jsonb_array_length(numbers);
    ver := r.version;

    FOR i IN 1 .. jsonb_array_length(p_numbers) LOOP
        item := p_numbers -> (i - 1);
        mid := p_mutation_ids[i];
        IF mid IS NOT NULL THEN
            SELECT * INTO earlier FROM room_events e
             WHERE e.room_id = r.id AND e.mutation_id = mid AND e.created_at > p_dedup_after
             ORDER BY e.version
             LIMIT 1;
            IF FOUND THEN
                outcomes := array_append(outcomes, 'duplicate');
                room_versions := array_append(room_versions, ver);
                event_versions := array_append(event_versions, earlier.version);
                event_kinds := array_append(event_kinds, earlier.kind);
                event_payloads := array_append(event_payloads, earlier.payload::text);
                event_times := array_append(event_times, earlier.created_at);
                CONTINUE;
            END IF;
        END IF;

        IF len >= p_max_history[i] THEN
            outcomes := array_append(outcomes, 'too_long');
        ELSE
            len := len + 1;
            ver := ver + 1;
            added := added || jsonb_build_array(item);
            INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
            VALUES (r.id, ver, 'add', item, mid, p_now);
            outcomes := array_append(outcomes, 'applied');
        END IF;
        room_versions := array_append(room_versions, ver);
        event_versions := array_append(event_versions, NULL::bigint);
        event_kinds := array_append(event_kinds, NULL::text);
        event_payloads := array_append(event_payloads, NULL::text);
        event_times := array_append(event_times, NULL::timestamptz);
    END LOOP;

    IF ver > r.version THEN
        numbers := numbers || added;
        UPDATE rooms
           SET history = numbers,
               history_length = len,
               version = ver,
               updated_at = p_now
         WHERE rooms.id = r.id;
    END IF;
    room_history := numbers::text;
END;
$$;

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

-- Appends one number to an existing room in a single round trip: the hot path of
-- `Store::apply`. It does exactly what the generic transaction in
-- src/store/postgres.rs does for an add (and what `next_history` decides):
--   1. lock the room row (FOR UPDATE) — concurrent appenders queue here;
--   2. if the mutation id was already applied after `p_dedup_after`, report the
--      first event it produced and change nothing;
--   3. refuse when the history already holds `p_max_history` numbers;
--   4. append, bump the version, and log the event with that version.
-- PL/pgSQL rather than one CTE statement because each statement of a VOLATILE
-- function takes a fresh snapshot: the de-duplication lookup in step 2 runs after
-- the lock is granted and so sees every event committed before it. A single
-- statement would still be reading the snapshot taken before it queued for the
-- lock, and could apply a concurrent retry twice.
-- A missing room is reported as 'missing' without creating anything; the caller
-- then takes the generic path, which creates rooms.
CREATE FUNCTION croupier_append(
    p_key              TEXT,
    p_number           JSONB,
    p_mutation_id      TEXT,
    p_max_history      BIGINT,
    p_now              TIMESTAMPTZ,
    p_dedup_after      TIMESTAMPTZ,
    OUT outcome        TEXT,     -- 'applied' | 'duplicate' | 'too_long' | 'missing'
    OUT out_id         BIGINT,
    OUT out_history    TEXT,
    OUT out_version    BIGINT,
    OUT out_epoch      TEXT,
    OUT out_protected  BOOLEAN,
    OUT out_created_at TIMESTAMPTZ,
    OUT out_updated_at TIMESTAMPTZ,
    OUT event_version  BIGINT,
    OUT event_kind     TEXT,
    OUT event_payload  TEXT,
    OUT event_created_at TIMESTAMPTZ
)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    r rooms%ROWTYPE;
BEGIN
    SELECT * INTO r FROM rooms WHERE rooms.key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'missing';
        RETURN;
    END IF;

    out_id := r.id;
    out_epoch := r.epoch;
    out_protected := r.password_hash IS NOT NULL;
    out_created_at := r.created_at;

    IF p_mutation_id IS NOT NULL THEN
        SELECT e.version, e.kind, e.payload::text, e.created_at
          INTO event_version, event_kind, event_payload, event_created_at
          FROM room_events e
         WHERE e.room_id = r.id
           AND e.mutation_id = p_mutation_id
           AND e.created_at > p_dedup_after
         ORDER BY e.version
         LIMIT 1;
        IF FOUND THEN
            outcome := 'duplicate';
            out_history := r.history::text;
            out_version := r.version;
            out_updated_at := r.updated_at;
            RETURN;
        END IF;
    END IF;

    IF jsonb_array_length(r.history) >= p_max_history THEN
        outcome := 'too_long';
        RETURN;
    END IF;

    UPDATE rooms
       SET history = r.history || jsonb_build_array(p_number),
           history_length = jsonb_array_length(r.history) + 1,
           version = r.version + 1,
           updated_at = p_now
     WHERE rooms.id = r.id
    RETURNING rooms.history::text INTO out_history;

    INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
    VALUES (r.id, r.version + 1, 'add', p_number, p_mutation_id, p_now);

    outcome := 'applied';
    out_version := r.version + 1;
    out_updated_at := p_now;
END;
$$;

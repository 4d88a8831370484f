-- Undoes the contract step: brings back `rooms.history` (filled from
-- `room_numbers`), the trigger that keeps the two in step, and the previous
-- release's append functions, exactly as the expand step leaves them. Run it
-- before rolling the instances back to the previous release.
ALTER TABLE rooms ADD COLUMN history JSONB NOT NULL DEFAULT '[]';

DO $$
BEGIN
    ALTER TABLE rooms ALTER COLUMN history SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available: rooms.history keeps the default compression';
END;
$$;

CREATE FUNCTION croupier_number_json(n TEXT) RETURNS JSONB
LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT CASE WHEN n = '00' THEN to_jsonb(n) ELSE to_jsonb(n::integer) END $$;

UPDATE rooms r
   SET history = h.history
  FROM (SELECT n.room_id, jsonb_agg(croupier_number_json(n.number) ORDER BY n.seq) AS history
          FROM room_numbers n
         GROUP BY n.room_id) h
 WHERE h.room_id = r.id;

CREATE FUNCTION croupier_history_sync() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    old_len BIGINT;
    new_len BIGINT;
    base    BIGINT;
BEGIN
    IF NEW.history IS DISTINCT FROM OLD.history THEN
        old_len := jsonb_array_length(OLD.history);
        new_len := jsonb_array_length(NEW.history);
        IF new_len >= old_len
           AND (old_len = 0
                OR jsonb_path_query_array(NEW.history, '$[0 to $n]',
                                          jsonb_build_object('n', old_len - 1)) = OLD.history) THEN
            SELECT COALESCE(max(seq), 0) INTO base FROM room_numbers WHERE room_id = NEW.id;
            INSERT INTO room_numbers (room_id, seq, number)
            SELECT NEW.id, base + e.o - old_len, e.v #>> '{}'
              FROM jsonb_array_elements(NEW.history) WITH ORDINALITY AS e(v, o)
             WHERE e.o > old_len;
        ELSE
            DELETE FROM room_numbers WHERE room_id = NEW.id;
            INSERT INTO room_numbers (room_id, seq, number)
            SELECT NEW.id, e.o, e.v #>> '{}'
              FROM jsonb_array_elements(NEW.history) WITH ORDINALITY AS e(v, o);
        END IF;
    ELSIF NEW.version IS DISTINCT FROM OLD.version THEN
        NEW.history := COALESCE(
            (SELECT jsonb_agg(croupier_number_json(n.number) ORDER BY n.seq)
               FROM room_numbers n
              WHERE n.room_id = NEW.id),
            '[]'::jsonb);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER rooms_history_sync
    BEFORE UPDATE OF history, version ON rooms
    FOR EACH ROW EXECUTE FUNCTION croupier_history_sync();

-- The previous releases' append functions, as their migrations created them.
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

CREATE FUNCTION croupier_append_known(
    p_key            TEXT,
    p_numbers        JSONB,
    p_mutation_ids   TEXT[],
    p_max_history    BIGINT[],
    p_now            TIMESTAMPTZ,
    p_dedup_after    TIMESTAMPTZ,
    p_known_id       BIGINT,
    p_known_epoch    TEXT,
    p_known_version  BIGINT,
    p_new_epoch      TEXT,
    OUT room_found        BOOLEAN,
    OUT room_id           BIGINT,
    OUT room_epoch        TEXT,
    OUT room_protected    BOOLEAN,
    OUT room_created_at   TIMESTAMPTZ,
    OUT updated_at_before TIMESTAMPTZ,
    OUT version_before    BIGINT,
    OUT length_before     BIGINT,
    OUT history_before    TEXT,
    OUT added_since_known TEXT,
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
    v_id         BIGINT;
    earlier      room_events%ROWTYPE;
    len          BIGINT;
    ver          BIGINT;
    added        JSONB := '[]';
    mid          TEXT;
    item         JSONB;
    missed       BIGINT;
    adds_only    BOOLEAN;
    -- The events of this call, logged by one INSERT at the end.
    new_versions BIGINT[] := '{}';
    new_payloads JSONB[] := '{}';
    new_ids      TEXT[] := '{}';
    earlier_item INTEGER;
BEGIN
    IF cardinality(p_mutation_ids) <> jsonb_array_length(p_numbers)
       OR cardinality(p_max_history) <> jsonb_array_length(p_numbers) THEN
        RAISE EXCEPTION 'croupier_append_known: one mutation id and one limit per number';
    END IF;
    SELECT r.id, r.epoch, r.password_hash IS NOT NULL, r.created_at, r.updated_at,
           r.version, r.history_length
      INTO v_id, room_epoch, room_protected, room_created_at, updated_at_before,
           version_before, length_before
      FROM rooms r
     WHERE r.key = p_key
       FOR UPDATE;
    IF NOT FOUND THEN
        IF p_new_epoch IS NULL OR NOT EXISTS (SELECT 1 FROM unnest(p_max_history) AS m WHERE m > 0) THEN
            room_found := false;
            RETURN;
        END IF;
        INSERT INTO rooms (key, epoch, created_at, updated_at)
        VALUES (p_key, p_new_epoch, p_now, p_now)
        ON CONFLICT (key) DO NOTHING;
        SELECT r.id, r.epoch, r.password_hash IS NOT NULL, r.created_at, r.updated_at,
               r.version, r.history_length
          INTO v_id, room_epoch, room_protected, room_created_at, updated_at_before,
               version_before, length_before
          FROM rooms r
         WHERE r.key = p_key
           FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'croupier_append_known: room % vanished while being created', p_key;
        END IF;
    END IF;
    room_found := true;
    room_id := v_id;

    IF p_known_id IS NOT DISTINCT FROM v_id
       AND p_known_epoch IS NOT DISTINCT FROM room_epoch
       AND p_known_version <= version_before THEN
        IF p_known_version < version_before THEN
            SELECT count(*), COALESCE(bool_and(e.kind = 'add'), false),
                   jsonb_agg(e.payload ORDER BY e.version)::text
              INTO missed, adds_only, added_since_known
              FROM room_events e
             WHERE e.room_id = v_id
               AND e.version > p_known_version
               AND e.version <= version_before;
            IF missed <> version_before - p_known_version OR NOT adds_only THEN
                added_since_known := NULL;
                SELECT r.history::text INTO history_before FROM rooms r WHERE r.id = v_id;
            END IF;
        END IF;
    ELSE
        SELECT r.history::text INTO history_before FROM rooms r WHERE r.id = v_id;
    END IF;

    outcomes := '{}';
    room_versions := '{}';
    event_versions := '{}';
    event_kinds := '{}';
    event_payloads := '{}';
    event_times := '{}';
    len := length_before;
    ver := version_before;

    FOR i IN 1 .. jsonb_array_length(p_numbers) LOOP
        item := p_numbers -> (i - 1);
        mid := p_mutation_ids[i];
        IF mid IS NOT NULL THEN
            -- Applied by an earlier item of this call: not logged yet, but the same
            -- answer the log will give once it is.
            earlier_item := array_position(new_ids, mid);
            IF earlier_item IS NOT NULL THEN
                outcomes := array_append(outcomes, 'duplicate');
                room_versions := array_append(room_versions, ver);
                event_versions := array_append(event_versions, new_versions[earlier_item]);
                event_kinds := array_append(event_kinds, 'add');
                event_payloads := array_append(event_payloads, new_payloads[earlier_item]::text);
                event_times := array_append(event_times, p_now);
                CONTINUE;
            END IF;
            SELECT * INTO earlier FROM room_events e
             WHERE e.room_id = v_id AND e.mutation_id = mid AND e.created_at > p_dedup_after
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
            new_versions := array_append(new_versions, ver);
            new_payloads := array_append(new_payloads, item);
            new_ids := array_append(new_ids, mid);
            outcomes := array_append(outcomes, 'applied');
        END IF;
        room_versions := array_append(room_versions, ver);
        event_versions := array_append(event_versions, NULL::bigint);
        event_kinds := array_append(event_kinds, NULL::text);
        event_payloads := array_append(event_payloads, NULL::text);
        event_times := array_append(event_times, NULL::timestamptz);
    END LOOP;

    IF ver > version_before THEN
        INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
        SELECT v_id, e.version, 'add', e.payload, e.mutation_id, p_now
          FROM unnest(new_versions, new_payloads, new_ids) AS e(version, payload, mutation_id);
        UPDATE rooms
           SET history = history || added,
               history_length = len,
               version = ver,
               updated_at = p_now
         WHERE id = v_id;
    END IF;
END;
$$;

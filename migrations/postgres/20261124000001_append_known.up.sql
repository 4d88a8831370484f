-- Appends numbers to a room without shipping the whole history back on every
-- call: the hot path of `Store::apply` from this release on.
--
-- `croupier_append` (first migration) returns the room's whole history as text
-- after every group of adds, so a hot room with a long history paid, per group,
-- for turning thousands of numbers into text in here and parsing them again in
-- the instance, although the instance had just been told that very history by
-- its previous call. This function takes what the caller already knows — the
-- room's id, epoch and version after its last call — and sends only what the
-- caller lacks:
--   * nothing, when the room is still at that version (the usual case: one
--     instance appending to a hot room);
--   * the numbers added since, when every event after that version is an add
--     still in the event log (several instances appending to one room);
--   * otherwise the whole history before the call (`history_before`), as the
--     old function did.
-- This is safe because every mutation takes the room's next version in the same
-- transaction (invariant 2), and the epoch changes whenever a version number
-- could be reused for another history (room recreated, database restored): one
-- (id, epoch, version) names exactly one history. The check runs under the row
-- lock, so nothing can change the room between it and the adds.
--
-- It also creates a missing room (with `p_new_epoch`), in the same transaction
-- as the adds, when at least one of them can be applied to an empty room: many
-- writers starting on a new room then cost one commit per group instead of one
-- transaction each, queued on the new row. `room_found` is false only when it
-- did not: no `p_new_epoch`, or every item's limit is 0. The caller then takes
-- the general path, which rejects such adds without creating anything. The
-- insert waits for a concurrent creator to commit (ON CONFLICT), and the next
-- statement, with a fresh snapshot, locks whichever row won.
--
-- Apart from that it decides exactly what `croupier_append` decides, item by
-- item, in the same order (see the comment there): lock, de-duplicate against
-- the event log and the earlier items of the call, enforce the length limit,
-- append with the next version. The group's events are then logged by one
-- INSERT and the history grown by one `||` update. The limit is checked against
-- `history_length`, which every writer keeps equal to the history's length, so
-- the history itself is read only when it has to be returned.
--
-- `croupier_append` stays: instances of the previous release keep calling it
-- while a rolling upgrade replaces them, and both functions lock the same row.
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

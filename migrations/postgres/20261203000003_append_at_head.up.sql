-- One batch of appends in one call, for a writer that knows the room's head
-- (the room task of an instance, right after its previous batch).
--
-- The caller decided the batch on that head: its row id, epoch, version,
-- length and protection. The function locks the row only if the room still
-- stands exactly there (a concurrent writer's lock is waited for and the row
-- checked again once it commits), and only if none of the batch's mutation
-- ids was used since `p_since`; otherwise it changes nothing and returns
-- NULL, and the caller takes the general path, which reads the room under
-- its lock and decides again. Each statement below reads a fresh snapshot,
-- after the lock: a batch queued behind another one on the same row sees
-- that batch's numbers and log rows. The rows come before the head, as the
-- general path writes them, so while the schema is only expanded the
-- trigger rebuilds `rooms.history` from all of them.
--
-- Returns the room's creation time when the batch was committed.
CREATE FUNCTION croupier_append_at(
    p_room        BIGINT,
    p_epoch       TEXT,
    p_version     BIGINT,
    p_length      INTEGER,
    p_protected   BOOLEAN,
    p_ids_used    TEXT[],
    p_since       TIMESTAMPTZ,
    p_now         TIMESTAMPTZ,
    p_numbers     TEXT[],
    p_new_length  INTEGER,
    p_new_version BIGINT,
    p_versions    BIGINT[],
    p_kinds       TEXT[],
    p_payloads    TEXT[],
    p_event_ids   TEXT[]
) RETURNS TIMESTAMPTZ
LANGUAGE plpgsql
AS $$
DECLARE
    created TIMESTAMPTZ;
    base    BIGINT;
BEGIN
    SELECT created_at INTO created
      FROM rooms
     WHERE id = p_room AND epoch = p_epoch AND version = p_version
       AND history_length = p_length AND (password_hash IS NOT NULL) = p_protected
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM room_events
                WHERE room_id = p_room AND mutation_id = ANY (p_ids_used)
                  AND created_at > p_since) THEN
        RETURN NULL;
    END IF;
    SELECT COALESCE(max(seq), 0) INTO base FROM room_numbers WHERE room_id = p_room;
    INSERT INTO room_numbers (room_id, seq, number)
    SELECT p_room, base + u.o, u.n
      FROM unnest(p_numbers) WITH ORDINALITY AS u(n, o);
    INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
    SELECT p_room, e.version, e.kind, e.payload::jsonb, e.mutation_id, p_now
      FROM unnest(p_versions, p_kinds, p_payloads, p_event_ids)
           AS e(version, kind, payload, mutation_id);
    UPDATE rooms
       SET history_length = p_new_length, version = p_new_version, updated_at = p_now
     WHERE id = p_room;
    RETURN created;
END;
$$;

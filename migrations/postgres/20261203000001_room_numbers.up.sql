-- Expand: one row per number, so that an append writes one row instead of
-- rewriting the room's whole history (`rooms.history`, a JSON array).
--
-- `seq` orders a room's numbers, oldest first; it only grows within a room and
-- a removal leaves a gap, so the history is the room's rows in `seq` order and
-- position i is the i-th of them. A number is stored as the text clients see:
-- '0'..'36' or '00'. `rooms.history_length` stays the history's length and
-- `rooms.version` its version, under the room's row lock as before.
--
-- This release reads and writes only `room_numbers`. The previous release reads
-- `rooms.history` and writes it (its general transaction, `croupier_append`,
-- `croupier_append_known`), and both run side by side during a rolling
-- upgrade, so until the contract migration (`..._contract_room_history`)
-- drops the column a trigger keeps the two in step, under the row lock the
-- writer already holds:
--   * an UPDATE that changes `history` (the previous release) makes the rows
--     follow it: the new tail is inserted when the old history is a prefix of
--     the new one (an append), otherwise the rows are rewritten;
--   * an UPDATE that changes `version` but not `history` (this release, which
--     changes the rows first and the room's head afterwards) rebuilds
--     `history` from the rows.
-- So while the trigger exists this release's writes still cost O(history) in
-- the database; after the contract migration they are O(1) in it.
--
-- Everything below runs in one transaction: creating the trigger waits for
-- writers in progress and holds theirs back until the copy is committed, so no
-- write falls between the copy and the trigger.
CREATE TABLE room_numbers (
    room_id BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq     BIGINT NOT NULL,
    number  TEXT   NOT NULL CHECK (number ~ '^(00|[0-9]|[12][0-9]|3[0-6])$'),
    PRIMARY KEY (room_id, seq)
);

-- A stored number as the JSON value of `rooms.history`.
CREATE FUNCTION croupier_number_json(n TEXT) RETURNS JSONB
LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT CASE WHEN n = '00' THEN to_jsonb(n) ELSE to_jsonb(n::integer) END $$;

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

INSERT INTO room_numbers (room_id, seq, number)
SELECT r.id, e.o, e.v #>> '{}'
  FROM rooms r, jsonb_array_elements(r.history) WITH ORDINALITY AS e(v, o);

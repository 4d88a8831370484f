-- One row per number, so an append writes one row instead of rewriting the
-- whole history. `seq` orders a room's numbers (oldest first); it only grows
-- within a room, and a removal leaves a gap, so the history is the room's rows
-- in `seq` order and position i is the i-th of them. A number is stored as
-- the text clients see: '0'..'36' or '00'.
--
-- The embedded database has exactly one instance, which migrates it at start,
-- so there is no mixed fleet to keep working: the history column goes in the
-- same step.
CREATE TABLE room_numbers (
    room_id INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    number  TEXT    NOT NULL CHECK (
        number = '00' OR (number GLOB '[0-9]' OR number GLOB '[1-2][0-9]' OR number GLOB '3[0-6]')
    ),
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;

INSERT INTO room_numbers (room_id, seq, number)
SELECT r.id, j.key + 1, CAST(j.value AS TEXT)
  FROM rooms r, json_each(r.history) j;

ALTER TABLE rooms DROP COLUMN history;

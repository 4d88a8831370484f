-- Back to one JSON array per room.
ALTER TABLE rooms ADD COLUMN history TEXT NOT NULL DEFAULT '[]';

UPDATE rooms SET history = COALESCE((
    SELECT json_group_array(
               CASE WHEN n.number = '00' THEN n.number ELSE CAST(n.number AS INTEGER) END
               ORDER BY n.seq)
      FROM room_numbers n
     WHERE n.room_id = rooms.id
), '[]');

DROP TABLE room_numbers;

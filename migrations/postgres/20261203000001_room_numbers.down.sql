-- `rooms.history` was kept in step until now, so the previous release finds
-- every room as this release left it.
DROP TRIGGER rooms_history_sync ON rooms;
DROP FUNCTION croupier_history_sync();
DROP FUNCTION croupier_number_json(TEXT);
DROP TABLE room_numbers;

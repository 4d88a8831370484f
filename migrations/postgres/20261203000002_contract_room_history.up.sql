-- Contract: drops what only the previous release used — `rooms.history`, the
-- trigger that kept it in step with `room_numbers`, and the append functions.
-- Apply it (`croupier migrate --contract`) only once no instance of the
-- previous release runs any more: they read and write `rooms.history`.
-- Dropping a column only marks it dropped, so this is quick on any table.
DROP TRIGGER rooms_history_sync ON rooms;
DROP FUNCTION croupier_history_sync();
DROP FUNCTION croupier_number_json(TEXT);
DROP FUNCTION croupier_append_known(TEXT, JSONB, TEXT[], BIGINT[], TIMESTAMPTZ, TIMESTAMPTZ, BIGINT, TEXT, BIGINT, TEXT);
DROP FUNCTION croupier_append(TEXT, JSONB, TEXT[], BIGINT[], TIMESTAMPTZ, TIMESTAMPTZ);
ALTER TABLE rooms DROP COLUMN history;

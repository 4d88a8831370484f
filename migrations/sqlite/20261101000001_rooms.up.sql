-- Rooms: one shared roulette table each. The history is kept as a JSON array
-- beside its length so listings never have to parse it.
CREATE TABLE rooms (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    key            TEXT    NOT NULL UNIQUE,
    history        TEXT    NOT NULL DEFAULT '[]',
    history_length INTEGER NOT NULL DEFAULT 0,
    version        INTEGER NOT NULL DEFAULT 0,
    epoch          TEXT    NOT NULL,
    password_hash  TEXT,
    created_at     TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL
);

CREATE INDEX rooms_by_activity ON rooms (updated_at DESC, id DESC);

-- Event log: every committed mutation with the version it produced. Used to replay
-- missed events to reconnecting members and to de-duplicate client retries.
CREATE TABLE room_events (
    room_id     INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    mutation_id TEXT,
    created_at  TEXT    NOT NULL,
    PRIMARY KEY (room_id, version)
);

CREATE INDEX room_events_by_mutation ON room_events (room_id, mutation_id)
    WHERE mutation_id IS NOT NULL;

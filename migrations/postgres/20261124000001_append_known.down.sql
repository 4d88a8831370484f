-- Leaves croupier_append, which the previous release calls, in place.
DROP FUNCTION croupier_append_known(TEXT, JSONB, TEXT[], BIGINT[], TIMESTAMPTZ, TIMESTAMPTZ, BIGINT, TEXT, BIGINT, TEXT);

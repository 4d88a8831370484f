-- This release then commits every batch through its general path.
DROP FUNCTION croupier_append_at(BIGINT, TEXT, BIGINT, INTEGER, BOOLEAN, TEXT[], TIMESTAMPTZ,
                                 TIMESTAMPTZ, TEXT[], INTEGER, BIGINT, BIGINT[], TEXT[],
                                 TEXT[], TEXT[]);

-- Every write to a layer's table bumps the layer's data_version in the same transaction,
-- so a tile cache keyed by (layer, data_version) is exact without TTLs or purges.
CREATE OR REPLACE FUNCTION twin_bump_data_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE layers
       SET data_version = data_version + 1, updated_at = now()
     WHERE source_table = TG_TABLE_NAME;
    RETURN NULL;
END
$$;

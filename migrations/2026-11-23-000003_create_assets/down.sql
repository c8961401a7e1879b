DROP TABLE object_gc;
DROP TABLE assets;
DROP FUNCTION assets_collect_bytes();
DROP TYPE asset_state;

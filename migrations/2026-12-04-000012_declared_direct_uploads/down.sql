ALTER TABLE direct_uploads
    DROP CONSTRAINT direct_uploads_declared_whole,
    DROP COLUMN multipart_id,
    DROP COLUMN part_sha256,
    DROP COLUMN part_size_bytes,
    DROP COLUMN size_bytes,
    DROP COLUMN sha256;

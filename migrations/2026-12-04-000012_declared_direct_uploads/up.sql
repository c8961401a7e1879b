-- Direct uploads whose client declared the size and SHA-256 up front (StartUpload): the
-- store enforces the checksum the URLs are signed for, and the client finalizes the upload
-- (FinalizeUpload checks the object with a HEAD). Rows without `sha256` are the older
-- presigned PUTs that the verifier copies and hashes.
ALTER TABLE direct_uploads
    ADD COLUMN sha256          text,
    ADD COLUMN size_bytes      bigint CHECK (size_bytes >= 0),
    -- Multipart: the declared size of every part but the last, and each part's SHA-256.
    ADD COLUMN part_size_bytes bigint CHECK (part_size_bytes > 0),
    ADD COLUMN part_sha256     text[] NOT NULL DEFAULT '{}',
    -- The store's id of the multipart upload.
    ADD COLUMN multipart_id    text,
    ADD CONSTRAINT direct_uploads_declared_whole CHECK ((sha256 IS NULL) = (size_bytes IS NULL));

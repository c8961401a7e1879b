-- Uploads straight to S3-compatible storage through presigned PUT URLs. The bytes land
-- at `upload_key` without passing through mediaplane; a verifier on every instance
-- notices the object, copies it to a key that only the server writes, hashes and
-- sniffs the copy and makes the asset READY. Whatever is left at `upload_key` is
-- removed through object_gc once the URL has expired.
CREATE TABLE direct_uploads (
    upload_key  text        PRIMARY KEY,
    asset_id    uuid        NOT NULL REFERENCES assets (id) ON DELETE CASCADE,
    expire_time timestamptz NOT NULL,
    -- Next look for the object; pushed back while a verifier works on it.
    check_after timestamptz NOT NULL DEFAULT now(),
    checks      integer     NOT NULL DEFAULT 0
);
CREATE INDEX direct_uploads_due_idx ON direct_uploads (check_after);
CREATE INDEX direct_uploads_asset_idx ON direct_uploads (asset_id);

-- Keeps update_time and revision (the etag source) right on every UPDATE, whichever
-- code path issues it. Later tables reuse it.
CREATE FUNCTION mediaplane_touch_row() RETURNS trigger AS $$
BEGIN
    NEW.update_time := now();
    NEW.revision := OLD.revision + 1;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TABLE projects (
    id           uuid        PRIMARY KEY,
    owner        text        NOT NULL,
    display_name text        NOT NULL CHECK (char_length(display_name) BETWEEN 1 AND 200),
    description  text        NOT NULL DEFAULT '',
    labels       jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(labels) = 'object'),
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    revision     bigint      NOT NULL DEFAULT 1,
    -- AIP-155 idempotency: NULLs are distinct, so only keyed creates collide.
    request_id   text,
    request_hash bytea,
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projects_owner_request_id_key UNIQUE (owner, request_id)
);

-- Keyset pagination per owner and (for admins) over everything, in both directions.
CREATE INDEX projects_owner_create_time_idx ON projects (owner, create_time, id);
CREATE INDEX projects_create_time_idx ON projects (create_time, id);
-- Label filters (`labels @> '{"k":"v"}'`, `labels ? 'k'`).
CREATE INDEX projects_labels_idx ON projects USING gin (labels);

CREATE TRIGGER projects_touch BEFORE UPDATE ON projects
    FOR EACH ROW EXECUTE FUNCTION mediaplane_touch_row();

CREATE TYPE job_state AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled');

CREATE TABLE jobs (
    id                uuid        PRIMARY KEY,
    project_id        uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    -- Denormalized from the project: every client query is scoped by owner.
    owner             text        NOT NULL,
    kind              text        NOT NULL,
    input             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    labels            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    state             job_state   NOT NULL DEFAULT 'queued',
    priority          integer     NOT NULL DEFAULT 0,
    max_attempts      integer     NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    attempt           integer     NOT NULL DEFAULT 0,
    schedule_time     timestamptz NOT NULL DEFAULT now(),
    progress_percent  integer     NOT NULL DEFAULT 0 CHECK (progress_percent BETWEEN 0 AND 100),
    current_step      text        NOT NULL DEFAULT '',
    message           text        NOT NULL DEFAULT '',
    cancel_requested  boolean     NOT NULL DEFAULT false,
    worker_id         text,
    lease_id          uuid,
    lease_duration_ms bigint,
    lease_expire_time timestamptz,
    result            jsonb,
    output_assets     text[]      NOT NULL DEFAULT '{}',
    -- google.rpc.Status as {"code": int, "message": text}.
    error             jsonb,
    -- Bumped by the trigger below with every change, so no code path can forget it;
    -- orders job_events.
    sequence          bigint      NOT NULL DEFAULT 1,
    request_id        text,
    request_hash      bytea,
    create_time       timestamptz NOT NULL DEFAULT now(),
    start_time        timestamptz,
    end_time          timestamptz,
    update_time       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT jobs_owner_request_id_key UNIQUE (owner, request_id),
    CONSTRAINT jobs_running_has_lease CHECK (state <> 'running' OR (lease_id IS NOT NULL AND lease_expire_time IS NOT NULL))
);

-- The fetch query: queued jobs of some kinds, by priority, schedule_time, creation.
CREATE INDEX jobs_fetch_idx ON jobs (kind, priority DESC, schedule_time, create_time) WHERE state = 'queued';
-- The reaper: running jobs by lease expiry.
CREATE INDEX jobs_lease_idx ON jobs (lease_expire_time) WHERE state = 'running';
-- Listing a project's jobs (keyset on create_time, id) and filtering by state.
CREATE INDEX jobs_project_idx ON jobs (project_id, create_time, id);
CREATE INDEX jobs_project_state_idx ON jobs (project_id, state, create_time, id);
-- Retention: finished jobs by end time.
CREATE INDEX jobs_finished_idx ON jobs (end_time) WHERE state IN ('succeeded', 'failed', 'cancelled');

CREATE FUNCTION jobs_touch_row() RETURNS trigger AS $$
BEGIN
    NEW.update_time := now();
    NEW.sequence := OLD.sequence + 1;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_touch BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_touch_row();

-- Every change to a job, for watchers that resume (`after_sequence`) or catch up after a gap.
CREATE TABLE job_events (
    job_id     uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sequence   bigint      NOT NULL,
    project_id uuid        NOT NULL,
    -- The encoded mediaplane.v1.JobEvent, exactly as it was published.
    payload    bytea       NOT NULL,
    event_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, sequence)
);
CREATE INDEX job_events_time_idx ON job_events (event_time);

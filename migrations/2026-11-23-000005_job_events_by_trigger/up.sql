-- Job events are written by the database in the statement that changes the job, so
-- a change and its event need no second round trip, and no code path can change a
-- job without recording it. An event keeps the job's changing columns (`snapshot`);
-- what never changes after creation (input, labels, ...) is read from the job when
-- events are replayed, so a large input is not copied into every progress event.
--
-- Stored events encoded the old way cannot be converted here; events only serve
-- watchers that resume, who get a fresh snapshot when the events they missed are gone.
TRUNCATE job_events;
ALTER TABLE job_events
    DROP COLUMN payload,
    -- mediaplane.v1.JobEvent.Type: CREATED = 2, STATE_CHANGED = 3, PROGRESS = 4,
    -- CANCEL_REQUESTED = 5.
    ADD COLUMN type smallint NOT NULL CHECK (type BETWEEN 2 AND 5),
    ADD COLUMN snapshot jsonb NOT NULL;

-- The columns a job's events can differ in (STABLE: timestamps render in the
-- session's time zone).
CREATE FUNCTION jobs_event_snapshot(j jobs) RETURNS jsonb AS $$
    SELECT to_jsonb(j) - '{id,project_id,owner,kind,input,labels,request_id,request_hash,create_time}'::text[]
$$ LANGUAGE sql STABLE;

CREATE FUNCTION jobs_record_created() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_events (job_id, sequence, project_id, type, snapshot, event_time)
    SELECT n.id, n.sequence, n.project_id, 2, jobs_event_snapshot(n), n.update_time
    FROM new_rows n;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- The type of an update's event: a new state, else a cancel request, else progress
-- (progress, step, message or lease expiry).
CREATE FUNCTION jobs_record_changed() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_events (job_id, sequence, project_id, type, snapshot, event_time)
    SELECT n.id, n.sequence, n.project_id,
           CASE WHEN n.state <> o.state THEN 3
                WHEN n.cancel_requested AND NOT o.cancel_requested THEN 5
                ELSE 4 END,
           jobs_event_snapshot(n), n.update_time
    FROM new_rows n JOIN old_rows o ON o.id = n.id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- Statement triggers: one INSERT per statement, however many jobs it changed.
CREATE TRIGGER jobs_created AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_record_created();
CREATE TRIGGER jobs_changed AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_record_changed();

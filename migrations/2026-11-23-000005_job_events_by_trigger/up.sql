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

-- The type of the job's latest event, set by the row trigger that bumps `sequence`
-- (it sees OLD and NEW, so the statement trigger below needs no old rows): a new
-- state, else a cancel request, else progress (progress, step, message, lease).
ALTER TABLE jobs ADD COLUMN last_event smallint NOT NULL DEFAULT 2;

CREATE OR REPLACE FUNCTION jobs_touch_row() RETURNS trigger AS $$
BEGIN
    NEW.update_time := now();
    NEW.sequence := OLD.sequence + 1;
    NEW.last_event := CASE WHEN NEW.state <> OLD.state THEN 3
                           WHEN NEW.cancel_requested AND NOT OLD.cancel_requested THEN 5
                           ELSE 4 END;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

-- The columns a job's events can differ in, named one by one: `input` (up to 256 KiB)
-- and the other columns fixed at creation are never rendered for an event. STABLE:
-- timestamps render in the session's time zone.
CREATE FUNCTION jobs_event_snapshot(j jobs) RETURNS jsonb AS $$
    SELECT jsonb_build_object(
        'state', j.state, 'max_attempts', j.max_attempts, 'attempt', j.attempt,
        'schedule_time', j.schedule_time, 'progress_percent', j.progress_percent,
        'current_step', j.current_step, 'message', j.message,
        'cancel_requested', j.cancel_requested, 'worker_id', j.worker_id,
        'lease_id', j.lease_id, 'lease_duration_ms', j.lease_duration_ms,
        'lease_expire_time', j.lease_expire_time, 'result', j.result,
        'output_assets', j.output_assets, 'error', j.error, 'sequence', j.sequence,
        'start_time', j.start_time, 'end_time', j.end_time, 'update_time', j.update_time)
$$ LANGUAGE sql STABLE;

CREATE FUNCTION jobs_record_events() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_events (job_id, sequence, project_id, type, snapshot, event_time)
    SELECT n.id, n.sequence, n.project_id, n.last_event, jobs_event_snapshot(n), n.update_time
    FROM new_rows n;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- Statement triggers: one INSERT per statement, however many jobs it changed.
CREATE TRIGGER jobs_created AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_record_events();
CREATE TRIGGER jobs_changed AFTER UPDATE ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_record_events();

DROP TRIGGER jobs_changed ON jobs;
DROP TRIGGER jobs_created ON jobs;
DROP FUNCTION jobs_record_changed();
DROP FUNCTION jobs_record_created();
DROP FUNCTION jobs_event_snapshot(jobs);
-- Snapshots cannot be encoded here; events are for resuming watchers only.
TRUNCATE job_events;
ALTER TABLE job_events
    DROP COLUMN snapshot,
    DROP COLUMN type,
    ADD COLUMN payload bytea NOT NULL;

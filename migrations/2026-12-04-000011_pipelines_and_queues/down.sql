DROP TABLE queues;
CREATE OR REPLACE FUNCTION jobs_record_events() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_events (job_id, sequence, project_id, type, snapshot, event_time)
    SELECT n.id, n.sequence, n.project_id, n.last_event, jobs_event_snapshot(n), n.update_time
    FROM new_rows n;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
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
DROP TRIGGER jobs_fair ON jobs;
DROP FUNCTION jobs_fair_turn();
DROP FUNCTION jobs_next_turn(text, integer, text);
DROP INDEX jobs_fair_idx;
DROP INDEX jobs_fetch_idx;
CREATE INDEX jobs_fetch_idx ON jobs (kind, priority DESC, schedule_time, create_time) WHERE state = 'queued';
DROP INDEX jobs_waiting_idx;
DROP INDEX jobs_cancelled_by_idx;
DROP INDEX jobs_dependents_idx;
UPDATE jobs SET state = 'cancelled', end_time = now() WHERE state = 'waiting';
ALTER TABLE jobs
    DROP COLUMN depends_on, DROP COLUMN run_anyway, DROP COLUMN has_dependents,
    DROP COLUMN cancelled_by, DROP COLUMN concurrency_key, DROP COLUMN fair_seq;

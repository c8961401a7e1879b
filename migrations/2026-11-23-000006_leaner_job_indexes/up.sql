-- Every index entry a job write adds is WAL that its commit must flush, and flushing
-- WAL is what bounds job throughput (measured: most of a loaded Postgres's waits).
-- Most jobs have no request_id: they need no entry in its unique index.
ALTER TABLE jobs DROP CONSTRAINT jobs_owner_request_id_key;
CREATE UNIQUE INDEX jobs_owner_request_id_key ON jobs (owner, request_id)
    WHERE request_id IS NOT NULL;
-- Events are written in time order and only pruned by time: a BRIN index (a summary
-- per block range, rarely updated) serves that instead of a B-tree entry per event.
DROP INDEX job_events_time_idx;
CREATE INDEX job_events_time_idx ON job_events USING brin (event_time);
-- A lease exists exactly while a job runs, so a lease check needs only the lease id
-- and finds the job by primary key (a predicate on state would steer the planner to
-- the partial index of all running jobs).
ALTER TABLE jobs ADD CONSTRAINT jobs_lease_only_while_running
    CHECK ((state = 'running') = (lease_id IS NOT NULL));
-- Progress reports change no indexed column, so they can be HOT updates (no index
-- entries, a fraction of the WAL) when the page has room: the reaper's index no longer
-- keys on the lease expiry, which every report moves (the reaper reads the running
-- jobs, a set bounded by the worker fleet), and pages keep a fifth free.
DROP INDEX jobs_lease_idx;
CREATE INDEX jobs_running_idx ON jobs (id) WHERE state = 'running';
ALTER TABLE jobs SET (fillfactor = 80);
-- Events are written by the jobs triggers from the job row itself, so a foreign key
-- on them checks nothing new, at the price of a query (and a lock on the job) per
-- event. A job's events go with it through a statement trigger instead of the
-- key's cascade (pruning, a project's deletion).
ALTER TABLE job_events DROP CONSTRAINT job_events_job_id_fkey;
CREATE FUNCTION jobs_forget_events() RETURNS trigger AS $$
BEGIN
    DELETE FROM job_events WHERE job_id IN (SELECT id FROM old_rows);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_forget_events();

DROP TRIGGER jobs_deleted ON jobs;
DROP FUNCTION jobs_forget_events();
DELETE FROM job_events e WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = e.job_id);
ALTER TABLE job_events ADD CONSTRAINT job_events_job_id_fkey
    FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE CASCADE;
ALTER TABLE jobs RESET (fillfactor);
DROP INDEX jobs_running_idx;
CREATE INDEX jobs_lease_idx ON jobs (lease_expire_time) WHERE state = 'running';
ALTER TABLE jobs DROP CONSTRAINT jobs_lease_only_while_running;
DROP INDEX job_events_time_idx;
CREATE INDEX job_events_time_idx ON job_events (event_time);
DROP INDEX jobs_owner_request_id_key;
ALTER TABLE jobs ADD CONSTRAINT jobs_owner_request_id_key UNIQUE (owner, request_id);

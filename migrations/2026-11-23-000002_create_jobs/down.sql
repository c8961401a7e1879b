DROP TABLE job_events;
DROP TABLE jobs;
DROP FUNCTION jobs_touch_row();
DROP TYPE job_state;

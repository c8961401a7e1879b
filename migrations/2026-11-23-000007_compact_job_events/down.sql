ALTER TABLE job_events ALTER COLUMN snapshot TYPE jsonb USING to_jsonb(snapshot);

DROP FUNCTION jobs_event_snapshot(jobs);
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

DROP TYPE job_snapshot;

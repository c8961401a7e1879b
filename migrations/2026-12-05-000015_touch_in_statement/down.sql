DROP TRIGGER jobs_touch ON jobs;
CREATE TRIGGER jobs_touch BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_touch_row();

CREATE OR REPLACE FUNCTION jobs_lease(p_kinds text[], p_total bigint, p_workers text[],
                           p_lease_ms bigint[], p_firsts bigint[])
RETURNS TABLE (
    id uuid, project_id uuid, owner text, kind text, input jsonb, labels jsonb,
    state job_state, priority integer, max_attempts integer, attempt integer,
    schedule_time timestamptz, progress_percent integer, current_step text,
    message text, cancel_requested boolean, worker_id text, lease_id uuid,
    lease_expire_time timestamptz, result jsonb, output_assets text[], error jsonb,
    sequence bigint, create_time timestamptz, start_time timestamptz,
    end_time timestamptz, update_time timestamptz, traceparent text, depends_on uuid[],
    run_anyway boolean, has_dependents boolean, concurrency_key text, taker bigint
) AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH due AS (
        SELECT f.tid, row_number() OVER
            (ORDER BY f.priority DESC, f.fair_seq, f.schedule_time, f.create_time) AS n
        FROM (
            SELECT q.* FROM unnest(p_kinds) AS k(kind) CROSS JOIN LATERAL (
                SELECT j.ctid AS tid, j.priority, j.fair_seq, j.schedule_time, j.create_time
                FROM jobs j
                WHERE j.state = 'queued' AND j.kind = k.kind AND j.schedule_time <= now()
                  AND NOT EXISTS (SELECT 1 FROM queues qu
                                  WHERE qu.kind = k.kind AND qu.restricted)
                ORDER BY j.priority DESC, j.fair_seq, j.schedule_time, j.create_time
                LIMIT p_total
                FOR UPDATE SKIP LOCKED) q
            ORDER BY q.priority DESC, q.fair_seq, q.schedule_time, q.create_time
            LIMIT p_total) f),
    assigned AS (SELECT d.tid, width_bucket(d.n, p_firsts) AS t FROM due d)
    UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1,
        worker_id = p_workers[a.t], lease_id = gen_random_uuid(),
        lease_duration_ms = p_lease_ms[a.t],
        lease_expire_time = now() + p_lease_ms[a.t] * interval '1 millisecond',
        start_time = COALESCE(jobs.start_time, now()),
        progress_percent = 0, current_step = '', message = ''
    FROM assigned a WHERE jobs.ctid = a.tid AND jobs.state = 'queued'
    RETURNING
        jobs.id, jobs.project_id, jobs.owner, jobs.kind, jobs.input, jobs.labels,
        jobs.state, jobs.priority, jobs.max_attempts, jobs.attempt, jobs.schedule_time,
        jobs.progress_percent, jobs.current_step, jobs.message, jobs.cancel_requested,
        jobs.worker_id, jobs.lease_id, jobs.lease_expire_time, jobs.result,
        jobs.output_assets, jobs.error, jobs.sequence, jobs.create_time,
        jobs.start_time, jobs.end_time, jobs.update_time, jobs.traceparent,
        jobs.depends_on, jobs.run_anyway, jobs.has_dependents, jobs.concurrency_key,
        a.t::bigint;
END;
$$ LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan;

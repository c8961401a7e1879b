-- Leasing as a function whose statement keeps one generic plan per connection.
--
-- As a prepared statement, the lease was planned again on every call: Postgres compares
-- a generic plan's cost with its custom plans' and always chose custom, because the
-- generic estimate counts ten rows for `unnest` of the kinds and a tenth of the queue
-- for `LIMIT $n`. Measured with pg_stat_statements over 30,000 plain jobs end to end:
-- about 1,100 lease statements, every one planned, ~370 µs of planning each (a third
-- of the statement's time). The plan is the same whatever the arguments (one index scan
-- per kind in the fetch index's order, then a TID scan), including a plan made on an
-- empty table, so `force_generic_plan` plans it once per connection (and again after
-- the table's statistics change). It returns the columns the engine reads of a job
-- (`JobRow`) and the taker: returning the `jobs` row as one composite value cost more
-- than the planning saved (each column read back out of it deforms it again).
--
-- The statement: the best due jobs of `p_kinds`, the first `p_firsts[2] - 1` to the
-- first taker, the next ones to the second, and so on, each with its taker's worker id
-- and lease. `state = 'queued'` is a literal so the plan can use the partial fetch
-- index. Each kind is read in the fetch index's order (one index scan per kind:
-- `kind = ANY(..)` cannot use the index order and sorts the whole queue), locked FOR
-- UPDATE SKIP LOCKED so concurrent statements skip each other's rows instead of waiting
-- or double-leasing. Kinds whose queue restricts leasing (paused, limits, a start rate)
-- are leased under their queue's lock instead (the engine's limited path). The locked
-- rows are updated by their tuple ids (by `id`, a generic plan made on a fresh table
-- scans the whole table on every call); the row locks keep those tuples in place until
-- the statement ends. Job number `n` (in fetch order) goes to the taker whose range of
-- numbers holds it, found by binary search over the ranges' first numbers
-- (`width_bucket`): a join with the takers cost jobs times takers.
CREATE FUNCTION jobs_lease(p_kinds text[], p_total bigint, p_workers text[],
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

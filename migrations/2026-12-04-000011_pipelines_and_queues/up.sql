-- Pipelines: a job may depend on jobs of its project. It is WAITING until every one of
-- them SUCCEEDED (or, with `run_anyway`, ended), and is CANCELLED when one of them
-- fails or is cancelled. Releases and cascades happen in the transaction that ends the
-- dependency (the engine does them where it ends jobs).
ALTER TABLE jobs
    ADD COLUMN depends_on      uuid[]  NOT NULL DEFAULT '{}',
    ADD COLUMN run_anyway      boolean NOT NULL DEFAULT false,
    -- Set on a job once another depends on it while it is unfinished: its end must
    -- settle dependents, so it skips the one-statement completion path.
    ADD COLUMN has_dependents  boolean NOT NULL DEFAULT false,
    -- The dependency whose failure cancelled this job; retrying that dependency puts
    -- this job back to WAITING.
    ADD COLUMN cancelled_by    uuid,
    -- Fair queues: jobs of one kind and priority are leased in turn across keys.
    ADD COLUMN concurrency_key text    NOT NULL DEFAULT '',
    -- A job's turn in its kind and priority (`jobs_next_turn`, below): set by the insert
    -- itself, or by the trigger below when an insert leaves it at -1.
    ADD COLUMN fair_seq        bigint  NOT NULL DEFAULT -1;

-- Dependents of a job (`depends_on && ARRAY[id]`); most jobs depend on nothing.
CREATE INDEX jobs_dependents_idx ON jobs USING gin (depends_on) WHERE cardinality(depends_on) > 0;
CREATE INDEX jobs_cancelled_by_idx ON jobs (cancelled_by) WHERE cancelled_by IS NOT NULL;
-- Counts of waiting jobs per kind (queue figures). Running jobs are counted through
-- the index of running jobs: they are as many as the fleet's slots, and one more index
-- entry per lease is WAL on every job's path.
CREATE INDEX jobs_waiting_idx ON jobs (kind) WHERE state = 'waiting';

-- The fetch order: priority, then turns across concurrency keys, then due time.
DROP INDEX jobs_fetch_idx;
CREATE INDEX jobs_fetch_idx ON jobs (kind, priority DESC, fair_seq, schedule_time, create_time)
    WHERE state = 'queued';
-- A key's last queued job in its kind and priority (where its next job's turn starts).
-- Jobs without a key find theirs through the fetch index (below), so a deployment that
-- uses no keys writes no entries here.
CREATE INDEX jobs_fair_idx ON jobs (kind, priority, concurrency_key, fair_seq)
    WHERE state = 'queued' AND concurrency_key <> '';

-- Start-time fair queuing: a new job's turn is one after its key's last queued job of
-- the same kind and priority, and never before the head of that queue. A key with
-- 10,000 queued jobs holds turns 1..10,000; a key with one job gets the head's turn, so
-- it is leased next instead of after the 10,000. Jobs without a key share the key ''.
-- A job released from WAITING takes a new turn.
-- PL/pgSQL, not SQL: a SQL function called from a statement is planned on every call
-- (measured: about 1 ms), where PL/pgSQL keeps its plans for the session.
CREATE FUNCTION jobs_next_turn(k text, p integer, ck text) RETURNS bigint AS $$
DECLARE
    head bigint;
    last bigint;
BEGIN
    SELECT j.fair_seq INTO head FROM jobs j
    WHERE j.state = 'queued' AND j.kind = k AND j.priority = p
    ORDER BY j.fair_seq LIMIT 1;
    IF ck = '' THEN
        -- The fetch index read backwards, at most 1,000 entries: past that many keyed
        -- jobs, a job without a key takes the head's turn.
        SELECT t.fair_seq + 1 INTO last FROM (
            SELECT j.fair_seq, j.concurrency_key FROM jobs j
            WHERE j.state = 'queued' AND j.kind = k AND j.priority = p
            ORDER BY j.fair_seq DESC LIMIT 1000) t
        WHERE t.concurrency_key = '' LIMIT 1;
    ELSE
        SELECT j.fair_seq + 1 INTO last FROM jobs j
        WHERE j.state = 'queued' AND j.kind = k AND j.priority = p
          AND j.concurrency_key = ck AND j.concurrency_key <> ''
        ORDER BY j.fair_seq DESC LIMIT 1;
    END IF;
    RETURN GREATEST(COALESCE(head, 0), COALESCE(last, 0));
END;
$$ LANGUAGE plpgsql;

CREATE FUNCTION jobs_fair_turn() RETURNS trigger AS $$
BEGIN
    NEW.fair_seq := jobs_next_turn(NEW.kind, NEW.priority, NEW.concurrency_key);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

-- The engine's inserts give each job its turn, computed once per kind, priority and key
-- of a statement (a row trigger doubled an insert's cost); this covers any other.
CREATE TRIGGER jobs_fair BEFORE INSERT ON jobs
    FOR EACH ROW WHEN (NEW.fair_seq < 0) EXECUTE FUNCTION jobs_fair_turn();

-- Marking a job as having dependents changes nothing a watcher sees: no new sequence
-- and no event (`last_event` 0 tells the statement trigger to skip the row).
CREATE OR REPLACE FUNCTION jobs_touch_row() RETURNS trigger AS $$
BEGIN
    IF NEW.has_dependents AND NOT OLD.has_dependents AND NEW.state = OLD.state
       AND NEW.sequence = OLD.sequence THEN
        NEW.last_event := 0;
        RETURN NEW;
    END IF;
    NEW.update_time := now();
    NEW.sequence := OLD.sequence + 1;
    NEW.last_event := CASE WHEN NEW.state <> OLD.state THEN 3
                           WHEN NEW.cancel_requested AND NOT OLD.cancel_requested THEN 5
                           ELSE 4 END;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION jobs_record_events() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_events (job_id, sequence, project_id, type, snapshot, event_time)
    SELECT n.id, n.sequence, n.project_id, n.last_event, jobs_event_snapshot(n), n.update_time
    FROM new_rows n WHERE n.last_event <> 0;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- What operators set per job kind. A kind without a row (or whose row restricts
-- nothing) is leased by the plain statement; the others under their row's lock.
CREATE TABLE queues (
    kind                text        PRIMARY KEY,
    paused              boolean     NOT NULL DEFAULT false,
    max_running         integer     CHECK (max_running > 0),
    max_running_per_key integer     CHECK (max_running_per_key > 0),
    -- At most `rate_jobs` starts in any `rate_interval_ms`: the start times within the
    -- last interval are kept (a sliding log, at most `rate_jobs` long).
    rate_jobs           integer     CHECK (rate_jobs BETWEEN 1 AND 10000),
    rate_interval_ms    bigint      CHECK (rate_interval_ms > 0),
    rate_starts         timestamptz[] NOT NULL DEFAULT '{}',
    restricted          boolean     GENERATED ALWAYS AS (
        paused OR max_running IS NOT NULL OR max_running_per_key IS NOT NULL
        OR rate_jobs IS NOT NULL) STORED,
    revision            bigint      NOT NULL DEFAULT 1,
    create_time         timestamptz NOT NULL DEFAULT now(),
    update_time         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queues_rate_whole CHECK ((rate_jobs IS NULL) = (rate_interval_ms IS NULL))
);

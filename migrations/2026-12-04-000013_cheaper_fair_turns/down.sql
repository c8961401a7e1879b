CREATE OR REPLACE FUNCTION jobs_next_turn(k text, p integer, ck text) RETURNS bigint AS $$
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

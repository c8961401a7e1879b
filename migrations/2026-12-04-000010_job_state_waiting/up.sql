-- A job whose dependencies have not all succeeded yet. Alone in its migration: a new
-- enum value cannot be used in the transaction that adds it.
ALTER TYPE job_state ADD VALUE IF NOT EXISTS 'waiting' BEFORE 'queued';

-- Postgres cannot drop one value of an enum; the next migration's down leaves no job
-- WAITING, and the jobs migration's down drops the type.
SELECT 1;

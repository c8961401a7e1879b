DROP FUNCTION jobs_lease(text[], bigint, text[], bigint[], bigint[]);

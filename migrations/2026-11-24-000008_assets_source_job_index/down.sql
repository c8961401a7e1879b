DROP INDEX assets_source_job_idx;

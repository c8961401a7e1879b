-- The W3C traceparent of the call that created the job, handed to its workers.
ALTER TABLE jobs ADD COLUMN traceparent text;

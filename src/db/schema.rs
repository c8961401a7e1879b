// @generated automatically by Diesel CLI.

pub mod sql_types {
    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "asset_state"))]
    pub struct AssetState;

    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "job_snapshot"))]
    pub struct JobSnapshot;

    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "job_state"))]
    pub struct JobState;
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::AssetState;

    assets (id) {
        id -> Uuid,
        project_id -> Uuid,
        owner -> Text,
        display_name -> Text,
        content_type -> Text,
        size_bytes -> Int8,
        sha256 -> Text,
        state -> AssetState,
        labels -> Jsonb,
        metadata -> Jsonb,
        source_job -> Nullable<Uuid>,
        object_key -> Nullable<Text>,
        revision -> Int8,
        request_id -> Nullable<Text>,
        request_hash -> Nullable<Bytea>,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
    }
}

diesel::table! {
    direct_uploads (upload_key) {
        upload_key -> Text,
        asset_id -> Uuid,
        expire_time -> Timestamptz,
        check_after -> Timestamptz,
        checks -> Int4,
        sha256 -> Nullable<Text>,
        size_bytes -> Nullable<Int8>,
        part_size_bytes -> Nullable<Int8>,
        part_sha256 -> Array<Nullable<Text>>,
        multipart_id -> Nullable<Text>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::JobSnapshot;

    job_events (job_id, sequence) {
        job_id -> Uuid,
        sequence -> Int8,
        project_id -> Uuid,
        event_time -> Timestamptz,
        #[sql_name = "type"]
        type_ -> Int2,
        snapshot -> JobSnapshot,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::JobState;

    jobs (id) {
        id -> Uuid,
        project_id -> Uuid,
        owner -> Text,
        kind -> Text,
        input -> Jsonb,
        labels -> Jsonb,
        state -> JobState,
        priority -> Int4,
        max_attempts -> Int4,
        attempt -> Int4,
        schedule_time -> Timestamptz,
        progress_percent -> Int4,
        current_step -> Text,
        message -> Text,
        cancel_requested -> Bool,
        worker_id -> Nullable<Text>,
        lease_id -> Nullable<Uuid>,
        lease_duration_ms -> Nullable<Int8>,
        lease_expire_time -> Nullable<Timestamptz>,
        result -> Nullable<Jsonb>,
        output_assets -> Array<Nullable<Text>>,
        error -> Nullable<Jsonb>,
        sequence -> Int8,
        request_id -> Nullable<Text>,
        request_hash -> Nullable<Bytea>,
        create_time -> Timestamptz,
        start_time -> Nullable<Timestamptz>,
        end_time -> Nullable<Timestamptz>,
        update_time -> Timestamptz,
        last_event -> Int2,
        traceparent -> Nullable<Text>,
        depends_on -> Array<Nullable<Uuid>>,
        run_anyway -> Bool,
        has_dependents -> Bool,
        cancelled_by -> Nullable<Uuid>,
        concurrency_key -> Text,
        fair_seq -> Int8,
    }
}

diesel::table! {
    object_gc (object_key) {
        object_key -> Text,
        not_before -> Timestamptz,
        attempts -> Int4,
    }
}

diesel::table! {
    projects (id) {
        id -> Uuid,
        owner -> Text,
        display_name -> Text,
        description -> Text,
        labels -> Jsonb,
        metadata -> Jsonb,
        revision -> Int8,
        request_id -> Nullable<Text>,
        request_hash -> Nullable<Bytea>,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
    }
}

diesel::table! {
    queues (kind) {
        kind -> Text,
        paused -> Bool,
        max_running -> Nullable<Int4>,
        max_running_per_key -> Nullable<Int4>,
        rate_jobs -> Nullable<Int4>,
        rate_interval_ms -> Nullable<Int8>,
        rate_starts -> Array<Nullable<Timestamptz>>,
        restricted -> Nullable<Bool>,
        revision -> Int8,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
    }
}

diesel::joinable!(assets -> jobs (source_job));
diesel::joinable!(assets -> projects (project_id));
diesel::joinable!(direct_uploads -> assets (asset_id));
diesel::joinable!(jobs -> projects (project_id));

diesel::allow_tables_to_appear_in_same_query!(
    assets,
    direct_uploads,
    job_events,
    jobs,
    object_gc,
    projects,
    queues,
);

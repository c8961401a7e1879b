// @generated automatically by Diesel CLI.

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

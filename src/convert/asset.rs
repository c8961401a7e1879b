//! Assets on the wire.
use super::{json_to_struct, struct_to_json, timestamp};
use crate::{
    domain::{
        Violations,
        asset::{Asset, AssetFields, AssetState},
    },
    proto::v1 as pb,
};

impl From<AssetState> for pb::asset::State {
    fn from(s: AssetState) -> Self {
        match s {
            AssetState::Pending => Self::Pending,
            AssetState::Ready => Self::Ready,
            AssetState::Failed => Self::Failed,
        }
    }
}

impl From<Asset> for pb::Asset {
    fn from(a: Asset) -> Self {
        let etag = a.etag();
        let name = crate::assets::name(&a);
        let Asset {
            id: _,
            project_id,
            owner: _,
            display_name,
            content_type,
            size_bytes,
            sha256,
            state,
            labels,
            metadata,
            source_job,
            object_key: _,
            revision: _,
            create_time,
            update_time,
        } = a;
        pb::Asset {
            name,
            display_name,
            content_type,
            size_bytes,
            sha256,
            state: pb::asset::State::from(state) as i32,
            labels,
            metadata: Some(json_to_struct(metadata)),
            source_job: source_job
                .map(|job| {
                    crate::domain::names::JobName {
                        project: project_id,
                        job,
                    }
                    .to_string()
                })
                .unwrap_or_default(),
            create_time: Some(timestamp(create_time)),
            update_time: Some(timestamp(update_time)),
            etag,
        }
    }
}

pub fn fields(asset: pb::Asset, prefix: &str, v: &mut Violations) -> AssetFields {
    let metadata = match asset.metadata.map(struct_to_json).transpose() {
        Ok(m) => m.unwrap_or_default(),
        Err(why) => {
            v.add(format!("{prefix}metadata"), why);
            Default::default()
        }
    };
    AssetFields {
        display_name: asset.display_name,
        content_type: asset.content_type,
        labels: asset.labels,
        metadata,
    }
}

/// A started direct upload as StartUploadResponse.
pub fn started(s: crate::assets::Started) -> pb::StartUploadResponse {
    pb::StartUploadResponse {
        upload_id: s.upload_id.to_string(),
        parts: s
            .parts
            .into_iter()
            .map(|p| pb::UploadPart {
                part_number: p.number as i32,
                offset: p.offset,
                size_bytes: p.size,
                url: p.url,
                headers: p.headers.into_iter().collect(),
            })
            .collect(),
        expire_time: Some(timestamp(s.expires)),
    }
}

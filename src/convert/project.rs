//! Projects on the wire.
use super::{json_to_struct, struct_to_json, timestamp};
use crate::{
    domain::{
        Violations,
        project::{Project, ProjectFields},
    },
    proto::v1 as pb,
};

/// Client-settable fields of a wire project; output-only fields are ignored (AIP-203).
pub fn fields(project: pb::Project, v: &mut Violations) -> ProjectFields {
    let metadata = match project.metadata.map(struct_to_json).transpose() {
        Ok(m) => m.unwrap_or_default(),
        Err(why) => {
            v.add("project.metadata", why);
            Default::default()
        }
    };
    ProjectFields {
        display_name: project.display_name,
        description: project.description,
        labels: project.labels,
        metadata,
    }
}

impl From<Project> for pb::Project {
    fn from(p: Project) -> Self {
        let name = p.name().to_string();
        let etag = p.etag();
        let Project {
            id: _,
            owner,
            display_name,
            description,
            labels,
            metadata,
            revision: _,
            create_time,
            update_time,
        } = p;
        pb::Project {
            name,
            display_name,
            description,
            labels,
            metadata: Some(json_to_struct(metadata)),
            owner,
            create_time: Some(timestamp(create_time)),
            update_time: Some(timestamp(update_time)),
            etag,
        }
    }
}

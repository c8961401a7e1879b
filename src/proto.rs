//! Code generated from `proto/` by build.rs.
#![allow(clippy::all, missing_docs)]

pub mod mediaplane {
    pub mod v1 {
        tonic::include_proto!("mediaplane.v1");
    }
}

pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

pub use mediaplane::v1;

/// Encoded `FileDescriptorSet` of every file in `proto/` and its imports, with the
/// custom options (`google.api.http`) kept: reflection and the HTTP edge read it.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mediaplane_descriptor.bin"));

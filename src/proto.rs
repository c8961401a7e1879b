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

/// The services' server side, with `JobEvent` sent as [`EncodedJobEvent`]; every other
/// message is the one in [`v1`]. Servers mount these; clients use [`v1`].
pub mod server {
    tonic::include_proto!("server/mediaplane.v1");
}

/// A message already encoded, sent as the bytes it holds.
///
/// The server's `JobEvent` on WatchJob and WatchJobs ([`EncodedJobEvent`]): one event is
/// encoded once (or arrives encoded from Redis) and every watcher sends the same bytes,
/// instead of cloning the event, whose job may carry a large `input`, and encoding it
/// again per watcher. Also a batch of spans for export, encoded straight from the
/// SDK's span data (`telemetry::protobuf`).
#[derive(Clone, Default, PartialEq)]
pub struct Encoded(pub bytes::Bytes);

/// The `JobEvent` of the services' server side (`build.rs` maps it here).
pub type EncodedJobEvent = Encoded;

impl Encoded {
    pub fn new(message: &impl prost::Message) -> Self {
        Self(message.encode_to_vec().into())
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({} bytes)", self.0.len())
    }
}

/// Encodes as the bytes it holds. The server never decodes these messages; decoding
/// into this type keeps nothing (fields are skipped).
impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Encoded `FileDescriptorSet` of every file in `proto/` and its imports, with the
/// custom options (`google.api.http`) kept: reflection and the HTTP edge read it.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mediaplane_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn an_encoded_event_is_the_event_on_the_wire() {
        let event = v1::JobEvent {
            sequence: 7,
            r#type: v1::job_event::Type::Progress as i32,
            job: Some(v1::Job {
                name: "projects/p/jobs/j".into(),
                progress_percent: 40,
                ..Default::default()
            }),
            event_time: None,
        };
        let encoded = EncodedJobEvent::new(&event);
        assert_eq!(encoded.encoded_len(), event.encoded_len());
        // What a client decodes from a length-delimited message (a gRPC frame).
        let frame = encoded.encode_length_delimited_to_vec();
        assert_eq!(frame, event.encode_length_delimited_to_vec());
        assert_eq!(
            v1::JobEvent::decode_length_delimited(&*frame).unwrap(),
            event
        );
    }
}

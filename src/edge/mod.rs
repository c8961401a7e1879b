//! Everything HTTP on the shared port besides native gRPC: health endpoints for people
//! and load balancers, CORS for browsers, and the per-call middleware.
pub mod calls;
pub mod coalesce;
pub mod cors;
pub mod errors;
pub mod frames;
pub mod health;
pub mod json;
pub mod openapi;
pub mod rules;
pub mod signed;
pub mod studio;
pub mod transcode;

/// Compiles `source` as `t/t.proto` (beside our protos, for the googleapis imports):
/// tests of rule forms our own API does not use.
#[cfg(test)]
pub(crate) fn test_pool(source: &str) -> prost_reflect::DescriptorPool {
    let dir = std::env::temp_dir().join(format!(
        "mediaplane-proto-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7()
    ));
    std::fs::create_dir_all(dir.join("t")).unwrap();
    std::fs::write(dir.join("t/t.proto"), source).unwrap();
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let mut compiler = protox::Compiler::new([dir.to_str().unwrap(), proto]).unwrap();
    compiler.include_imports(true);
    compiler.open_file("t/t.proto").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    compiler.descriptor_pool()
}

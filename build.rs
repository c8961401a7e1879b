//! Compiles `proto/` without a system protoc (protox), generates the tonic code and
//! writes the encoded descriptor set that reflection and the HTTP/JSON edge read.
use std::{env, path::PathBuf};

use prost_reflect::{DynamicMessage, Value};

const PROTO_ROOT: &str = "proto";
const FILES: &[&str] = &[
    "mediaplane/v1/projects.proto",
    "mediaplane/v1/jobs.proto",
    "mediaplane/v1/assets.proto",
    "mediaplane/v1/queues.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build does not emit rerun-if-changed for protox input.
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    // embed_migrations! reads the directory at compile time: a new or changed
    // migration must rebuild the crate (cargo scans a directory recursively).
    println!("cargo:rerun-if-changed=migrations");
    for entry in walk(PROTO_ROOT.into())? {
        println!("cargo:rerun-if-changed={}", entry.display());
    }

    // `Compiler` keeps custom options such as (google.api.http); `protox::compile` drops them.
    let mut compiler = protox::Compiler::new([PROTO_ROOT])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(FILES)?;

    check_http_rules(&compiler.descriptor_pool())?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("mediaplane_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        // Servers are generated below.
        .build_server(false)
        // Deterministic map order: request hashes (idempotency) and JSON output are stable.
        .btree_map(".")
        // Asset bytes as `Bytes`: decoded without a copy, sent without one into a Vec.
        .bytes(".mediaplane.v1.UploadAssetContentRequest.chunk")
        .bytes(".mediaplane.v1.DownloadAssetContentResponse.chunk")
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        .compile_fds(compiler.file_descriptor_set())?;

    // The server's side of the services again, with every message taken from the code
    // above except `JobEvent`, which the server sends already encoded: an event is
    // encoded once per instance and shared by all its watchers instead of cloned and
    // encoded per watcher (clients decode the plain generated `JobEvent`).
    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        // RPCs not implemented yet answer UNIMPLEMENTED.
        .generate_default_stubs(true)
        .out_dir(&server_dir)
        .extern_path(".mediaplane.v1.JobEvent", "crate::proto::EncodedJobEvent")
        .extern_path(".mediaplane.v1", "crate::proto::v1")
        .extern_path(".google.api", "crate::proto::google::api")
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// Fails the build when an RPC of ours has no `google.api.http` rule: the JSON edge
/// serves exactly the annotated methods, so a missing rule would be a missing route.
/// Bidirectional streams are the exception: HTTP/JSON (and grpc-web) cannot carry them.
fn check_http_rules(pool: &prost_reflect::DescriptorPool) -> Result<(), String> {
    let http_ext = pool
        .get_extension_by_name("google.api.http")
        .ok_or("google.api.http extension not found")?;
    let mut missing = Vec::new();
    for service in pool
        .services()
        .filter(|s| s.package_name() == "mediaplane.v1")
    {
        for method in service.methods() {
            if method.is_client_streaming() && method.is_server_streaming() {
                continue;
            }
            let options: DynamicMessage = method.options();
            let has_rule = options.has_extension(&http_ext)
                && matches!(&*options.get_extension(&http_ext), Value::Message(_));
            if !has_rule {
                missing.push(method.full_name().to_owned());
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("RPCs without a google.api.http rule: {missing:?}"))
    }
}

fn walk(dir: PathBuf) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

//! Asset transfer benchmark: prints figures, asserts nothing about speed.
//!
//!     cargo bench --bench assets          (needs Postgres and Redis on localhost)
//!
//! Uploads and downloads a 1 GiB file over gRPC on loopback to the release server
//! (local file storage on the same disk), next to a plain copy of the same file,
//! and samples the server's RSS during each transfer. Then, with S3-compatible storage
//! (s3s-fs, which `scripts/test.sh` installs), the server's CPU time per GiB uploaded
//! through it against a direct upload (StartUpload, PUT to the store, FinalizeUpload).
//! `MP_BENCH_SERVER_BIN=<path>` runs another build's server instead of this one's;
//! `MP_BENCH_MIB=4096` moves 4 GiB instead of 1.
use std::{
    io::{Read, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Bearer, channel, create_project, rss_mib, start_server_bin, token};
use mediaplane::proto::v1::{
    self as pb, assets_service_client::AssetsServiceClient, upload_asset_content_request::Payload,
};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

mod common;

/// Bytes uploaded and downloaded: 1 GiB, or `MP_BENCH_MIB` MiB (RSS must not grow with it).
fn size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::env::var("MP_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1024)
            * 1024
            * 1024
    })
}
const CHUNK: usize = 1024 * 1024;

/// A release server of this build, or of the binary `MP_BENCH_SERVER_BIN` names (another
/// revision's, to compare two in the same hour).
fn server(name: &str, extra: &[(&str, String)]) -> common::Server {
    let bin = std::env::var("MP_BENCH_SERVER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_mediaplane").to_owned());
    start_server_bin(&bin, name, extra)
}

/// Samples `pid`'s RSS every 50 ms until stopped; returns the peak.
fn sample_peak(pid: u32) -> (Arc<AtomicBool>, std::thread::JoinHandle<f64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut peak: f64 = 0.0;
        while !s.load(Ordering::Relaxed) {
            peak = peak.max(rss_mib(pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    });
    (stop, handle)
}

/// Writes every dirty page back, so one measurement does not pay for another's writeback.
fn flush_all() {
    let _ = std::process::Command::new("sync").status();
}

/// Streams the whole asset, handing each chunk to `sink`; returns the bytes received.
async fn download<T>(
    assets: &mut AssetsServiceClient<T>,
    name: &str,
    mut sink: impl FnMut(bytes::Bytes),
) -> usize
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut stream = assets
        .download_asset_content(pb::DownloadAssetContentRequest {
            name: name.to_owned(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0usize;
    while let Some(msg) = stream.next().await {
        if let Some(pb::download_asset_content_response::Payload::Chunk(c)) = msg.unwrap().payload {
            received += c.len();
            sink(c);
        }
    }
    received
}

/// Times a whole download into memory run on a runtime task, as the connection's own
/// task runs: consumed on `main`'s thread, every frame would cross threads.
async fn on_task(download: impl std::future::Future<Output = usize> + Send + 'static) -> Duration {
    let start = Instant::now();
    let received = tokio::spawn(download).await.unwrap();
    assert_eq!(received, size());
    start.elapsed()
}

/// [`on_task`] with a client as `mediaplane assets` connects.
async fn in_memory(mut client: Assets, name: String) -> Duration {
    on_task(async move { download(&mut client, &name, |_| {}).await }).await
}

fn mib_per_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / 1024.0 / 1024.0 / t.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("mediaplane-bench-assets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("source.bin");
    // The digest is known before the transfer, as a client that verifies would know it.
    let sha = {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&source).unwrap());
        let mut block = vec![0u8; CHUNK];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut hasher = Sha256::new();
        for _ in 0..size() / CHUNK {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            hasher.update(&block);
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    // Two baselines, each the best of three: the copy as `cp` leaves it (in the page
    // cache), and the same copy made durable (fsync timed too), which is what the store
    // does before it acknowledges an upload. Earlier writes are flushed first so their
    // writeback does not land in a later measurement.
    std::fs::File::open(&source).unwrap().sync_all().unwrap();
    let (mut copy, mut durable_copy) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        flush_all();
        let start = Instant::now();
        std::fs::copy(&source, dir.join("copy.bin")).unwrap();
        copy = copy.min(start.elapsed());
        std::fs::File::open(dir.join("copy.bin"))
            .unwrap()
            .sync_all()
            .unwrap();
        durable_copy = durable_copy.min(start.elapsed());
        std::fs::remove_file(dir.join("copy.bin")).unwrap();
    }

    let server = server(
        "assets",
        &[
            (
                "MEDIAPLANE_STORAGE_URL",
                format!("file://{}", dir.join("store").display()),
            ),
            ("MEDIAPLANE_MAX_ASSET_BYTES", (2 * size()).to_string()),
        ],
    );
    let pid = server.child.id();
    let (mut assets, project) = connect(&server.addr, "bench").await;
    let baseline = rss_mib(pid);

    flush_all();
    // Upload: the file read in 1 MiB chunks and streamed as it is read.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let path = source.clone();
    let project_name = project.clone();
    let reader = std::thread::spawn(move || {
        let header = pb::UploadAssetContentRequest {
            payload: Some(Payload::Header(pb::UploadAssetHeader {
                create: Some(pb::CreateAssetRequest {
                    parent: project_name,
                    asset: Some(pb::Asset {
                        display_name: "1gib.bin".into(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                }),
                size_bytes: size() as i64,
                ..Default::default()
            })),
        };
        tx.blocking_send(header).unwrap();
        // Chunks cut from one reused buffer, as a client moving large files should:
        // a fresh buffer per chunk costs a page fault per 4 KiB on the client's side.
        let mut f = std::fs::File::open(path).unwrap();
        let mut pool = bytes::BytesMut::new();
        loop {
            if pool.capacity() < CHUNK {
                pool.reserve(8 * CHUNK);
            }
            pool.resize(CHUNK, 0);
            let n = f.read(&mut pool[..]).unwrap();
            if n == 0 {
                break;
            }
            let chunk = pool.split_to(n).freeze();
            pool.clear();
            tx.blocking_send(pb::UploadAssetContentRequest {
                payload: Some(Payload::Chunk(chunk)),
            })
            .unwrap();
        }
    });
    let (stop, peak) = sample_peak(pid);
    let start = Instant::now();
    let asset = assets
        .upload_asset_content(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let upload = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let upload_peak = peak.join().unwrap();
    reader.join().unwrap();
    assert_eq!(asset.sha256, sha, "stored bytes match");

    // Downloads consumed as they arrive (in memory), then one into a file on the same
    // disk made durable, the counterpart of the durable copy.
    // First as uploaded: not in the page cache, so read from the disk.
    let (stop, peak) = sample_peak(pid);
    let download_mem = in_memory(assets.clone(), asset.name.clone()).await;
    stop.store(true, Ordering::Relaxed);
    let download_peak = peak.join().unwrap();
    // The disk's own direct read of as many bytes, the bound of that first download.
    let disk_read = direct_read(&source);
    // Then hot: the stored file read once through the page cache (as a recently
    // served asset would be), so the server reads it from memory.
    warm(&dir.join("store"));
    let download_hot = in_memory(assets.clone(), asset.name.clone()).await;
    // The same hot download by a tonic `Channel` client (16 KiB frames).
    let download_tonic = {
        let (mut client, name) = (connect_tonic(&server.addr).await, asset.name.clone());
        on_task(async move { download(&mut client, &name, |_| {}).await }).await
    };

    flush_all();
    let target = dir.join("downloaded.bin");
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(8);
    let path = target.clone();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::create(path).unwrap();
        for chunk in rx {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    });
    let start = Instant::now();
    let received = download(&mut assets, &asset.name, |c| tx.send(c).unwrap()).await;
    drop(tx);
    writer.join().unwrap();
    let download_file = start.elapsed();
    assert_eq!(received, size());
    assert_eq!(std::fs::metadata(&target).unwrap().len(), size() as u64);

    println!(
        "mediaplane asset transfer benchmark: {} MiB over gRPC on loopback, local storage on the same disk\n",
        size() >> 20
    );
    let row = |what: &str, t: Duration, base: Duration, name: &str| {
        println!(
            "{what:<38} {:>8.0} MiB/s  ({:.0}% of the {name})",
            mib_per_s(size(), t),
            100.0 * base.as_secs_f64() / t.as_secs_f64()
        );
    };
    println!(
        "{:<38} {:>8.0} MiB/s  (best of 3; page cache, not yet on disk)",
        "plain file copy",
        mib_per_s(size(), copy)
    );
    println!(
        "{:<38} {:>8.0} MiB/s  (best of 3; copy + fsync)",
        "plain file copy, durable",
        mib_per_s(size(), durable_copy)
    );
    row(
        "gRPC upload (acknowledged after fsync)",
        upload,
        durable_copy,
        "durable copy",
    );
    row("", upload, copy, "page-cache copy");
    row(
        "gRPC download into a file + fsync",
        download_file,
        durable_copy,
        "durable copy",
    );
    println!(
        "{:<38} {:>8.0} MiB/s  (best of 3; O_DIRECT, what a download from disk can reach)",
        "plain direct read from the disk",
        mib_per_s(size(), disk_read)
    );
    row(
        "gRPC download into memory, from disk",
        download_mem,
        copy,
        "page-cache copy",
    );
    row("", download_mem, disk_read, "disk's direct read");
    row(
        "gRPC download into memory, cached",
        download_hot,
        copy,
        "page-cache copy",
    );
    row(
        "  by a tonic Channel (16 KiB frames)",
        download_tonic,
        copy,
        "page-cache copy",
    );
    println!(
        "server RSS: {baseline:.1} MiB before; peak {upload_peak:.1} MiB during upload (+{:.1}), {download_peak:.1} MiB during download (+{:.1})",
        upload_peak - baseline,
        download_peak - baseline
    );
    drop(server);
    direct_against_server_path(&dir, &source).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The best of three reads of `path` with O_DIRECT into one aligned 4 MiB buffer.
fn direct_read(path: &std::path::Path) -> Duration {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut raw = vec![0u8; 4 * CHUNK + 4096];
    let at = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[at..at + 4 * CHUNK];
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut offset = 0u64;
        loop {
            let n = f.read_at(buf, offset).unwrap();
            if n == 0 {
                break;
            }
            offset += n as u64;
        }
        assert_eq!(offset, size() as u64);
        best = best.min(start.elapsed());
    }
    best
}

/// Reads every file under `dir` through the page cache.
fn warm(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            warm(&path);
        } else {
            let mut f = std::fs::File::open(&path).unwrap();
            std::io::copy(&mut f, &mut std::io::sink()).unwrap();
        }
    }
}

/// CPU time of every thread of `pid` in seconds, at nanosecond resolution (schedstat).
fn cpu_ns_secs(pid: u32) -> f64 {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            total += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total as f64 / 1e9
}

type Assets = mediaplane::client::AssetsClient;

/// An assets client of the server at `addr` (once it listens) as `mediaplane assets`
/// connects (large HTTP/2 frames and windows, `client::transfer`), and a new project's name.
async fn connect(addr: &str, project: &str) -> (Assets, String) {
    let ch = channel(addr).await; // waits for the server to listen
    let t = token("bench", &[]);
    let project = create_project(ch, &t, project).await;
    let args = mediaplane::client::ClientArgs {
        server: addr.to_owned(),
        token: t,
    };
    (args.assets().await.unwrap(), project)
}

/// An assets client on a tonic `Channel` with raised windows: what a tonic client gets
/// at best, since its `Endpoint` cannot raise the 16 KiB frame size.
async fn connect_tonic(
    addr: &str,
) -> AssetsServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
> {
    let ch = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .unwrap()
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .connect()
        .await
        .unwrap();
    AssetsServiceClient::with_interceptor(ch, Bearer(token("bench", &[])))
        .max_decoding_message_size(4 * CHUNK)
}

/// Bytes of the S3 section (per-GiB figures are scaled from it).
const S3_SIZE: usize = 256 * 1024 * 1024;

/// Server CPU per GiB on S3-compatible storage: an upload through the server (hashed
/// and forwarded by it) against a direct upload (the server signs, then HEADs).
async fn direct_against_server_path(dir: &std::path::Path, source: &std::path::Path) {
    let bin = format!(
        "{}/bin/s3s-fs",
        std::env::var("CARGO_HOME")
            .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()))
    );
    if !std::path::Path::new(&bin).exists() {
        println!("\n(S3 section skipped: {bin} missing; scripts/test.sh installs it)");
        return;
    }
    let root = dir.join("s3");
    std::fs::create_dir_all(root.join("bench")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s3 = std::process::Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "bench", "--secret-key", "benchsecret"])
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server = server(
        "assets_s3",
        &[
            ("MEDIAPLANE_STORAGE_URL", "s3://bench/a".to_string()),
            ("MEDIAPLANE_S3_ENDPOINT", endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "bench".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "benchsecret".to_string()),
            ("MEDIAPLANE_MAX_ASSET_BYTES", (2 * size()).to_string()),
        ],
    );
    let pid = server.child.id();
    let (mut assets, project) = connect(&server.addr, "bench-s3").await;
    let mut data = vec![0u8; S3_SIZE];
    std::fs::File::open(source)
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let data = bytes::Bytes::from(data);
    let sha: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    // Through the server: streamed in 1 MiB chunks, hashed and forwarded to the store.
    let cpu0 = cpu_ns_secs(pid);
    let start = Instant::now();
    let mut msgs = vec![pb::UploadAssetContentRequest {
        payload: Some(Payload::Header(pb::UploadAssetHeader {
            create: Some(pb::CreateAssetRequest {
                parent: project.clone(),
                asset: Some(pb::Asset {
                    display_name: "through.bin".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            }),
            size_bytes: S3_SIZE as i64,
            sha256: sha.clone(),
            ..Default::default()
        })),
    }];
    for c in data.chunks(CHUNK) {
        msgs.push(pb::UploadAssetContentRequest {
            payload: Some(Payload::Chunk(data.slice_ref(c))),
        });
    }
    let through = assets
        .upload_asset_content(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let through_time = start.elapsed();
    let through_cpu = cpu_ns_secs(pid) - cpu0;
    assert_eq!(through.sha256, sha);

    // Direct, four times over: the server signs one URL, the client PUTs to the store,
    // the server HEADs. Its CPU is read per thread at nanosecond resolution (threads that
    // ended in between are not counted: the server's pools outlive this section).
    const DIRECT_ROUNDS: usize = 4;
    let cpu0 = cpu_ns_secs(pid);
    let start = Instant::now();
    for i in 0..DIRECT_ROUNDS {
        let asset = assets
            .create_asset(pb::CreateAssetRequest {
                parent: project.clone(),
                asset: Some(pb::Asset {
                    display_name: format!("direct-{i}.bin"),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let started = assets
            .start_upload(pb::StartUploadRequest {
                name: asset.name.clone(),
                size_bytes: S3_SIZE as i64,
                sha256: sha.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let part = &started.parts[0];
        let mut put = reqwest::Client::new().put(&part.url).body(data.clone());
        for (k, v) in &part.headers {
            put = put.header(k, v);
        }
        let r = put.send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let ready = assets
            .finalize_upload(pb::FinalizeUploadRequest {
                name: asset.name.clone(),
                upload_id: started.upload_id.clone(),
                part_etags: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ready.sha256, sha);
    }
    let direct_time = start.elapsed() / DIRECT_ROUNDS as u32;
    let direct_cpu = (cpu_ns_secs(pid) - cpu0) / DIRECT_ROUNDS as f64;

    let per_gib = |cpu: f64| cpu * (1024.0 * 1024.0 * 1024.0) / S3_SIZE as f64;
    println!(
        "\nS3-compatible storage (s3s-fs on loopback), {} MiB each, server CPU per GiB:",
        S3_SIZE / (1024 * 1024)
    );
    println!(
        "{:<38} {:>8.3} s CPU/GiB  ({:.0} MiB/s)",
        "upload through the server",
        per_gib(through_cpu),
        mib_per_s(S3_SIZE, through_time)
    );
    println!(
        "{:<38} {:>8.3} s CPU/GiB  ({:.0} MiB/s)  {:.2}% of the server path's CPU (target: under 1%)",
        "direct upload (presigned PUT)",
        per_gib(direct_cpu),
        mib_per_s(S3_SIZE, direct_time),
        100.0 * direct_cpu / through_cpu
    );
    drop(server);
    let _ = s3.kill();
    let _ = s3.wait();
}

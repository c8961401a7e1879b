//! Shared by the benchmarks: the release server as its own process, clients, RSS.
#![allow(dead_code)]
use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use mediaplane::{auth, config::Secret};
use tonic::{
    Request, Status,
    service::Interceptor,
    transport::{Channel, Endpoint},
};

pub const SECRET: &str = "bench-secret-bench-secret-bench-secret-0001";

#[derive(Clone)]
pub struct Bearer(pub String);
impl Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.0).parse().unwrap(),
        );
        Ok(r)
    }
}

pub struct Server {
    pub child: Child,
    pub addr: String,
    /// `host:port` of `/metrics` (unless the settings turned it off).
    pub admin: String,
    pub db: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("psql")
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db),
            ])
            .status();
    }
}

/// The release binary on a free port, its own database, and `extra` settings.
pub fn start_server(name: &str, extra: &[(&str, String)]) -> Server {
    start_server_bin(env!("CARGO_BIN_EXE_mediaplane"), name, extra)
}

/// `bin` (this build's binary, or another revision's for a baseline) as `start_server`
/// starts it.
pub fn start_server_bin(bin: &str, name: &str, extra: &[(&str, String)]) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let db = format!("mp_bench_{name}_{}", std::process::id());
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .env("MEDIAPLANE_ADDR", format!("127.0.0.1:{port}"))
        .env("MEDIAPLANE_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:5432/{db}"),
        )
        .env("MEDIAPLANE_DB_POOL_SIZE", "32")
        .env("MEDIAPLANE_REDIS_PREFIX", db.clone())
        .env("MEDIAPLANE_JWT_SECRET", SECRET)
        .env("MEDIAPLANE_MAX_CONCURRENT_STREAMS", "4096")
        // Benchmarks measure the engine, not the limits (benches/limits.rs does that):
        // one principal makes every call and holds every stream.
        .env("MEDIAPLANE_RATE_LIMITS", "off")
        .env("MEDIAPLANE_MAX_WATCH_STREAMS", "1000000")
        .env("MEDIAPLANE_MAX_UPLOADS", "1000000")
        .env("MEDIAPLANE_QUOTA_PROJECTS", "10000000")
        .env("MEDIAPLANE_QUOTA_ACTIVE_JOBS", "100000000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("server starts");
    Server {
        child,
        addr: format!("http://127.0.0.1:{port}"),
        admin: format!("127.0.0.1:{admin_port}"),
        db,
    }
}

pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds used so far by every process named `name` (`postgres`: the postmaster,
/// its background workers and every backend; a backend that exits takes its share
/// along, so measure over connections that stay open).
pub fn cpu_secs_of(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(cpu_secs)
        .sum()
}

/// CPU seconds (user + system) a process has used, from /proc (Linux; 0 elsewhere).
#[allow(dead_code)]
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // USER_HZ is 100 on every Linux this runs on.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds the whole machine has been busy (all cores, /proc/stat; 0 elsewhere).
#[allow(dead_code)]
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat.lines().next().map_or(vec![], |l| {
        l.split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect()
    });
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: f64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    busy / 100.0
}

pub async fn channel(addr: &str) -> Channel {
    for _ in 0..100 {
        if let Ok(c) = Endpoint::from_shared(addr.to_owned())
            .unwrap()
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server did not come up");
}

pub fn token(sub: &str, roles: &[&str]) -> String {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    auth::mint(
        &Secret::new(SECRET),
        sub,
        &roles,
        &[],
        Duration::from_secs(3600),
    )
    .unwrap()
}

/// A new project of the token's owner, by name.
pub async fn create_project(channel: Channel, token: &str, display_name: &str) -> String {
    use mediaplane::proto::v1 as pb;
    pb::projects_service_client::ProjectsServiceClient::with_interceptor(
        channel,
        Bearer(token.to_owned()),
    )
    .create_project(pb::CreateProjectRequest {
        project: Some(pb::Project {
            display_name: display_name.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .name
}

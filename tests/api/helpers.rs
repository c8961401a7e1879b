//! Test harness: a real server on port 0 against a fresh Postgres database per test,
//! tonic clients over a real socket, and a TCP proxy that can cut the database off.
use std::{
    net::SocketAddr,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use mediaplane::{
    auth,
    config::{JwtSettings, Secret, Settings},
    proto::v1::{self as pb, projects_service_client::ProjectsServiceClient},
    startup::Application,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Mutex, oneshot},
    task::JoinHandle,
};
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const PG_HOST: &str = "127.0.0.1:5432";
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// Spans are always traced (jobs keep their creator's trace context); lines are
/// logged only with TEST_LOG set.
static TELEMETRY: LazyLock<mediaplane::telemetry::Telemetry> = LazyLock::new(|| {
    let logs = if std::env::var_os("TEST_LOG").is_some() {
        "info"
    } else {
        "off"
    };
    mediaplane::telemetry::init_with(
        mediaplane::config::LogFormat::Human,
        None,
        tracing_subscriber::EnvFilter::new(logs),
    )
    .expect("telemetry installs")
});

/// Databases of test runs that crashed are named with their creation time; sweep old ones.
async fn sweep_stale_databases(conn: &mut AsyncPgConnection) {
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        datname: String,
    }
    let Ok(names) =
        diesel::sql_query("SELECT datname FROM pg_database WHERE datname LIKE 'mp_test_%'")
            .load::<Name>(conn)
            .await
    else {
        return;
    };
    let cutoff = now_secs().saturating_sub(3 * 3600);
    for Name { datname } in names {
        let created: Option<u64> = datname.split('_').nth(2).and_then(|s| s.parse().ok());
        if created.is_some_and(|t| t < cutoff) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS \"{datname}\" WITH (FORCE)"
            ))
            .execute(conn)
            .await;
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A scratch database, dropped (forcefully) when this value is.
pub struct ScratchDb {
    pub name: String,
}

impl ScratchDb {
    /// A name only: the server under test creates the database itself.
    pub async fn reserve() -> Self {
        static SWEEP: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        SWEEP
            .get_or_init(|| async {
                if let Ok(mut conn) = AsyncPgConnection::establish(PG_ADMIN_URL).await {
                    sweep_stale_databases(&mut conn).await;
                }
            })
            .await;
        Self {
            name: format!("mp_test_{}_{}", now_secs(), uuid::Uuid::new_v4().simple()),
        }
    }

    pub fn url(&self) -> String {
        self.url_via(PG_HOST)
    }

    pub fn url_via(&self, host: &str) -> String {
        format!("postgres://postgres@{host}/{}", self.name)
    }

    /// The local object store of this test's server.
    pub fn storage_dir(&self) -> std::path::PathBuf {
        std::env::temp_dir()
            .join("mediaplane-tests")
            .join(&self.name)
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.storage_dir());
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // Drop runs outside any runtime guarantee: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = AsyncPgConnection::establish(PG_ADMIN_URL).await {
                    let _ = diesel::sql_query(sql).execute(&mut conn).await;
                }
            });
        })
        .join();
    }
}

pub fn test_settings(db: &ScratchDb) -> Settings {
    let mut s = Settings::defaults();
    s.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    s.admin_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    s.database_url = Secret::new(db.url());
    s.db_pool_size = 4;
    s.redis_prefix = format!("mp_test_{}", uuid::Uuid::new_v4().simple());
    s.jwt = JwtSettings {
        secret: Some(Secret::new(SECRET)),
        ..JwtSettings::default()
    };
    s.health_interval = Duration::from_millis(200);
    s.drain_timeout = Duration::from_secs(5);
    s.storage.url = format!("file://{}", db.storage_dir().display());
    s
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`).
    pub admin: SocketAddr,
    pub db: Arc<ScratchDb>,
    pub settings: Settings,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let db = ScratchDb::reserve().await;
        let mut settings = test_settings(&db);
        configure(&mut settings);
        Self::spawn_on(db, settings).await
    }

    pub async fn spawn_on(db: ScratchDb, settings: Settings) -> Self {
        Self::start(Arc::new(db), settings).await
    }

    /// A second instance on the same Postgres database and Redis prefix.
    pub async fn spawn_peer(&self) -> Self {
        Self::start(self.db.clone(), self.settings.clone()).await
    }

    async fn start(db: Arc<ScratchDb>, settings: Settings) -> Self {
        LazyLock::force(&TELEMETRY);
        let app = Application::build(settings.clone())
            .await
            .expect("server builds");
        let addr = app.local_addr();
        let admin = app.admin_addr().expect("tests run with metrics on");
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(app.run_until_stopped(async {
            let _ = rx.await;
        }));
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connects");
        Self {
            addr,
            admin,
            db,
            settings,
            channel,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The admin listener's `/metrics`, as text.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn projects(
        &self,
        token: &str,
    ) -> ProjectsServiceClient<InterceptedService<Channel, Bearer>> {
        ProjectsServiceClient::with_interceptor(self.channel.clone(), Bearer::new(token))
    }

    pub fn assets(
        &self,
        token: &str,
    ) -> pb::assets_service_client::AssetsServiceClient<InterceptedService<Channel, Bearer>> {
        pb::assets_service_client::AssetsServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(token),
        )
        .max_decoding_message_size(8 * 1024 * 1024)
    }

    pub fn jobs(
        &self,
        token: &str,
    ) -> pb::jobs_service_client::JobsServiceClient<InterceptedService<Channel, Bearer>> {
        pb::jobs_service_client::JobsServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(token),
        )
    }

    pub fn health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
    }

    /// Starts a graceful shutdown and returns the server task to await.
    pub fn begin_shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.take().expect("server still running")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
        // Rate-limit state outlives the test by its refill time: remove this test's keys.
        remove_redis_keys(&self.settings.redis_prefix);
    }
}

/// Removes every Redis key under `prefix` (a test's own).
pub fn remove_redis_keys(prefix: &str) {
    if let Ok(client) = redis::Client::open("redis://127.0.0.1:6379")
        && let Ok(mut conn) = client.get_connection()
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Self {
        Self(format!("Bearer {token}").parse().expect("ascii token"))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub fn token(sub: &str) -> String {
    token_with(sub, &[], Duration::from_secs(600))
}

/// The worker fleet's token (role `worker`, any kind).
pub fn worker_token() -> String {
    token_with("fleet", &["worker"], Duration::from_secs(600))
}

pub fn admin_token(sub: &str) -> String {
    token_with(sub, &["admin"], Duration::from_secs(600))
}

pub fn token_with(sub: &str, roles: &[&str], ttl: Duration) -> String {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    auth::mint(&Secret::new(SECRET), sub, &roles, &[], ttl).expect("token")
}

/// A Struct of one string field `len` bytes long: inputs and metadata of a chosen size.
pub fn sized_struct(field: &str, len: usize) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            field.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("x".repeat(len))),
            },
        )]
        .into(),
    }
}

pub fn new_project(display_name: &str) -> pb::Project {
    pb::Project {
        display_name: display_name.into(),
        ..Default::default()
    }
}

pub async fn create_project(app: &TestApp, token: &str, display_name: &str) -> pb::Project {
    app.projects(token)
        .create_project(pb::CreateProjectRequest {
            project: Some(new_project(display_name)),
            request_id: String::new(),
        })
        .await
        .expect("create project")
        .into_inner()
}

/// A request for a job of `kind` with defaults in `parent`.
pub fn job_request(parent: &str, kind: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        parent: parent.into(),
        job: Some(pb::Job {
            kind: kind.into(),
            ..Default::default()
        }),
        request_id: String::new(),
        key: String::new(),
    }
}

/// A job of `kind` with defaults in `parent`.
pub async fn create_job_of(app: &TestApp, token: &str, parent: &str, kind: &str) -> pb::Job {
    app.jobs(token)
        .create_job(job_request(parent, kind))
        .await
        .expect("create job")
        .into_inner()
}

/// One job of `kind`, leased by `worker_id` with `token` (there must be one queued).
pub async fn acquire_one(app: &TestApp, token: &str, worker_id: &str, kind: &str) -> pb::LeasedJob {
    app.jobs(token)
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: worker_id.into(),
            kinds: vec![kind.into()],
            max_jobs: 1,
            ..Default::default()
        })
        .await
        .expect("acquire")
        .into_inner()
        .jobs
        .pop()
        .expect("a job to lease")
}

/// A PENDING asset (no bytes yet) in `parent`.
pub async fn create_pending_asset(
    app: &TestApp,
    token: &str,
    parent: &str,
    display_name: &str,
) -> pb::Asset {
    app.assets(token)
        .create_asset(pb::CreateAssetRequest {
            parent: parent.into(),
            asset: Some(pb::Asset {
                display_name: display_name.into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("create asset")
        .into_inner()
}

/// Field paths of the `google.rpc.BadRequest` in an error, in order.
pub fn violations(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Waits until `check` holds, polling; fails the test after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// A TCP proxy in front of Postgres that can be switched off: existing connections
/// are cut and new ones refused, as when the database host goes away.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ChaosProxy {
    pub async fn start(target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !AtomicBool::load(&up2, Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().await.push(task);
            }
        });
        Self { addr, up, conns }
    }

    pub async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.conns.lock().await.drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A server whose Redis is behind a `ChaosProxy`, to take Redis away from it.
pub async fn app_behind_redis_proxy() -> (TestApp, ChaosProxy) {
    let proxy = ChaosProxy::start("127.0.0.1:6379").await;
    let addr = proxy.addr;
    let app = TestApp::spawn_with(|s| {
        s.redis_url = mediaplane::config::Secret::new(format!("redis://{addr}"))
    })
    .await;
    (app, proxy)
}

/// Storage in `bucket` of the S3-compatible server at `endpoint` (test credentials).
fn s3_storage(s: &mut Settings, endpoint: &str, bucket: &str) {
    s.storage = mediaplane::storage::StorageSettings {
        url: format!("s3://{bucket}/assets"),
        s3_endpoint: Some(endpoint.to_owned()),
        s3_region: "us-east-1".into(),
        s3_access_key_id: Some("testing".into()),
        s3_secret_access_key: Some(Secret::new("testing")),
    };
}

/// A local S3-compatible server (moto, from the test venv) with one bucket.
pub struct S3Server {
    pub endpoint: String,
    pub bucket: String,
    child: std::process::Child,
}

impl S3Server {
    pub async fn start() -> Self {
        let moto = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/moto_server");
        assert!(
            std::path::Path::new(moto).exists(),
            "{moto} not found: run scripts/test.sh, which installs it"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let endpoint = format!("http://127.0.0.1:{port}");
        let bucket = format!("media-{}", uuid::Uuid::new_v4().simple());
        let http = reqwest::Client::new();
        let mut created = false;
        for _ in 0..100 {
            if let Ok(r) = http.put(format!("{endpoint}/{bucket}")).send().await
                && r.status().is_success()
            {
                created = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(created, "moto did not come up at {endpoint}");
        Self {
            endpoint,
            bucket,
            child,
        }
    }

    pub fn configure(&self, s: &mut Settings) {
        s3_storage(s, &self.endpoint, &self.bucket);
    }

    /// Keys in the bucket (via the S3 ListObjectsV2 API).
    pub async fn keys(&self) -> Vec<String> {
        let body = reqwest::get(format!("{}/{}?list-type=2", self.endpoint, self.bucket))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A strict local S3-compatible server (s3s-fs): it checks SigV4 signatures, the expiry
/// of presigned URLs and the SHA-256 a PUT declares, as S3 does (moto checks none of
/// these). scripts/test.sh installs it with cargo.
pub struct StrictS3 {
    pub endpoint: String,
    pub bucket: String,
    root: tempfile::TempDir,
    child: std::process::Child,
}

impl StrictS3 {
    pub async fn start() -> Self {
        let bin = std::env::var("MP_S3S_FS").unwrap_or_else(|_| {
            let home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
                format!("{}/.cargo", std::env::var("HOME").unwrap_or_default())
            });
            format!("{home}/bin/s3s-fs")
        });
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} not found: run scripts/test.sh, which installs it"
        );
        let root = tempfile::tempdir().unwrap();
        // Short: s3s-fs names its metadata files after bucket and key, within 255 bytes.
        let bucket = format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        std::fs::create_dir(root.path().join(&bucket)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "testing", "--secret-key", "testing"])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut up = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "s3s-fs did not come up at {endpoint}");
        Self {
            endpoint,
            bucket,
            root,
            child,
        }
    }

    pub fn configure(&self, s: &mut Settings) {
        s3_storage(s, &self.endpoint, &self.bucket);
    }

    /// Keys of the objects in the bucket (read from s3s-fs's directory).
    pub fn keys(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, base, out);
                } else if !entry.file_name().to_string_lossy().starts_with('.') {
                    out.push(
                        path.strip_prefix(base)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
        let base = self.root.path().join(&self.bucket);
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out
    }
}

impl Drop for StrictS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One grpc-web data frame holding `message`.
pub fn grpc_web_frame(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Splits a grpc-web response body into its message and its trailer block.
pub fn parse_grpc_web(body: &[u8]) -> (Option<Vec<u8>>, String) {
    let (mut message, mut trailers, mut rest) = (None, String::new(), body);
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = &rest[5..5 + len];
        if rest[0] & 0x80 != 0 {
            trailers = String::from_utf8_lossy(payload).into_owned();
        } else {
            message = Some(payload.to_vec());
        }
        rest = &rest[5 + len..];
    }
    (message, trailers)
}

/// Calls of `method` started, by every door or by `transport` (`grpc`, `worker-session`),
/// from the server's metrics.
pub async fn calls_started(app: &TestApp, method: &str, transport: Option<&str>) -> f64 {
    let text = app.metrics_text().await;
    text.lines()
        .filter(|l| {
            l.starts_with("grpc_server_started_total{")
                && l.contains(&format!("grpc_method=\"{method}\""))
                && transport.is_none_or(|t| l.contains(&format!("transport=\"{t}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Group transactions committed in `lane` (`create`, `write`, `acquire`, `turn`, ...),
/// from the server's metrics.
pub async fn groups_committed(app: &TestApp, lane: &str) -> f64 {
    let text = app.metrics_text().await;
    text.lines()
        .filter(|l| {
            l.starts_with("mediaplane_group_commit_size_count{")
                && l.contains(&format!("lane=\"{lane}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A token for `sub` with `roles` whose `exp` passed 28 s ago: accepted for about 2 s
/// more (the 30 s clock-skew leeway), then refused.
pub fn expiring_token(sub: &str, roles: &[&str]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "roles": roles, "iat": now - 60, "exp": now - 28}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

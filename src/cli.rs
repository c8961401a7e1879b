//! The `mediaplane` command line: `serve`, `migrate`, `token`.
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use rand::RngCore;

use crate::{
    auth,
    config::{Secret, Settings, SettingsArgs},
    db, startup, telemetry,
};

#[derive(Debug, Parser)]
#[command(
    name = "mediaplane",
    version,
    about = "Projects, durable media jobs with live progress, and assets, over gRPC."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (applies pending migrations first).
    Serve(SettingsArgs),
    /// Create the database if missing and apply pending migrations, then exit.
    Migrate(SettingsArgs),
    /// Print a bearer token signed with the configured HS256 secret.
    Token(TokenArgs),
    /// Run jobs by executing a command (the worker protocol, in the box).
    Worker(crate::client::worker::WorkerArgs),
    /// Create, list and watch jobs.
    Jobs {
        #[command(subcommand)]
        command: crate::client::jobs::JobsCommand,
    },
    /// Queues per job kind (admins): what each holds; pause, resume, limit.
    Queues {
        #[command(subcommand)]
        command: crate::client::queues::QueuesCommand,
    },
    /// Upload and download asset bytes (straight to S3-compatible storage when the
    /// server uses it).
    Assets {
        #[command(subcommand)]
        command: crate::client::assets::AssetsCommand,
    },
    /// Show the caller's usage of each quota (projects, unfinished jobs, asset bytes).
    Usage(crate::client::ClientArgs),
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Owner of the token (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Role to grant (`admin`, `worker`); repeat for several.
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// Job kinds a worker token may acquire; repeat for several (default: any).
    #[arg(long = "kind")]
    pub kinds: Vec<String>,
    /// Lifetime, like 30m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

/// The command line, with the config file's values (if one is named) under flags and
/// environment variables; exits with clap's usage message or the setting at fault.
pub fn parse() -> Cli {
    let parsed = crate::config::parse_with_file(Cli::command(), std::env::args_os().collect())
        .and_then(|m| Cli::from_arg_matches(&m).map_err(crate::config::ParseError::Clap));
    match parsed {
        Ok(cli) => cli,
        Err(crate::config::ParseError::Clap(e)) => e.exit(),
        Err(crate::config::ParseError::Config(e)) => {
            // As every other failure at start: exit code 1.
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}

/// Runs a command; the error text is what the user sees before exit code 1.
pub async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let ok = std::process::ExitCode::SUCCESS;
    match cli.command {
        Command::Serve(args) => serve(args).await.map(|()| ok),
        Command::Worker(args) => {
            let _log = telemetry::init(crate::config::LogFormat::Human, None)?;
            crate::client::worker::run(args).await.map(|()| ok)
        }
        Command::Jobs { command } => crate::client::jobs::run(command).await,
        Command::Queues { command } => crate::client::queues::run(command).await,
        Command::Assets { command } => crate::client::assets::run(command).await,
        Command::Usage(client) => crate::client::print_usage(&client).await.map(|()| ok),
        Command::Migrate(args) => {
            let settings = Settings::load(&args)?;
            let _log = telemetry::init(settings.log_format, None)?;
            let url = settings.database_url.expose();
            db::create_database_if_missing(url).await?;
            let applied = db::migrate(url).await?;
            println!("migrations applied: {applied}");
            Ok(ok)
        }
        Command::Token(args) => {
            let settings = Settings::load(&args.settings)?;
            for role in &args.roles {
                anyhow::ensure!(
                    [auth::ROLE_ADMIN, auth::ROLE_WORKER].contains(&role.as_str()),
                    "unknown role {role:?}: expected admin or worker"
                );
            }
            println!(
                "{}",
                auth::mint_for(&settings.jwt, &args.sub, &args.roles, &args.kinds, args.ttl)?
            );
            Ok(ok)
        }
    }
}

async fn serve(args: SettingsArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(&args)?;
    let _telemetry = telemetry::init(settings.log_format, settings.otlp_endpoint.as_deref())?;
    let mut first_run_token = None;
    if settings.jwt.secret.is_none() && settings.jwt.public_key_pem.is_none() {
        // First run: no set-up needed, yet the server is still closed to anyone without this token.
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
        settings.jwt.secret = Some(secret);
        let token = auth::mint_for(
            &settings.jwt,
            "local",
            &[auth::ROLE_WORKER.to_owned()],
            &[],
            Duration::from_secs(24 * 3600),
        )?;
        eprintln!(
            "No MEDIAPLANE_JWT_SECRET set: generated a secret for this run only.\n\
             Token for user `local` (worker role, valid 24h):\n\n{token}\n\n\
             Set MEDIAPLANE_JWT_SECRET to keep tokens valid across restarts."
        );
        first_run_token = Some(token);
    }
    let app = startup::Application::build(settings).await?;
    if let Some(token) = first_run_token {
        // The token rides in the fragment, which browsers never send: it reaches no
        // server and no log, and the page removes it from the address bar.
        let mut addr = app.local_addr();
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        eprintln!("Studio (signs you in): http://{addr}/#token={token}\n");
    }
    app.run_until_stopped(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGINT or SIGTERM (what Kubernetes sends a pod it stops). The handlers are
/// installed at the first poll and stay for the future's life: keep one future and
/// poll it wherever the caller waits, so a signal between two waits is not missed.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

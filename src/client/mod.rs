//! The client side of the binary: `mediaplane worker`, `mediaplane jobs`,
//! `mediaplane queues`, `mediaplane assets` and `mediaplane usage`, and the gRPC client they share (a channel plus the bearer
//! token). Nothing here runs inside the server.
pub mod assets;
pub mod jobs;
pub mod queues;
pub mod worker;

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::proto::v1::{
    assets_service_client::AssetsServiceClient, jobs_service_client::JobsServiceClient,
    projects_service_client::ProjectsServiceClient, queues_service_client::QueuesServiceClient,
};

#[derive(Debug, clap::Args, Clone)]
pub struct ClientArgs {
    /// Server URL.
    #[arg(
        long,
        env = "MEDIAPLANE_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Bearer token (see `mediaplane token`).
    #[arg(long, env = "MEDIAPLANE_TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Jobs = JobsServiceClient<InterceptedService<Channel, Bearer>>;
pub type Projects = ProjectsServiceClient<InterceptedService<Channel, Bearer>>;
pub type Queues = QueuesServiceClient<InterceptedService<Channel, Bearer>>;
pub type AssetsClient = AssetsServiceClient<InterceptedService<Channel, Bearer>>;

pub struct Client {
    pub jobs: Jobs,
    pub projects: Projects,
    pub queues: Queues,
    pub assets: AssetsClient,
}

impl ClientArgs {
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let bearer = Bearer(
            format!("Bearer {}", self.token.trim())
                .parse()
                .map_err(|_| {
                    anyhow::anyhow!("the token contains characters not allowed in a header")
                })?,
        );
        let channel = Endpoint::from_shared(self.server.clone())
            .map_err(|e| anyhow::anyhow!("invalid --server {:?}: {e}", self.server))?
            // Windows that fit 1 MiB asset chunks (the defaults stall on each one).
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", self.server))?;
        Ok(Client {
            jobs: JobsServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            projects: ProjectsServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            queues: QueuesServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            assets: AssetsServiceClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(4 * 1024 * 1024),
        })
    }
}

/// `mediaplane usage`: the caller's use of each quota, as a table.
pub async fn print_usage(args: &ClientArgs) -> anyhow::Result<()> {
    let mut c = args.connect().await?;
    let usage = c
        .projects
        .get_usage(crate::proto::v1::GetUsageRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    println!("owner: {}", usage.owner);
    println!("{:<14} {:>16} {:>16}", "QUOTA", "USED", "LIMIT");
    for q in usage.quotas {
        println!("{:<14} {:>16} {:>16}", q.quota, q.used, q.limit);
    }
    Ok(())
}

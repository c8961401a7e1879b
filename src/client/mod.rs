//! The client side of the binary: `mediaplane worker`, `mediaplane jobs`,
//! `mediaplane queues`, `mediaplane assets` and `mediaplane usage`, and the gRPC client they share (a channel plus the bearer
//! token). Nothing here runs inside the server.
pub mod assets;
pub mod calls;
pub mod jobs;
pub mod queues;
pub mod transfer;
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
/// Assets move on a connection of their own that takes large frames (`transfer`).
pub type AssetsClient =
    AssetsServiceClient<InterceptedService<transfer::TransferConnection, Bearer>>;

pub struct Client {
    pub jobs: Jobs,
    pub projects: Projects,
    pub queues: Queues,
}

impl ClientArgs {
    fn bearer(&self) -> anyhow::Result<Bearer> {
        Ok(Bearer(
            format!("Bearer {}", self.token.trim())
                .parse()
                .map_err(|_| {
                    anyhow::anyhow!("the token contains characters not allowed in a header")
                })?,
        ))
    }

    /// An assets client on a connection of its own for asset bytes (`transfer`).
    pub async fn assets(&self) -> anyhow::Result<AssetsClient> {
        let bearer = self.bearer()?;
        let origin = self
            .server
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid --server {:?}: {e}", self.server))?;
        let connection = transfer::TransferConnection::connect(&self.server).await?;
        Ok(
            AssetsServiceClient::with_origin(InterceptedService::new(connection, bearer), origin)
                .max_decoding_message_size(4 * 1024 * 1024),
        )
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        let bearer = self.bearer()?;
        let channel = Endpoint::from_shared(self.server.clone())
            .map_err(|e| anyhow::anyhow!("invalid --server {:?}: {e}", self.server))?
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", self.server))?;
        Ok(Client {
            jobs: JobsServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            projects: ProjectsServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            queues: QueuesServiceClient::with_interceptor(channel, bearer),
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
